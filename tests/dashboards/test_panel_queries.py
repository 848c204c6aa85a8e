"""Every dashboard query returns data from a real Prometheus: against the FAKE exporters now, the live stack later.

Both tests go through `assert_dashboards_return_data()`, i.e. the same `dashboards.promql.check_queries()`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from dashboards.boards import all_dashboards
from dashboards.localprom import LocalPrometheus, scrape_config
from dashboards.promql import BUILTINS, CheckResult, check_queries, dashboard_queries, instant_query, variable_defaults
from dashboards.render import panel_series, render_all
from tests.conftest import free_port
from tests.dashboards.conftest import require
from tests.dashboards.fake_exporters import PRICE_PER_1M, SLO_ATTAINMENT, UPSTREAMS


def assert_dashboards_return_data(
    prom_url: str, timeout: float = 60, keep_polling: Callable[[], bool] | None = None
) -> CheckResult:
    result = check_queries(prom_url, dashboard_queries(all_dashboards().values()), timeout, keep_polling=keep_polling)
    assert result.ok, "dashboard queries without data:\n" + result.report()
    return result


@pytest.mark.slow
def test_every_query_returns_data_from_fake_exporters(fake_stack):
    prom_url, _ = fake_stack
    result = assert_dashboards_return_data(prom_url)
    assert len(result.exprs) > 50


def _values(prom_url: str, expr: str, label: str, timeout: float = 60) -> dict[str, float]:
    """`label` value -> sample value of an instant query, polled until it answers.

    Each rule group is evaluated on its own schedule, so the SLO group may not have run yet when the cost rules
    the dashboards read already have (CI stop 24 read an empty miss ratio).
    """
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=10) as c:
        while True:
            found = {s["metric"].get(label, ""): float(s["value"][1]) for s in instant_query(c, prom_url, expr)}
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.5)


@pytest.mark.slow
def test_recording_rules_compute_the_contracted_figures(fake_stack):
    """$ per 1M tokens per model recovers the fake's price list; fleet instance cost counts each engine once."""
    prom_url, _ = fake_stack
    assert_dashboards_return_data(prom_url)  # also waits until the rules have been evaluated
    per_1m = _values(prom_url, "lorafleet:cost_usd_per_1m_tokens:by_model", "model")
    assert per_1m.keys() == PRICE_PER_1M.keys()
    for model, price in PRICE_PER_1M.items():
        assert per_1m[model] == pytest.approx(price, rel=1e-6)
    fleet = _values(prom_url, "lorafleet:instance_cost_usd_per_hour:fleet", "")
    assert fleet[""] == pytest.approx(sum(usd for _, _, usd in UPSTREAMS.values()))
    miss = _values(prom_url, "lorafleet:ttft_slo_miss_ratio:rate5m", "model")
    assert miss and all(v == pytest.approx(1 - SLO_ATTAINMENT, abs=1e-9) for v in miss.values())


@pytest.mark.slow
def test_render_draws_every_timeseries_panel(fake_stack, tmp_path):
    prom_url, _ = fake_stack
    assert_dashboards_return_data(prom_url)
    boards = all_dashboards()
    end = time.time()
    with httpx.Client(timeout=10) as c:
        for board in boards.values():
            for panel in (p for p in board["panels"] if p["type"] == "timeseries"):
                values = {**BUILTINS, **variable_defaults(board), "__range": "1m"}
                assert panel_series(c, prom_url, panel, values, end - 60, end), panel["title"]
    paths = render_all(prom_url, tmp_path, minutes=1, only=["fleet", "latency"])
    assert [p.name for p in paths] == ["dashboard-latency.png", "dashboard-fleet.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 20_000


def _live_stack(request) -> dict:
    try:
        return request.getfixturevalue("live_stack")
    except pytest.FixtureLookupError:
        pytest.skip("needs the `live_stack` fixture (gateway + engines + harness) from tests/conftest.py")


@pytest.mark.vllm
@pytest.mark.slow
def test_every_query_returns_data_from_live_stack(request, tmp_path: Path):
    """A real gateway, vLLM engine(s) and harness under a short load: every panel of every dashboard has data."""
    require("prometheus")
    stack = _live_stack(request)
    targets = {
        "lorafleet-gateway": [stack["gateway_url"].rstrip("/") + "/metrics"],
        "vllm": list(stack["engine_metrics_urls"]),
        "lorafleet-bench": [stack["bench_metrics_url"]],
    }
    config = scrape_config(targets, scrape_interval="1s", evaluation_interval="1s")
    errors: list[BaseException] = []

    def load() -> None:
        try:
            stack["run_load"]()
        except BaseException as e:  # re-raised in the test thread below
            errors.append(e)

    with LocalPrometheus(config, tmp_path, free_port()) as prom:
        _wait_for_targets(prom.url, {"lorafleet-gateway", "vllm"})
        runner = threading.Thread(target=load, name="live-load")
        runner.start()
        try:
            # Queries are polled while the load runs: the harness's gauges exist only while it is running.
            result = check_queries(
                prom.url, dashboard_queries(all_dashboards().values()), timeout=90, keep_polling=runner.is_alive
            )
        finally:
            runner.join()
    if errors:
        raise errors[0]
    assert result.ok, "dashboard queries without data on the live stack:\n" + result.report()


def _wait_for_targets(prom_url: str, jobs: set[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    up: set[str] = set()
    while time.monotonic() < deadline:
        active = httpx.get(f"{prom_url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        up = {t["labels"]["job"] for t in active if t["health"] == "up"}
        if jobs <= up:
            return
        time.sleep(0.5)
    raise AssertionError(f"scrape targets not up after {timeout:.0f} s: want {sorted(jobs)}, up {sorted(up)}")
