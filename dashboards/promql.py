"""Pull every PromQL query out of the dashboards, fill in Grafana's variables, and run them against Prometheus.

`check_queries()` is the one check both the fake-exporter test and the live-stack test use: a dashboard whose
panel query returns nothing on a system under load has a wrong metric name, label or rule.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

# Grafana's built-in interval variables, as a 5 s scrape and a short test window make them.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "10m", "__range_s": "600"}
_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


@dataclass(frozen=True)
class Query:
    dashboard: str  # uid
    title: str  # panel title, or "variable <name>"
    ref: str
    expr: str  # as written in the dashboard, with $variables
    instant: bool = False

    @property
    def name(self) -> str:
        return f"{self.dashboard} / {self.title} [{self.ref}]"


def panel_queries(dashboards: Iterable[dict[str, Any]]) -> list[Query]:
    out = []
    for board in dashboards:
        for panel in board["panels"]:
            for t in panel.get("targets", []):
                out.append(Query(board["uid"], panel["title"], t["refId"], t["expr"], bool(t.get("instant"))))
    return out


_LABEL_VALUES = re.compile(r"label_values\(\s*([^,\s]+)\s*,\s*(\w+)\s*\)")


def variable_queries(dashboards: Iterable[dict[str, Any]]) -> list[Query]:
    """Each `label_values(metric, label)` variable as PromQL that is non-empty iff the variable gets options."""
    out = []
    for board in dashboards:
        for var in board["templating"]["list"]:
            if var["type"] != "query":
                continue
            metric, label = _LABEL_VALUES.fullmatch(var["definition"]).groups()
            expr = f'count by({label})({{__name__="{metric}",{label}!=""}})'
            out.append(Query(board["uid"], f"variable {var['name']}", var["name"], expr, instant=True))
    return out


def variable_defaults(dashboard: dict[str, Any]) -> dict[str, str]:
    """What each variable of a dashboard expands to with its default selection ("All" -> its allValue)."""
    values = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            values[var["name"]] = var.get("allValue") or ".*"
        elif var["type"] == "custom":
            values[var["name"]] = var["current"]["value"]
    return values


def fill(expr: str, values: dict[str, str]) -> str:
    """Replace `$name` and `${name}` as Grafana would; an unknown variable is an error, not a silent blank."""

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"variable ${name} in {expr!r} has no value; known: {sorted(values)}")
        return values[name]

    return _VAR.sub(sub, expr)


def dashboard_queries(dashboards: Iterable[dict[str, Any]], overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Query name -> runnable PromQL for every panel target and query variable of the dashboards."""
    out = {}
    for board in dashboards:
        values = {**BUILTINS, **variable_defaults(board), **(overrides or {})}
        for q in panel_queries([board]) + variable_queries([board]):
            out[q.name] = fill(q.expr, values)
    return out


class PromQLError(RuntimeError):
    """Prometheus rejected a query (bad syntax, unknown function): waiting will not fix it."""


def instant_query(client: httpx.Client, prom_url: str, expr: str) -> list[dict[str, Any]]:
    r = client.get(f"{prom_url}/api/v1/query", params={"query": expr})
    body = r.json()
    if body.get("status") != "success":
        raise PromQLError(f"{body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


def range_query(
    client: httpx.Client, prom_url: str, expr: str, start: float, end: float, step: float
) -> list[dict[str, Any]]:
    r = client.get(f"{prom_url}/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step})
    body = r.json()
    if body.get("status") != "success":
        raise PromQLError(f"{body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


@dataclass
class CheckResult:
    exprs: dict[str, str]  # name -> filled PromQL
    series: dict[str, int] = field(default_factory=dict)  # name -> most series seen in one answer
    errors: dict[str, str] = field(default_factory=dict)  # name -> PromQL error

    @property
    def empty(self) -> list[str]:
        return [n for n in self.exprs if self.series.get(n, 0) == 0 and n not in self.errors]

    @property
    def ok(self) -> bool:
        return not self.empty and not self.errors

    def report(self) -> str:
        lines = [f"ERROR {n}: {e}\n    {self.exprs[n]}" for n, e in self.errors.items()]
        lines += [f"EMPTY {n}\n    {self.exprs[n]}" for n in self.empty]
        return "\n".join(lines) or f"all {len(self.exprs)} queries returned data"


def check_queries(
    prom_url: str,
    exprs: dict[str, str],
    timeout: float = 60,
    poll_every: float = 1.0,
    keep_polling: Callable[[], bool] | None = None,
) -> CheckResult:
    """Run every query repeatedly until each has returned at least one series once, or `timeout` passes.

    A query counts as passing once any answer was non-empty, so gauges that vanish when a benchmark ends still
    pass if they were seen while it ran. `keep_polling` (e.g. "the load is still running") extends the deadline.
    """
    result = CheckResult(exprs=dict(exprs))
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=10) as client:
        while True:
            for name, expr in exprs.items():
                if result.series.get(name) or name in result.errors:
                    continue
                try:
                    result.series[name] = len(instant_query(client, prom_url, expr))
                except PromQLError as e:
                    result.errors[name] = str(e)
            running = keep_polling is not None and keep_polling()
            if not result.empty or (time.monotonic() > deadline and not running):
                return result
            time.sleep(poll_every)
