"""promtool: the scrape config and rules are valid, every alert fires when it should and only then."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from dashboards.boards import DEFAULT_TTFT_SLO, SLO_BUCKETS, all_dashboards
from dashboards.localprom import PROM_DIR
from dashboards.promql import BUILTINS, fill, panel_queries, variable_defaults
from tests.dashboards.conftest import require

RULES = sorted((PROM_DIR / "rules").glob("*.yml"))
ALERT_TESTS = sorted((PROM_DIR / "tests").glob("*.yml"))


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([require("promtool"), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_check_config():
    r = promtool("check", "config", str(PROM_DIR / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(RULES)} rule files found" in r.stdout + r.stderr


def test_check_rules():
    r = promtool("check", "rules", *map(str, RULES))
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_unit_tests_pass():
    r = promtool("test", "rules", *map(str, ALERT_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr


def _alert_names() -> list[str]:
    groups = yaml.safe_load((PROM_DIR / "rules" / "alerts.yml").read_text())["groups"]
    return [r["alert"] for g in groups for r in g["rules"] if "alert" in r]


@pytest.mark.parametrize("alert", _alert_names())
def test_every_alert_is_tested_firing_and_silent(alert):
    firing = silent = False
    for path in ALERT_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                if t["alertname"] == alert:
                    firing |= bool(t.get("exp_alerts"))
                    silent |= not t.get("exp_alerts")
    assert firing, f"no test where {alert} fires"
    assert silent, f"no test where {alert} stays silent"


def test_broken_alert_rule_fails_its_unit_test(tmp_path):
    """The unit tests have teeth: the quota alert at a 0.99 threshold must fail them."""
    rules = tmp_path / "rules"
    rules.mkdir()
    for path in RULES:
        (rules / path.name).write_text(
            path.read_text().replace("lorafleet_quota_utilization > 0.9", "lorafleet_quota_utilization > 0.99")
        )
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "alerts_test.yml").write_text(ALERT_TESTS[0].read_text())
    r = promtool("test", "rules", str(tests / "alerts_test.yml"))
    assert r.returncode != 0 and "LorafleetTenantNearQuota" in r.stdout + r.stderr


def test_dashboard_slo_matches_the_recorded_slo():
    recording = (PROM_DIR / "rules" / "recording.yml").read_text()
    les = set(re.findall(r'le=~"([^"|]+)\|', recording))
    assert les == {DEFAULT_TTFT_SLO}, "the burn-rate rules and the latency dashboard must use the same SLO bucket"
    assert DEFAULT_TTFT_SLO in SLO_BUCKETS


# Panels whose query must read 0 (not "No data") on a healthy system where the counter has no series yet.
ZERO_FALLBACKS = [
    ("lorafleet-latency", "Server errors (time range)", "{}"),
    ("lorafleet-latency", "Rate-limited (time range)", "{}"),
    ("lorafleet-latency", "Error rate by tenant (5xx share)", '{tenant="acme"}'),
    ("lorafleet-fleet", "Rate-limit rejections per second", "{}"),
    ("lorafleet-fleet", "Adapter load failures (time range)", "{}"),
]


def test_zero_fallbacks_read_zero_when_nothing_failed(tmp_path):
    boards = {b["uid"]: b for b in all_dashboards().values()}
    cases = []
    for uid, title, labels in ZERO_FALLBACKS:
        (query,) = [q for q in panel_queries([boards[uid]]) if q.title == title]
        expr = fill(query.expr, {**BUILTINS, **variable_defaults(boards[uid]), "__rate_interval": "5m"})
        cases.append({"expr": expr, "eval_time": "10m", "exp_samples": [{"labels": labels, "value": 0}]})
    test = {
        "rule_files": [],
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'lorafleet_requests_total{tenant="acme",model="m",code="200"}', "values": "0+10x20"},
                    {"series": 'lorafleet_adapter_loads_total{adapter="a",result="ok"}', "values": "1x20"},
                ],
                "promql_expr_test": cases,
            }
        ],
    }
    path = tmp_path / "zero_test.yml"
    path.write_text(yaml.safe_dump(test))
    r = promtool("test", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
