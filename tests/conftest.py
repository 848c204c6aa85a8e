"""Shared fixtures. The vLLM engine is started once per session: on 2 CPU cores each start costs 60-90 s."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorafleet.core.net import free_port
from lorafleet.stack import one_engine_config, running_stack
from serve.config import (
    AdapterConfig,
    EngineConfig,
    GatewayConfig,
    Limits,
    Price,
    ServeConfig,
    TenantConfig,
    parse_config,
)
from serve.gateway.tenants import hash_key

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
    # float32: tests check greedy answers, and bf16 rounding decides near-ties. On CPUs with AVX512-BF16 vLLM serves
    # SmolLM2 in bf16; its compiled bf16 graph answered "What is the capital of France?" with "L'Étoile, ..." because
    # the first token is a near-tie ("The" -1.86 vs "L" -1.96 nats in float32 HF), while eager bf16 and float32 say
    # "The capital of France is Paris." float32 gives every machine the same answers.
    cfg = one_engine_config(
        str(smollm2_path), tmp_path_factory.mktemp("vllm"), name="smollm2", extra_args=["--dtype", "float32"]
    )
    # Dev mode adds vLLM's /pause and /resume: a test holds requests in the engine to release them in one step.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_SERVER_DEV_MODE", "1")
        with running_stack(cfg, "none", ready_timeout=600) as stack:
            engine = stack.engines["smollm2"]
            print(f"\nvLLM engine ready in {engine.ready_seconds:.1f} s (log: {engine.log_path})")
            yield engine


LIVE_KEYS = {"acme": "sk-live-acme", "globex": "sk-live-globex"}
LIVE_ADAPTERS = {"acme": "live-acme", "globex": "live-globex"}


def live_config(engine_url: str, smollm2_path: Path, root: Path) -> ServeConfig:
    """Two tenants over the shared engine (external: the stack starts nothing), each with its own adapter."""
    base = "smollm2-135m-instruct"
    engine = EngineConfig(
        name="smollm2", model=str(smollm2_path), served_name=base, urls=[engine_url], price_usd_per_hour=0.1
    )
    # generous limits: never hit, but quota utilisation is exported for the dashboards
    limits = Limits(rpm=100_000, tpm=10_000_000, concurrency=64)
    tenants = [
        TenantConfig(name=t, api_key_hashes=[hash_key(key)], models=[base, LIVE_ADAPTERS[t]], limits=limits)
        for t, key in LIVE_KEYS.items()
    ]
    cfg = ServeConfig(
        gateway=GatewayConfig(port=free_port()),
        adapters_root=str(root),
        engines=[engine],
        adapters=[AdapterConfig(name=a, path=a, base=base) for a in LIVE_ADAPTERS.values()],
        tenants=tenants,
        prices={base: Price(input=0.03, output=0.14)},
    )
    return parse_config(cfg.model_dump(), "live gateway config")


@pytest.fixture(scope="session")
def live_gateway(vllm_engine, smollm2_path, tmp_path_factory):
    """The real gateway (in this process) over the shared vLLM engine: two tenants, each with a random adapter."""
    from tests.serve.conftest import make_random_adapter  # here: tests/serve/conftest.py imports this module

    root = tmp_path_factory.mktemp("live-adapters")
    for seed, name in enumerate(LIVE_ADAPTERS.values()):
        make_random_adapter(smollm2_path, root / name, seed=seed)
    with running_stack(live_config(vllm_engine.spec.url, smollm2_path, root), "thread") as stack:
        yield stack.server


def live_bench_config(
    gateway_url: str, out_dir: Path, metrics_port: int = 0, seconds: float = 15, requests: int | None = None
) -> dict:
    """A short harness run through the gateway: the two tenants' adapters as a 70/30 mix, and the base model.

    `requests` (instead of `seconds`) fixes how many requests each target gets: the seeded mix then picks the same
    adapters on a slow machine as on a fast one."""
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
            **({"num_requests": requests} if requests else {"duration_s": seconds}),
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


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the session (in a folder the `postgres` user may enter, not pytest's)."""
    import shutil
    import tempfile

    from lorafleet.services import PostgresServer

    root = Path(tempfile.mkdtemp(prefix="lorafleet-pg-"))
    root.chmod(0o711)  # mkdtemp makes it 0700: the `postgres` user must be able to pass through
    server = PostgresServer(root / "pg").start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real Redis server for the session; tests that share it flush it first (`redis`)."""
    from lorafleet.services import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis(redis_server):
    """The session's Redis, emptied."""
    redis_server.flush()
    return redis_server


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A fresh, empty database of each backend the store supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres").fresh_database(f"t{abs(hash(request.node.nodeid)) % 10**9}")
