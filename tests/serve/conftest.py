"""Helpers for the gateway tests: configs built in code, a fake engine, random LoRA adapters."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from serve.config import ServeConfig, parse_config
from serve.gateway.tenants import hash_key
from tests.conftest import MODELS, free_port
from tests.serve.fake_engine import FakeEngine
from train.export import random_adapter

KEYS = {name: f"sk-test-{name}" for name in ("acme", "globex", "tight", "single", "meter", "budget")}
ADMIN_KEY = "sk-test-admin"
# A question whose greedy answer ("The capital of France is Paris.") clears every rounding: SmolLM2's top-2 margin
# along it is 0.45 nats; without "Answer in one word." it is 0.10, which bf16 rounding flips (tests/conftest.py).
CAPITAL_QUESTION = "What is the capital of France? Answer in one word."


def tenant(name: str, models: list[str], **limits) -> dict:
    return {"name": name, "api_key_hashes": [hash_key(KEYS[name])], "models": models, "limits": limits}


def config(
    engines: list[dict],
    tenants: list[dict],
    adapters: list[dict] | None = None,
    adapters_root: Path | None = None,
    prices: dict | None = None,
    **gateway,
) -> ServeConfig:
    data = {
        "adapters_root": str(adapters_root) if adapters_root else None,
        "gateway": {
            "admin_key_hash": hash_key(ADMIN_KEY),
            "connect_timeout_s": 1,
            "health_interval_s": 0.5,
            **gateway,
        },
        "engines": engines,
        "adapters": adapters or [],
        "tenants": tenants,
        "prices": prices or {},
    }
    return parse_config(data)


def make_random_adapter(base_path: Path, out_dir: Path, seed: int = 0, r: int = 8) -> Path:
    """A random LoRA adapter strong enough (std 0.2) to change the model's answers (tests/e2e/test_vllm_smoke.py)."""
    return random_adapter(base_path, out_dir, seed=seed, r=r, std=0.2)


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`, from a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(got.get(k) == str(v) for k, v in labels.items()):
            total += float(m.group(4))
    return total


def scrape(url: str, name: str, **labels) -> float:
    return metric(httpx.get(f"{url}/metrics", timeout=10).text, name, **labels)


@pytest.fixture(scope="session")
def tiny_adapter_root(tmp_path_factory) -> Path:
    """An adapters root holding one random adapter for tiny-random-llama (`tiny-a`), made once."""
    root = tmp_path_factory.mktemp("adapters")
    make_random_adapter(MODELS / "tiny-random-llama", root / "tiny-a")
    return root


@pytest.fixture
def fake_engine():
    engine = FakeEngine(free_port()).start()
    yield engine
    engine.stop()
