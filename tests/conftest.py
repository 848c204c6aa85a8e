"""Shared fixtures. The vLLM engine is started once per session: on 2 CPU cores each start costs 60-90 s."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.core.net import free_port  # noqa: F401  (tests import it from here)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


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
    from serve.engines.engine import Engine, EngineSpec

    log = tmp_path_factory.mktemp("vllm") / "engine.log"
    spec = EngineSpec(name="smollm2", model=smollm2_path, port=free_port(), served_name="smollm2-135m-instruct")
    engine = Engine(spec, log).start()
    try:
        engine.wait_ready(timeout=600)
        print(f"\nvLLM engine ready in {engine.ready_seconds:.1f} s (log: {log})")
        yield engine
    finally:
        engine.stop()


LIVE_KEYS = {"acme": "sk-live-acme", "globex": "sk-live-globex"}
LIVE_ADAPTERS = {"acme": "live-acme", "globex": "live-globex"}


@pytest.fixture(scope="session")
def live_gateway(vllm_engine, smollm2_path, tmp_path_factory):
    """The real gateway over the shared vLLM engine: two tenants, each with its own random LoRA adapter."""
    from serve.config import parse_config
    from serve.gateway.app import ServerThread, create_app
    from serve.gateway.tenants import hash_key
    from tests.serve.conftest import make_random_adapter

    root = tmp_path_factory.mktemp("live-adapters")
    for seed, name in enumerate(LIVE_ADAPTERS.values()):
        make_random_adapter(smollm2_path, root / name, seed=seed)
    base = "smollm2-135m-instruct"
    cfg = parse_config(
        {
            "adapters_root": str(root),
            "engines": [
                {
                    "name": "smollm2",
                    "model": str(smollm2_path),
                    "served_name": base,
                    "urls": [vllm_engine.spec.url],
                    "price_usd_per_hour": 0.1,
                }
            ],  # fmt: skip
            "adapters": [{"name": a, "path": a, "base": base} for a in LIVE_ADAPTERS.values()],
            "tenants": [
                {
                    "name": t,
                    "api_key_hashes": [hash_key(LIVE_KEYS[t])],
                    "models": [base, LIVE_ADAPTERS[t]],
                    # generous limits: never hit, but quota utilisation is exported for the dashboards
                    "limits": {"rpm": 100_000, "tpm": 10_000_000, "concurrency": 64},
                }  # fmt: skip
                for t in LIVE_KEYS
            ],
            "prices": {base: {"input": 0.03, "output": 0.14}},
        }
    )
    server = ServerThread(create_app(cfg), port=free_port()).start()
    yield server
    server.stop()


def live_bench_config(gateway_url: str, out_dir: Path, metrics_port: int = 0, seconds: float = 15) -> dict:
    """A short harness run through the gateway: the two tenants' adapters as a 70/30 mix, and the base model."""
    base = "smollm2-135m-instruct"
    price = {"usd_per_hour": 0.1}
    mix = {LIVE_ADAPTERS["acme"]: 0.7, LIVE_ADAPTERS["globex"]: 0.3}
    keys = {LIVE_ADAPTERS[t]: LIVE_KEYS[t] for t in LIVE_KEYS}
    return {
        "targets": [
            {
                "name": "live-mix",
                "base_url": f"{gateway_url}/v1",
                "model": base,
                "api_key": LIVE_KEYS["acme"],
                "adapters": mix,
                "model_keys": keys,
                "price": price,
            },  # fmt: skip
            {
                "name": "live-base",
                "base_url": f"{gateway_url}/v1",
                "model": base,
                "api_key": LIVE_KEYS["acme"],
                "price": price,
            },  # fmt: skip
        ],
        "load": {
            "mode": "closed",
            "concurrency": 4,
            "duration_s": seconds,
            "warmup_requests": 2,
            "max_tokens": 16,
            "force_output_len": True,
        },  # fmt: skip
        "slo": {"ttft_p90_s": 5.0},
        "prompts": {"source": "synthetic", "input_tokens": 32},
        "metrics_port": metrics_port,
        "metrics_addr": "127.0.0.1",
        "output_dir": str(out_dir),
    }


@pytest.fixture(scope="session")
def live_stack(live_gateway, vllm_engine, tmp_path_factory) -> dict:
    """What the dashboards' live test scrapes: gateway, engine and a running harness, plus a way to load them."""
    import subprocess
    import sys

    import yaml

    port = free_port()
    work = tmp_path_factory.mktemp("live-bench")
    cfg_path = work / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(live_bench_config(live_gateway.url, work / "out", metrics_port=port)))

    def run_load() -> None:
        cmd = [sys.executable, "-m", "lorafleet.cli", "bench", "run", str(cfg_path)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    return {
        "gateway_url": live_gateway.url,
        "engine_metrics_urls": [f"{vllm_engine.spec.url}/metrics"],
        "bench_metrics_url": f"http://127.0.0.1:{port}/metrics",
        "run_load": run_load,
    }
