#!/usr/bin/env bash
# Install Prometheus + promtool (Debian's `prometheus` package) when missing; do nothing when both are on PATH.
# The dashboard tests start their own Prometheus on a free port, so the package's service must not keep running
# (it would hold 9090 and scrape nothing useful).
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  echo "==> prometheus present: $(prometheus --version 2>&1 | head -n1)"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: prometheus/promtool missing and apt-get not found; install Prometheus >= 2.42 so that" \
       "'prometheus' and 'promtool' are on PATH (https://prometheus.io/download/)" >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

# policy-rc.d exit 101 tells Debian maintainer scripts not to start the service during the install.
POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod +x "$POLICY"
  ADDED_POLICY=1
fi
cleanup() { if [ "$ADDED_POLICY" = 1 ]; then $SUDO rm -f "$POLICY"; fi; }
trap cleanup EXIT

install() {
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
}
echo "==> installing Debian's prometheus package"
# A stale package index (fresh containers have none) makes the first try fail; refresh it then.
install || { $SUDO apt-get update -q && install; }

# Belt and braces where systemd runs: keep the packaged service off so it never holds port 9090.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
if [ -f /run/prometheus.pid ]; then  # only the packaged service writes this pid file
  $SUDO service prometheus stop >/dev/null 2>&1 || true
fi
echo "==> $(prometheus --version 2>&1 | head -n1)"
