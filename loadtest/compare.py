"""`lorafleet bench compare OLD NEW`: diff two runs per target and fail (exit 1) on a regression.

Throughput and accuracy regress when they fall; latency and $/1M regress when they rise. A threshold of 5%
means a relative change of more than 5% in the bad direction fails. A row of OLD that NEW lacks also fails:
a CI gate must not pass because the data went missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorafleet.core.errors import UserError

# (summary key, label, higher is better)
LOAD_METRICS = [
    ("output_tok_per_s", "output tok/s", True),
    ("ttft_p50_s", "TTFT p50 s", False),
    ("ttft_p90_s", "TTFT p90 s", False),
    ("e2e_p50_s", "e2e p50 s", False),
    ("usd_per_1m_output", "$/1M output", False),
    ("usd_per_1m_blended", "$/1M blended", False),
]


class CompareError(UserError):
    pass


def parse_threshold(text: str) -> float:
    """'5%' or '0.05' -> 0.05."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise CompareError(f"--max-regression {text!r}: write a percentage like 5% or a fraction like 0.05") from None
    if not 0 <= value < 10:
        raise CompareError(f"--max-regression {text!r}: out of range; write 5% or 0.05")
    return value


def load_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise CompareError(f"{path}: not found (give a results.json or the run folder that holds one)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CompareError(f"{path}: not valid JSON: {e}") from None
    if "summary" not in data or "quality" not in data:
        raise CompareError(f"{path}: not a lorafleet bench results.json (no summary)")
    return data


def _metrics(results: dict[str, Any]) -> dict[tuple[str, str], tuple[float | None, bool]]:
    """(scope, metric label) -> (value, higher is better) for every comparable figure of a run."""
    out: dict[tuple[str, str], tuple[float | None, bool]] = {}
    for row in results["summary"]:
        if row["load"] is None:
            continue
        scope = f"{row['target']}/{row['model']}"
        for key, label, higher in LOAD_METRICS:
            out[(scope, label)] = (row[key], higher)
    for q in results["quality"]:
        scope = f"{q['target']}/{q['model']} {q['task']} {q['mode']}"
        out[(scope, "accuracy")] = (q["accuracy"], True)
    return out


def compare(old: dict[str, Any], new: dict[str, Any], max_regression: float) -> tuple[list[list[str]], bool]:
    """Table rows (scope, metric, old, new, change, verdict) and whether anything regressed."""
    a, b = _metrics(old), _metrics(new)
    rows, regressed = [], False
    for (scope, label), (va, higher) in a.items():
        if (scope, label) not in b:
            rows.append([scope, label, _fmt(va), "-", "-", "MISSING"])
            regressed = True
            continue
        vb = b[(scope, label)][0]
        if va is None or vb is None or va == 0:
            rows.append([scope, label, _fmt(va), _fmt(vb), "-", "n/a"])
            continue
        change = (vb - va) / abs(va)
        worse = -change if higher else change
        verdict = "REGRESSED" if worse > max_regression else ("better" if worse < 0 else "ok")
        regressed |= verdict == "REGRESSED"
        rows.append([scope, label, _fmt(va), _fmt(vb), f"{change:+.1%}", verdict])
    return rows, regressed


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"
