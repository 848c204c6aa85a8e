"""One bench run as a library call: run every target, write the report (also after Ctrl-C)."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from loadtest.config import BenchConfig
from loadtest.metrics import BenchMetrics
from loadtest.report import write_report
from loadtest.runner import BenchState, finalize, run_bench
from lorafleet.core.paths import runs_dir


def run_async(coro: Coroutine) -> Any:
    """Run on uvloop when it is installed (it comes with vLLM's dependencies): more requests/s per core."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def default_out_dir() -> Path:
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
