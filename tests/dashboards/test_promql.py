"""Variable filling, query extraction and scrape-config rewriting (no Prometheus needed)."""

from __future__ import annotations

import pytest

from dashboards.boards import all_dashboards
from dashboards.localprom import JOBS, scrape_config, split_metrics_url
from dashboards.promql import dashboard_queries, fill, panel_queries, variable_queries


@pytest.mark.parametrize(
    "expr,values,want",
    [
        ('x{tenant=~"$tenant"}', {"tenant": ".*"}, 'x{tenant=~".*"}'),
        ("rate(x[$__rate_interval])", {"__rate_interval": "1m"}, "rate(x[1m])"),
        ('x{le=~"${ttft_slo}|${ttft_slo}.0"}', {"ttft_slo": "1"}, 'x{le=~"1|1.0"}'),
        ("${model:regex}", {"model": "a|b"}, "a|b"),
        ("increase(x[$__range]) / $__range_s", {"__range": "10m", "__range_s": "600"}, "increase(x[10m]) / 600"),
    ],
)
def test_fill(expr, values, want):
    assert fill(expr, values) == want


def test_fill_refuses_an_unknown_variable():
    with pytest.raises(KeyError, match=r"\$tenant"):
        fill('x{tenant=~"$tenant"}', {})


def test_queries_cover_every_target_and_variable():
    boards = list(all_dashboards().values())
    targets = sum(len(p.get("targets", [])) for b in boards for p in b["panels"])
    variables = sum(v["type"] == "query" for b in boards for v in b["templating"]["list"])
    assert len(panel_queries(boards)) == targets
    assert len(variable_queries(boards)) == variables
    filled = dashboard_queries(boards)
    assert len(filled) == targets + variables
    assert not [e for e in filled.values() if "$" in e], "unfilled variable left in a query"


@pytest.mark.parametrize(
    "url,want",
    [
        ("http://127.0.0.1:8101/metrics", ("127.0.0.1:8101", "/metrics")),
        ("http://127.0.0.1:8080", ("127.0.0.1:8080", "/metrics")),
        ("localhost:9100/custom", ("localhost:9100", "/custom")),
    ],
)
def test_split_metrics_url(url, want):
    assert split_metrics_url(url) == want


def test_split_metrics_url_needs_a_port():
    with pytest.raises(ValueError, match="port"):
        split_metrics_url("http://127.0.0.1/metrics")


def test_scrape_config_swaps_targets_and_keeps_rules():
    config = scrape_config(
        {"lorafleet-gateway": ["http://127.0.0.1:5000"], "vllm": ["http://127.0.0.1:5001/metrics"]},
        scrape_interval="1s",
    )
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"lorafleet-gateway", "vllm"}  # the job without targets is dropped
    assert jobs["lorafleet-gateway"]["static_configs"] == [{"targets": ["127.0.0.1:5000"]}]
    assert jobs["vllm"]["metric_relabel_configs"], "the vllm_ -> vllm: rename must survive"
    assert config["global"]["scrape_interval"] == "1s"
    assert all(r.startswith("/") for r in config["rule_files"])


def test_scrape_config_rejects_an_unknown_job():
    with pytest.raises(ValueError, match="unknown scrape jobs"):
        scrape_config({"gateway": ["http://127.0.0.1:1/metrics"]})
    assert "lorafleet-gateway" in JOBS
