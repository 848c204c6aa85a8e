"""The committed dashboard JSON is what the generator makes, and every panel is well-formed."""

from __future__ import annotations

import json

import pytest

from dashboards.boards import all_dashboards
from dashboards.generate import GRAFANA_DIR, main, render_all, stale_files
from dashboards.grafana import GRID_WIDTH, SCHEMA_VERSION
from dashboards.promql import BUILTINS, fill, variable_defaults

BOARDS = all_dashboards()
PANELS = [(stem, p) for stem, b in BOARDS.items() for p in b["panels"] if p["type"] != "row"]


def test_committed_json_is_up_to_date():
    assert stale_files() == [], "run `python -m dashboards.generate` and commit dashboards/grafana/"
    assert sorted(p.name for p in GRAFANA_DIR.glob("*.json")) == sorted(render_all())


def test_check_flag_reports_a_stale_file(tmp_path, capsys):
    for name, text in render_all().items():
        (tmp_path / name).write_text(text)
    assert main(["--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "latency.json").write_text("{}")
    assert main(["--out", str(tmp_path), "--check"]) == 1
    assert "latency.json" in capsys.readouterr().err


@pytest.mark.parametrize("stem", BOARDS)
def test_dashboard_header(stem):
    board = json.loads((GRAFANA_DIR / f"{stem}.json").read_text())
    assert board["schemaVersion"] >= SCHEMA_VERSION
    assert board["uid"].startswith("lorafleet-") and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for var in variables.values():
        if var["type"] == "query":
            assert var["definition"].startswith("label_values(")
            assert var["multi"] and var["includeAll"] and var["allValue"] == ".*"
            assert var["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize("stem,panel", PANELS, ids=[f"{s}:{p['title']}" for s, p in PANELS])
def test_panel_is_complete(stem, panel):
    assert panel["title"]
    assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert panel["targets"], "a panel without queries shows nothing"
    for t in panel["targets"]:
        assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}"
        # every $variable the query uses is defined by the dashboard or by Grafana
        fill(t["expr"], {**BUILTINS, **variable_defaults(BOARDS[stem])})
    assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


@pytest.mark.parametrize("stem", BOARDS)
def test_layout_fits_the_grid_without_overlap(stem):
    cells = set()
    ids = [p["id"] for p in BOARDS[stem]["panels"]]
    assert len(ids) == len(set(ids))
    for p in BOARDS[stem]["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= GRID_WIDTH
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
