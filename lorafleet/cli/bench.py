"""`lorafleet bench run|compare|headroom`."""

from __future__ import annotations

import argparse
from pathlib import Path

from loadtest.compare import compare, load_results, parse_threshold
from loadtest.config import load_config
from loadtest.headroom import headroom
from loadtest.report import summary_table, text_table, warnings
from loadtest.run import default_out_dir, run_and_report


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    out_dir = Path(args.out or cfg.output_dir or default_out_dir())
    results, interrupted = run_and_report(cfg, out_dir, progress=not args.no_progress)
    print()
    print(text_table(*summary_table(results)))
    for w in warnings(results):
        print("warning:", w)
    print(f"\nreport: {out_dir / 'report.html'}  (also report.md, results.json)")
    return 130 if interrupted else 0


def cmd_compare(args: argparse.Namespace) -> int:
    threshold = parse_threshold(args.max_regression)
    rows, regressed = compare(load_results(args.old), load_results(args.new), threshold)
    print(text_table(["scope", "metric", "old", "new", "change", "verdict"], rows))
    verdict = "REGRESSION" if regressed else "no regression"
    print(f"\n{verdict} (threshold {threshold:.1%})")
    return 1 if regressed else 0


def cmd_headroom(args: argparse.Namespace) -> int:
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
