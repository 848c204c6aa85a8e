"""Placement on two real vLLM engines: a hot adapter's concurrent requests spill onto the second replica with
bounded-load placement, and stay on one with pinned; what each engine itself says it holds is the proof."""

from __future__ import annotations

import threading

import httpx
import pytest

from lorafleet.core.net import free_port
from lorafleet.stack import one_engine_config, running_stack
from serve.config import AdapterConfig, EngineConfig, GatewayConfig, ServeConfig, TenantConfig
from serve.gateway.app import ServerThread, create_app
from serve.gateway.tenants import hash_key
from tests.serve.conftest import make_random_adapter

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
KEY = "sk-live-placement"


@pytest.fixture(scope="module")
def second_engine(smollm2_path, tmp_path_factory):
    """A second replica of the session engine's model (the session engine is the first)."""
    # eager: placement does not depend on the kernels, and compiling costs ~85 s more at start
    cfg = one_engine_config(str(smollm2_path), tmp_path_factory.mktemp("vllm-2"), name="smollm2-b", compile_lora=False)
    with running_stack(cfg, "none", ready_timeout=600) as stack:
        yield stack.engines["smollm2-b"]


@pytest.fixture(scope="module")
def adapters(smollm2_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("placement-adapters")
    for seed, name in enumerate(("spill-hot", "pinned-hot")):
        make_random_adapter(smollm2_path, root / name, seed=40 + seed)
    return root


def gateway(urls: list[str], root, adapter: str, placement: str, smollm2_path) -> ServerThread:
    engine = EngineConfig(name="smollm2", model=str(smollm2_path), served_name="smollm2-135m-instruct", urls=urls)
    cfg = ServeConfig(
        gateway=GatewayConfig(port=free_port(), placement=placement, health_interval_s=0.5),
        adapters_root=str(root),
        engines=[engine],
        adapters=[AdapterConfig(name=adapter, path=adapter, base=engine.public_name)],
        tenants=[TenantConfig(name="acme", api_key_hashes=[hash_key(KEY)])],
    )
    return ServerThread(create_app(cfg), port=cfg.gateway.port).start()


def burst(gw: ServerThread, model: str, n: int = 8) -> list[int]:
    """n streaming requests at once: more than one replica's share under bounded-load placement."""
    codes: list[int] = []
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 24,
            "stream": True, "ignore_eos": True}  # fmt: skip

    def one() -> None:
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, timeout=300,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:  # fmt: skip
            r.read()
            codes.append(r.status_code)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


def holders(urls: list[str], adapter: str) -> list[str]:
    """The engines whose own /v1/models lists a version of `adapter` (what vLLM itself has loaded)."""
    out = []
    for url in urls:
        ids = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]]
        if any(i.startswith(adapter + "@") for i in ids):
            out.append(url)
    return out


def test_a_hot_adapter_spills_onto_the_second_engine_and_pinned_does_not(
    vllm_engine, second_engine, adapters, smollm2_path
):
    urls = [vllm_engine.spec.url, second_engine.spec.url]
    for placement, adapter, expected in (("bounded", "spill-hot", 2), ("pinned", "pinned-hot", 1)):
        gw = gateway(urls, adapters, adapter, placement, smollm2_path)
        try:
            assert burst(gw, adapter) == [200] * 8
            assert len(holders(urls, adapter)) == expected, placement
        finally:
            gw.stop()
