"""Tiny builders for Grafana dashboard JSON (schemaVersion 39) as plain dicts.

No SDK: a dashboard is a dict, a panel is a dict, and these helpers only fill in the boilerplate Grafana expects
so that the queries in `boards.py` stay readable. Every panel and target reads from the `$datasource` variable, so
the same JSON works through the import UI and through file provisioning.
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 39
GRID_WIDTH = 24
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

Panel = dict[str, Any]


def target(expr: str, legend: str = "", instant: bool = False, table: bool = False) -> dict[str, Any]:
    """One PromQL query of a panel; refIds are assigned by the panel builder."""
    return {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
        "format": "table" if table else "time_series",
    }


def _with_refs(targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**t, "refId": chr(ord("A") + i)} for i, t in enumerate(targets)]


def _field_defaults(
    unit: str, min_: float | None, max_: float | None, thresholds: list | None, base: str = "green"
) -> dict[str, Any]:
    """`thresholds`: [(value, color), ...] above the `base` color."""
    steps = [{"color": base, "value": None}]
    for value, color in thresholds or []:
        steps.append({"color": color, "value": value})
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "palette-classic"},
        "thresholds": {"mode": "absolute", "steps": steps},
    }
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    return defaults


def _panel(kind: str, title: str, targets: list, description: str, w: int, h: int, defaults: dict) -> Panel:
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"h": h, "w": w, "x": 0, "y": 0},  # placed by dashboard()
        "targets": _with_refs(targets),
        "fieldConfig": {"defaults": defaults, "overrides": []},
    }


def timeseries(
    title: str,
    targets: list[dict[str, Any]],
    unit: str = "short",
    description: str = "",
    w: int = 12,
    h: int = 8,
    min_: float | None = 0,
    max_: float | None = None,
    thresholds: list | None = None,
) -> Panel:
    defaults = _field_defaults(unit, min_, max_, thresholds)
    defaults["custom"] = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 10,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "none", "group": "A"},
        "thresholdsStyle": {"mode": "line" if thresholds else "off"},
    }
    p = _panel("timeseries", title, targets, description, w, h, defaults)
    p["options"] = {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return p


def stat(
    title: str,
    targets: list[dict[str, Any]],
    unit: str = "short",
    description: str = "",
    w: int = 6,
    h: int = 4,
    thresholds: list | None = None,
    mappings: list | None = None,
    color_mode: str = "value",
    base_color: str = "green",
) -> Panel:
    defaults = _field_defaults(unit, None, None, thresholds, base_color)
    defaults["color"] = {"mode": "thresholds"}
    defaults["mappings"] = mappings or []
    p = _panel("stat", title, targets, description, w, h, defaults)
    p["options"] = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": color_mode,
        "graphMode": "area",
        "textMode": "auto",
        "orientation": "auto",
        "justifyMode": "auto",
    }
    return p


def bargauge(
    title: str,
    targets: list[dict[str, Any]],
    unit: str = "short",
    description: str = "",
    w: int = 12,
    h: int = 8,
    min_: float | None = 0,
    max_: float | None = None,
    thresholds: list | None = None,
) -> Panel:
    defaults = _field_defaults(unit, min_, max_, thresholds)
    defaults["color"] = {"mode": "thresholds" if thresholds else "continuous-BlYlRd"}
    p = _panel("bargauge", title, targets, description, w, h, defaults)
    p["options"] = {
        "displayMode": "gradient",
        "orientation": "horizontal",
        "showUnfilled": True,
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
    }
    return p


def table(
    title: str,
    targets: list[dict[str, Any]],
    description: str = "",
    w: int = 12,
    h: int = 8,
    rename: dict[str, str] | None = None,
    hide: list[str] | None = None,
) -> Panel:
    """Instant queries as one table. Their values arrive as "Value #A", "Value #B", ...: `rename` them."""
    p = _panel("table", title, targets, description, w, h, _field_defaults("short", None, None, None))
    excluded = {name: True for name in ["Time", *(hide or [])]}
    # One frame per query; merge them into one row per label set.
    p["transformations"] = [
        {"id": "merge", "options": {}},
        {"id": "organize", "options": {"excludeByName": excluded, "renameByName": rename or {}}},
    ]
    p["options"] = {"showHeader": True, "cellHeight": "sm"}
    return p


def row(title: str) -> Panel:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"h": 1, "w": 24}}


def datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "regex": "",
        "hide": 0,
        "refresh": 1,
        "current": {},
        "options": [],
    }


def query_variable(name: str, label: str, metric: str, label_name: str | None = None) -> dict[str, Any]:
    """A multi-value variable listing one label's values; "All" becomes the regex `.*`."""
    label_name = label_name or name
    query = f"label_values({metric}, {label_name})"
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery", "qryType": 1},
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "refresh": 2,
        "sort": 1,
        "regex": "",
        "hide": 0,
        "options": [],
    }


def custom_variable(name: str, label: str, values: list[str], default: str, description: str = "") -> dict[str, Any]:
    options = [{"text": v, "value": v, "selected": v == default} for v in values]
    return {
        "name": name,
        "label": label,
        "description": description,
        "type": "custom",
        "query": ",".join(values),
        "multi": False,
        "includeAll": False,
        "current": {"selected": True, "text": default, "value": default},
        "options": options,
        "hide": 0,
    }


def _layout(panels: list[Panel]) -> list[Panel]:
    """Flow panels left to right in rows of 24 grid units; a row header always starts a new line."""
    out, x, y, line_h = [], 0, 0, 0
    for i, p in enumerate(panels, start=1):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if p["type"] == "row" or x + w > GRID_WIDTH:
            x, y, line_h = 0, y + line_h, 0
        out.append({**p, "id": i, "gridPos": {"h": h, "w": w, "x": x, "y": y}})
        x, line_h = x + w, max(line_h, h)
        if p["type"] == "row":
            x, y, line_h = 0, y + h, 0
    return out


def dashboard(
    uid: str, title: str, description: str, panels: list[Panel], variables: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["lorafleet"],
        "editable": True,
        "graphTooltip": 1,  # shared crosshair: latency and load line up across panels
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "refresh": "10s",
        "schemaVersion": SCHEMA_VERSION,
        "time": {"from": "now-30m", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "version": 1,
        "weekStart": "",
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": [
            {
                "title": "lorafleet",
                "type": "dashboards",
                "tags": ["lorafleet"],
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "templating": {"list": variables},
        "panels": _layout(panels),
    }
