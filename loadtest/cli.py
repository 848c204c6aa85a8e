"""`lorafleet bench run|compare|headroom`."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from loadtest.client import PreflightError
from loadtest.compare import CompareError, compare, load_results, parse_threshold
from loadtest.config import BenchConfig, ConfigError, load_config
from loadtest.metrics import BenchMetrics
from loadtest.report import summary_table, text_table, warnings, write_report
from loadtest.runner import BenchState, finalize, run_bench


def _cli_error(msg: str) -> Exception:
    from lorafleet.cli import CliError

    return CliError(msg)


def run_async(coro: Coroutine) -> Any:
    """Run on uvloop when it is installed (it comes with vLLM's dependencies): more requests/s per core."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def default_out_dir() -> Path:
    from lorafleet.paths import runs_dir

    return runs_dir() / f"bench-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_and_report(
    cfg: BenchConfig,
    out_dir: Path,
    progress: bool = True,
    get_task: Callable[[str], Any] | None = None,
    metrics: BenchMetrics | None = None,
) -> tuple[dict[str, Any], bool]:
    """Run the bench and write its report, also after Ctrl-C. Returns (results, interrupted).

    Raises PreflightError (nothing written) when a target is unreachable or misconfigured.
    """
    metrics = metrics or BenchMetrics()
    serving = bool(cfg.metrics_port) and metrics.port is None
    if serving:
        metrics.serve(cfg.metrics_port, cfg.metrics_addr)
        print(f"metrics: http://{cfg.metrics_addr}:{metrics.port}/metrics", file=sys.stderr)
    state = BenchState(cfg)
    try:
        run_async(run_bench(cfg, state, metrics, progress=progress, get_task=get_task))
    except (KeyboardInterrupt, asyncio.CancelledError):
        state.interrupted = True
    finally:
        if serving:
            metrics.close()
    if state.interrupted and not state.quality and not any(ts["steps"] for ts in state.targets.values()):
        raise KeyboardInterrupt  # stopped before any figure: nothing worth a report folder
    finalize(state)
    return write_report(state, out_dir), state.interrupted


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise _cli_error(str(e)) from None
    out_dir = Path(args.out or cfg.output_dir or default_out_dir())
    try:
        results, interrupted = run_and_report(cfg, out_dir, progress=not args.no_progress)
    except PreflightError as e:
        raise _cli_error(str(e)) from None
    print()
    print(text_table(*summary_table(results)))
    for w in warnings(results):
        print("warning:", w)
    print(f"\nreport: {out_dir / 'report.html'}  (also report.md, results.json)")
    return 130 if interrupted else 0


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        threshold = parse_threshold(args.max_regression)
        rows, regressed = compare(load_results(args.old), load_results(args.new), threshold)
    except CompareError as e:
        raise _cli_error(str(e)) from None
    print(text_table(["scope", "metric", "old", "new", "change", "verdict"], rows))
    verdict = "REGRESSION" if regressed else "no regression"
    print(f"\n{verdict} (threshold {threshold:.1%})")
    return 1 if regressed else 0


def cmd_headroom(args: argparse.Namespace) -> int:
    from loadtest.headroom import headroom

    headroom(seconds=args.seconds, concurrency=args.concurrency, rate=args.rate)
    return 0


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")
    r = sub.add_parser("run", help="load-test, price and score the targets of a bench config")
    r.add_argument("config", help="bench YAML (see loadtest/examples/bench.yaml)")
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. load.rate=4 targets.0.api_key=sk-x")
    r.add_argument("--out", help="output folder (default: runs/bench-<timestamp>)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compare", help="compare two runs; exit 1 when a metric regressed")
    c.add_argument("old", help="results.json or its run folder (the baseline)")
    c.add_argument("new", help="results.json or its run folder")
    c.add_argument("--max-regression", default="5%", help="allowed relative change in the bad direction (5%%)")
    c.set_defaults(func=cmd_compare)

    h = sub.add_parser("headroom", help="how many streamed requests/s this harness sustains (against a fake)")
    h.add_argument("--seconds", type=float, default=10.0)
    h.add_argument("--concurrency", type=int, default=64)
    h.add_argument("--rate", type=float, default=500.0, help="open-loop rate to check")
    h.set_defaults(func=cmd_headroom)
