from __future__ import annotations

import copy

import pytest

from serve.config import ConfigError, load_config, parse_config
from serve.gateway.tenants import hash_key

H1, H2 = hash_key("k1"), hash_key("k2")
GOOD = {
    "engines": [
        {"name": "small", "model": "smollm2-135m-instruct", "port": 8001},
        {"name": "big", "model": "gemma-3-270m", "port": 8002, "enable_lora": False},
    ],
    "adapters": [{"name": "manifest", "path": "manifest", "base": "smollm2-135m-instruct"}],
    "tenants": [
        {"name": "acme", "api_key_hashes": [H1], "models": ["manifest"]},
        {"name": "globex", "api_key_hashes": [H2], "limits": {"rpm": 10}},
    ],
    "prices": {"smollm2-135m-instruct": {"input": 1.0, "output": 2.0}},
}


def with_change(path: str, value) -> dict:
    """GOOD with one value set, by a dotted path whose numeric parts index lists."""
    data = copy.deepcopy(GOOD)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = data
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return data


def test_embedded_default_config_is_valid():
    cfg = load_config()
    assert [e.public_name for e in cfg.engines] == ["smollm2-135m-instruct", "gemma-3-270m"]
    assert {a.name for a in cfg.adapters} == {"manifest", "contract", "drugs"}
    assert {t.name for t in cfg.tenants} == {"acme", "globex", "initech"}
    assert cfg.gateway.port == 8080 and cfg.gateway.admin_key_hash.startswith("sha256:")


def test_demo_keys_documented_in_default_match_their_hashes():
    cfg = load_config()
    for t in cfg.tenants:
        assert hash_key(f"sk-{t.name}-demo") in t.api_key_hashes
    assert cfg.gateway.admin_key_hash == hash_key("sk-admin-demo")


@pytest.mark.parametrize(
    "path,value,expected",
    [
        ("tenants.1.limits.rpm", 0, "tenants[1].limits.rpm: must be > 0"),
        ("tenants.0.limits", {"tpm": -5}, "tenants[0].limits.tpm: must be > 0"),
        ("engines.0.max_lora_rank", 12, "engines[0].max_lora_rank: must be one of"),
        ("engines.0.portt", 1, "engines[0].portt: unknown field"),
        ("engines", KeyError, "engines: is required"),
        ("engines", [], "engines: needs at least 1"),
        ("engines.0.name", "a b", "engines[0].name: 'a b' is not a valid name"),
        ("engines.1.port", 8001, "engines[1].port: port 8001 is already used by engines[0].port"),
        ("engines.0.urls", ["localhost:8001"], "engines[0].urls: 'localhost:8001' must be an engine root"),
        ("adapters.0.base", "nope", "adapters[0].base: unknown base model 'nope'"),
        ("adapters.0.base", "gemma-3-270m", "adapters[0].base: engine 'big' has enable_lora: false"),
        ("adapters.0.mode", "fused", "adapters[0].mode: must be 'lora' or 'merged'"),
        ("adapters.0.mode", "merged", "adapters[0]: a merged adapter needs exactly one of port"),
        ("adapters.0.name", "gemma-3-270m", "adapters[0].name: model name 'gemma-3-270m' is already used"),
        ("tenants.0.api_key_hashes", ["plain-key"], "tenants[0].api_key_hashes: 'plain-key' must look like sha256:"),
        ("tenants.0.api_key_hashes", [], "tenants[0].api_key_hashes: needs at least 1"),
        ("tenants.1.api_key_hashes", [H1], "tenants[1].api_key_hashes[0]: key hash"),
        ("tenants.1.name", "acme", "tenants[1].name: tenant name 'acme' is already used"),
        ("tenants.0.models", ["manifest", "ghost"], "tenants[0].models[1]: unknown model 'ghost'"),
        ("prices.ghost", {"input": 1}, "prices.ghost: unknown model"),
        ("prices.smollm2-135m-instruct", {"input": -1}, "prices.smollm2-135m-instruct.input: must be >= 0"),
        ("gateway", {"admin_key_hash": "xyz"}, "gateway.admin_key_hash: must look like sha256:"),
        ("gateway", {"port": 0}, "gateway.port: must be > 0"),
        ("gateway", {"placement": "random"}, "gateway.placement: must be 'bounded' or 'pinned'"),
        ("gateway", {"load_factor": 1.0}, "gateway.load_factor: must be > 1"),
        ("engines.0.dns", "no-port", "engines[0].dns: 'no-port' must be HOST:PORT"),
        ("engines.0.cpu_bind", ["0", "1"], "engines[0].cpu_bind: one entry per replica (1), got 2"),
        ("adapters.0.replicas", 2, "adapters[0]: port/url/replicas only apply to mode: merged"),
    ],
)
def test_config_errors_name_the_field(path, value, expected):
    with pytest.raises(ConfigError) as e:
        parse_config(with_change(path, value))
    assert expected in str(e.value)


def test_every_problem_is_reported_at_once():
    data = with_change("tenants.1.limits.rpm", 0)
    data["engines"][0]["max_loras"] = 0
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert "tenants[1].limits.rpm" in str(e.value) and "engines[0].max_loras" in str(e.value)


def test_replicas_get_consecutive_ports_and_distinct_names():
    data = with_change("engines.0.replicas", 2)
    data["engines"][1]["port"] = 8003
    cfg = parse_config(data)
    small = cfg.engines[0]
    assert small.replica_urls() == ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    assert small.replica_names() == ["small-0", "small-1"]


def test_replica_ports_may_not_collide_with_other_engines():
    data = with_change("engines.0.replicas", 2)  # small takes 8001 and 8002; big is on 8002
    with pytest.raises(ConfigError, match=r"engines\[1\].port: port 8002 is already used"):
        parse_config(data)


def test_prices_tenant_override_then_model_then_base_then_free():
    data = copy.deepcopy(GOOD)
    data["tenants"][1]["prices"] = {"manifest": {"input": 9.0, "output": 9.0}}
    cfg = parse_config(data)
    acme, globex = cfg.tenants
    assert cfg.price("manifest", "smollm2-135m-instruct", globex).input == 9.0
    assert cfg.price("manifest", "smollm2-135m-instruct", acme).input == 1.0  # from its base
    assert cfg.price("gemma-3-270m", None, acme).input == 0.0
    assert cfg.price("smollm2-135m-instruct").cost(1_000_000, 500_000) == pytest.approx(2.0)


@pytest.mark.parametrize("text,expected", [("engines: [", "not valid YAML"), ("- 1\n- 2", "expected a mapping")])
def test_unreadable_config_files(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
