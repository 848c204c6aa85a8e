"""Draw what a dashboard's time-series panels show, as PNGs, from a live Prometheus (no Grafana needed).

    python -m dashboards.render --prom http://127.0.0.1:9090 --out docs/img/ [--minutes 30] [--dashboard fleet]

Each dashboard becomes one picture: its time-series panels in a grid, queried over the last N minutes with the
variables at their defaults. Used for the README and for reports of benchmark runs.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from dashboards.boards import all_dashboards
from dashboards.promql import BUILTINS, PromQLError, fill, range_query, variable_defaults

MAX_PANELS = 8
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def legend(fmt: str, labels: dict[str, str]) -> str:
    if fmt in ("", "__auto"):
        return ",".join(f"{k}={v}" for k, v in labels.items() if k != "__name__") or "value"
    return _LEGEND.sub(lambda m: labels.get(m.group(1), ""), fmt).strip()


def _short(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def format_value(v: float, unit: str) -> str:
    """A tick label the way Grafana writes the unit."""
    if unit == "percentunit":
        return f"{v * 100:.3g}%"
    if unit == "currencyUSD":
        return f"${v:.3g}"
    if unit == "s":
        return f"{v * 1000:.3g} ms" if 0 < abs(v) < 1 else f"{v:.3g} s"
    if unit == "reqps":
        return f"{_short(v)}/s"
    return _short(v)


def panel_series(
    client: httpx.Client, prom_url: str, panel: dict[str, Any], values: dict[str, str], start: float, end: float
) -> list[tuple[str, list[float], list[float]]]:
    """(legend, timestamps, values) for every series of every target of a panel."""
    step = max(1.0, (end - start) / 300)
    out = []
    for t in panel["targets"]:
        for s in range_query(client, prom_url, fill(t["expr"], values), start, end, step):
            xs = [float(ts) for ts, _ in s["values"]]
            ys = [float(v) for _, v in s["values"]]
            out.append((legend(t.get("legendFormat", ""), s["metric"]), xs, ys))
    return out


def render_dashboard(prom_url: str, board: dict[str, Any], out: Path, minutes: float = 30) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels = [p for p in board["panels"] if p["type"] == "timeseries"][:MAX_PANELS]
    values = {**BUILTINS, **variable_defaults(board), "__range": f"{int(minutes * 60)}s"}
    end = time.time()
    start = end - minutes * 60
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    plt.style.use("dark_background")
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.2 * rows), squeeze=False)
    fig.suptitle(board["title"], fontsize=14, x=0.01, ha="left")
    with httpx.Client(timeout=30) as client:
        for ax, panel in zip(axes.flat, panels, strict=False):  # the grid may have a spare cell
            defaults = panel["fieldConfig"]["defaults"]
            for name, xs, ys in panel_series(client, prom_url, panel, values, start, end):
                ax.plot([datetime.fromtimestamp(x) for x in xs], ys, lw=1.2, label=name)
            ax.set_title(panel["title"], fontsize=10, loc="left")
            unit = defaults.get("unit", "short")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos, unit=unit: format_value(v, unit)))
            ax.grid(alpha=0.2)
            if ax.lines:
                ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=9))
                ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M" if minutes > 10 else "%H:%M:%S"))
                if defaults.get("min") is not None:  # Grafana's axis floor (0 for rates and counts)
                    ax.set_ylim(bottom=defaults["min"])
                ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False)
            else:
                ax.text(0.5, 0.5, "No data", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the dashboard title
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def render_all(prom_url: str, out_dir: Path, minutes: float = 30, only: list[str] | None = None) -> list[Path]:
    boards = all_dashboards()
    unknown = set(only or []) - set(boards)
    if unknown:
        raise ValueError(f"unknown dashboards {sorted(unknown)}; choose from {sorted(boards)}")
    return [
        render_dashboard(prom_url, board, Path(out_dir) / f"dashboard-{stem}.png", minutes)
        for stem, board in boards.items()
        if not only or stem in only
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prom", required=True, help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--out", type=Path, default=Path("docs/img"), help="output folder (default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=30, help="time range to draw (default: %(default)s)")
    parser.add_argument("--dashboard", action="append", help="only this dashboard (file stem); repeatable")
    args = parser.parse_args(argv)
    try:
        paths = render_all(args.prom.rstrip("/"), args.out, args.minutes, args.dashboard)
    except (httpx.HTTPError, PromQLError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
