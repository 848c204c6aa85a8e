"""The fakes export exactly what the real exporters do, and the dashboards ask only for series that exist.

If serve/gateway/metrics.py, loadtest/metrics.py or vLLM rename a metric or a label, these fail before any dashboard goes
blank in production.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from dashboards.boards import all_dashboards
from dashboards.localprom import PROM_DIR
from dashboards.promql import panel_queries
from tests.dashboards import fake_exporters


def schema(obj: object) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Metric name -> (type, label names) for every prometheus_client metric attribute of an exporter object."""
    metrics = [v for v in vars(obj).values() if isinstance(v, MetricWrapperBase)]
    return {m._name: (m._type, tuple(m._labelnames)) for m in metrics}


def test_fake_gateway_matches_serve_metrics():
    from serve.gateway.metrics import Metrics

    assert schema(fake_exporters.GatewayMetrics()) == schema(Metrics())


def test_fake_harness_matches_loadtest_metrics():
    from loadtest.metrics import BenchMetrics

    real = BenchMetrics()
    try:
        assert schema(fake_exporters.BenchMetrics()) == schema(real)
    finally:
        real.close()


def _vllm_metric_names() -> set[str]:
    spec = importlib.util.find_spec("vllm")  # locate without importing (importing vLLM takes seconds)
    if spec is None or spec.origin is None:
        pytest.skip("vllm is not installed")
    loggers = Path(spec.origin).parent / "v1" / "metrics" / "loggers.py"
    return set(re.findall(r'name="(vllm:\w+)"', loggers.read_text()))


def _queried_vllm_metrics() -> set[str]:
    text = "\n".join(q.expr for q in panel_queries(all_dashboards().values()))
    text += "\n".join(p.read_text() for p in (PROM_DIR / "rules").glob("*.yml"))
    return {re.sub(r"_(total|bucket|sum|count)$", "", m) for m in re.findall(r"vllm:\w+", text)}


def test_dashboards_use_only_metrics_the_installed_vllm_exports():
    queried = _queried_vllm_metrics()
    assert "vllm:kv_cache_usage_perc" in queried
    assert queried <= _vllm_metric_names(), f"not exported by vLLM: {sorted(queried - _vllm_metric_names())}"


def test_fake_engine_exports_what_the_dashboards_query():
    exported = set(schema(fake_exporters.EngineMetrics("m")))
    assert _queried_vllm_metrics() <= exported
