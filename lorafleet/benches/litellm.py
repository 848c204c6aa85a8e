"""LiteLLM's proxy in front of an engine, for the gateway benchmark to compare with (`--litellm`).

LiteLLM is installed on first use into its own virtual environment (`<home>/tools/litellm`, about 750 MB): its
proxy pins versions of FastAPI, pydantic and openai that lorafleet's own environment must not be bound to.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from lorafleet.core import paths

VERSION = "1.108.7"  # the version measured; another may be passed as --litellm PATH to its `litellm` executable
READY_TIMEOUT_S = 180


def venv_dir() -> Path:
    return paths.home() / "tools" / "litellm"


def ensure_installed(venv: Path | None = None) -> Path:
    """The `litellm` executable, installed into `venv` (default venv_dir()) when it is not there yet."""
    venv = venv or venv_dir()
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    print(f"==> installing litellm[proxy]=={VERSION} into {venv} (once; a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--progress-bar", "on", "--disable-pip-version-check"]
    subprocess.run([*pip, f"litellm[proxy]=={VERSION}"], check=True)
    return exe


def config_yaml(model: str, engine_url: str) -> str:
    """One model routed to a vLLM engine. `hosted_vllm/` passes vLLM's extensions (ignore_eos, min_tokens) on, so
    every path is asked for the same number of output tokens."""
    return (
        "model_list:\n"
        f"  - model_name: {model}\n"
        "    litellm_params:\n"
        f"      model: hosted_vllm/{model}\n"
        f"      api_base: {engine_url}/v1\n"
        "      api_key: none\n"
    )


@contextlib.contextmanager
def running_litellm(exe: Path, model: str, engine_url: str, port: int, work: Path) -> Iterator[tuple[str, str, int]]:
    """Start the proxy (one worker, no database) and yield (its URL, its master key, its pid)."""
    cfg = work / "litellm.yaml"
    cfg.write_text(config_yaml(model, engine_url))
    key = "sk-" + secrets.token_hex(32)  # it refuses to start without a strong one
    # Offline and quiet: without these it fetches a model price map from GitHub at start and phones home.
    env = {**os.environ, "LITELLM_MASTER_KEY": key, "LITELLM_LOG": "ERROR"}
    env |= {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False"}
    log = (work / "litellm.log").open("wb")
    cmd = [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, work / "litellm.log")
        yield url, key, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"litellm exited with {proc.returncode} at start; its log: {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health/liveliness", timeout=2).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"litellm did not answer {url}/health/liveliness in {READY_TIMEOUT_S} s; its log: {log}")
