"""Shared fixtures. The vLLM engine is started once per session: on 2 CPU cores each start costs 60-90 s."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(model_id: str) -> Path:
    path = MODELS / model_id
    if not (path / "lorafleet.json").is_file():
        pytest.fail(f"model {model_id} is not imported: run `make models` (lorafleet models pull)")
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    return _model("tiny-random-llama")


@pytest.fixture(scope="session")
def vllm_engine(smollm2_path, tmp_path_factory):
    """One real vLLM (CPU) engine serving SmolLM2 with LoRA enabled and runtime adapter loading on."""
    from serve.engine import Engine, EngineSpec

    log = tmp_path_factory.mktemp("vllm") / "engine.log"
    spec = EngineSpec(name="smollm2", model=smollm2_path, port=free_port(), served_name="smollm2-135m-instruct")
    engine = Engine(spec, log).start()
    try:
        engine.wait_ready(timeout=600)
        print(f"\nvLLM engine ready in {engine.ready_seconds:.1f} s (log: {log})")
        yield engine
    finally:
        engine.stop()
