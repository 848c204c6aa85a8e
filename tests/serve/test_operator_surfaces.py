"""/metrics, /engines/*/metrics and /health: closed with a metrics key, scraped with it by a real Prometheus."""

from __future__ import annotations

import httpx
import pytest

from dashboards.localprom import LocalPrometheus, scrape_config
from serve.config import ServeConfig
from serve.engines.deploy import engine_specs
from serve.gateway.app import ServerThread, create_app
from serve.gateway.tenants import hash_key
from tests.conftest import MODELS, free_port
from tests.dashboards.conftest import require
from tests.serve.conftest import ADMIN_KEY, KEYS, config, tenant
from tests.serve.fake_engine import wait_for

METRICS_KEY = "sk-test-metrics"


def bearer(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.fixture
def gw(fake_engine):
    cfg = config(
        [{"name": "fake", "model": str(MODELS / "tiny-random-llama"), "served_name": "fake-base",
          "urls": [fake_engine.url]}],
        [tenant("acme", ["*"])],
        metrics_key_hash=hash_key(METRICS_KEY),
    )  # fmt: skip
    server = ServerThread(create_app(cfg), port=free_port()).start()
    yield server
    server.stop()


@pytest.mark.parametrize("path", ["/metrics", "/engines/fake/metrics"])
@pytest.mark.parametrize(
    "key,status", [(None, 401), ("wrong", 401), (KEYS["acme"], 401), (METRICS_KEY, 200), (ADMIN_KEY, 200)]
)
def test_metrics_want_the_metrics_or_admin_key(gw, path, key, status):
    r = httpx.get(gw.url + path, headers=bearer(key))
    assert r.status_code == status, r.text
    if status == 401:
        assert r.json()["error"]["code"] == "invalid_api_key" and "lorafleet" not in r.text  # no series leak


def test_health_is_minimal_for_anyone_and_detailed_for_operators(gw):
    assert httpx.get(f"{gw.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{gw.url}/health", headers=bearer(KEYS["acme"])).json() == {"status": "ok"}
    for key in (METRICS_KEY, ADMIN_KEY):
        assert wait_for(lambda k=key: httpx.get(f"{gw.url}/health", headers=bearer(k)).json()["upstreams"]["fake"])


def test_metrics_stay_open_without_a_metrics_key(fake_engine):
    cfg = config([{"name": "fake", "model": str(MODELS / "tiny-random-llama"), "urls": [fake_engine.url]}], [])
    server = ServerThread(create_app(cfg), port=free_port()).start()
    try:
        assert httpx.get(f"{server.url}/metrics").status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize("token,up", [(METRICS_KEY, 1), ("wrong", 0)])
def test_prometheus_scrapes_the_gateway_with_the_metrics_key(gw, tmp_path, token, up):
    require("prometheus")
    cfg = scrape_config({"lorafleet-gateway": [f"{gw.url}/metrics"]}, scrape_interval="1s", gateway_token=token)
    with LocalPrometheus(cfg, tmp_path, free_port()) as prom:

        def up_value() -> float | None:
            result = httpx.get(f"{prom.url}/api/v1/query", params={"query": "up"}).json()["data"]["result"]
            return float(result[0]["value"][1]) if result else None

        assert wait_for(lambda: up_value() is not None, timeout=30)
        assert up_value() == up
        if up:
            series = httpx.get(f"{prom.url}/api/v1/query", params={"query": "lorafleet_upstream_up"}).json()
            assert series["data"]["result"], "scraped, but no gateway series arrived"


def test_engines_listen_on_loopback_unless_the_config_says_otherwise():
    engine = {"name": "e", "model": str(MODELS / "tiny-random-llama")}
    default = ServeConfig.model_validate({"engines": [engine]})
    assert engine_specs(default)["e"].host == "127.0.0.1" and default.engines[0].replica_urls() == [
        "http://127.0.0.1:8001"
    ]
    everywhere = ServeConfig.model_validate({"engines": [{**engine, "host": "0.0.0.0"}]})
    spec = engine_specs(everywhere)["e"]
    assert spec.host == "0.0.0.0" and "0.0.0.0" in spec.command()
    assert everywhere.engines[0].replica_urls() == ["http://127.0.0.1:8001"]  # the gateway still calls it locally
