"""Run a throwaway Prometheus against given targets, with lorafleet's rules: for tests, demos and renders.

The committed `prometheus/prometheus.yml` names fixed ports (8080, 8101, ...). `scrape_config()` keeps its jobs,
paths and rules but swaps in the addresses that are actually live, so a test on a busy machine can use free ports.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import yaml

PROM_DIR = Path(__file__).resolve().parent / "prometheus"
CONFIG = PROM_DIR / "prometheus.yml"
JOBS = ("lorafleet-gateway", "vllm", "lorafleet-bench")
INSTALL_HINT = "run scripts/install_prometheus.sh (or `make install`)"


class PrometheusError(RuntimeError):
    """Prometheus is missing, would not start, or did not become ready; the message says what to do."""


def find_binary(name: str = "prometheus") -> str:
    path = shutil.which(name)
    if path is None:
        raise PrometheusError(f"`{name}` not found on PATH: {INSTALL_HINT}")
    return path


def split_metrics_url(url: str) -> tuple[str, str]:
    """ "http://127.0.0.1:8101/metrics" -> ("127.0.0.1:8101", "/metrics"); a bare base URL means /metrics."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if not parts.hostname or not parts.port:
        raise ValueError(f"metrics URL {url!r} needs a host and a port, e.g. http://127.0.0.1:8101/metrics")
    return f"{parts.hostname}:{parts.port}", parts.path if parts.path not in ("", "/") else "/metrics"


def scrape_config(
    targets: dict[str, list[str]],
    scrape_interval: str | None = None,
    evaluation_interval: str | None = None,
    gateway_token: str | None = None,
) -> dict[str, Any]:
    """The committed config with each job's targets replaced by `targets[job]` (metrics URLs).

    Jobs missing from `targets` are dropped; rule files become absolute so the config works from any folder.
    `gateway_token` is the gateway's metrics key (gateway.metrics_key_hash), sent as a bearer token.
    """
    unknown = set(targets) - set(JOBS)
    if unknown:
        raise ValueError(f"unknown scrape jobs {sorted(unknown)}; expected some of {list(JOBS)}")
    config = yaml.safe_load(CONFIG.read_text())
    if scrape_interval:
        config["global"]["scrape_interval"] = scrape_interval
    if evaluation_interval:
        config["global"]["evaluation_interval"] = evaluation_interval
    config["rule_files"] = [str(PROM_DIR / pattern) for pattern in config["rule_files"]]
    jobs = []
    for job in config["scrape_configs"]:
        urls = targets.get(job["job_name"])
        if not urls:
            continue
        paths = {split_metrics_url(u)[1] for u in urls}
        if len(paths) != 1:
            raise ValueError(f"job {job['job_name']}: all targets must share one metrics path, got {sorted(paths)}")
        job["metrics_path"] = paths.pop()
        job["static_configs"] = [{"targets": [split_metrics_url(u)[0] for u in urls]}]
        if gateway_token and job["job_name"] == "lorafleet-gateway":
            job["authorization"] = {"type": "Bearer", "credentials": gateway_token}
        jobs.append(job)
    config["scrape_configs"] = jobs
    return config


class LocalPrometheus:
    """A Prometheus child process: `with LocalPrometheus(config, workdir, port) as prom: prom.url`."""

    def __init__(self, config: dict[str, Any], workdir: Path, port: int, host: str = "127.0.0.1") -> None:
        self.config, self.workdir, self.port, self.host = config, Path(workdir), port, host
        self.url = f"http://{host}:{port}"
        self.log_path = self.workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> LocalPrometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        cmd = [
            find_binary("prometheus"),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address={self.host}:{self.port}",
            "--web.enable-lifecycle",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise PrometheusError(f"prometheus not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> LocalPrometheus:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
