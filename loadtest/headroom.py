"""How many streamed requests/s one harness process sustains: run against the fake server (no model), so the
harness itself is the bottleneck. A figure well above the rates a real target is driven at means the client's
own overhead does not shape the latencies it reports.

    python -m loadtest.headroom [--seconds 10] [--concurrency 64] [--rate 500]

The fake runs in its own process so that it does not share the harness's GIL.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import httpx

from loadtest.config import parse_config
from loadtest.metrics import BenchMetrics
from loadtest.run import run_async
from loadtest.runner import BenchState, run_bench
from lorafleet.core.net import free_port

GOAL_REQ_PER_S = 500.0


def start_fake(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "loadtest.fake_openai", "--port", str(port)])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the fake server exited at start")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("the fake server did not come up within 30 s")


def measure(base_url: str, load: dict, seconds: float) -> dict:
    """One load step against the fake; returns its step summary."""

    cfg = parse_config(
        {
            "targets": [{"name": "fake", "base_url": base_url, "model": "fake-model", "price": {"usd_per_hour": 1}}],
            "load": {**load, "duration_s": seconds, "max_tokens": 16, "force_output_len": True, "warmup_requests": 32},
        }
    )
    state = BenchState(cfg)
    run_async(run_bench(cfg, state, BenchMetrics(), progress=False))
    return state.targets["fake"]["steps"][0]


def headroom(seconds: float = 10.0, concurrency: int = 64, rate: float = GOAL_REQ_PER_S) -> dict:
    port = free_port()
    proc = start_fake(port)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        closed = measure(url, {"mode": "closed", "concurrency": concurrency}, seconds)
        opened = measure(url, {"mode": "open", "rate": rate}, seconds)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(f"cpu cores: {os.cpu_count()}; 16 output tokens per request, 2 per chunk (8 content chunks)")
    print(
        f"closed loop, concurrency {concurrency}: {closed['req_per_s']:.0f} req/s sustained, "
        f"{closed['output_tok_per_s']:.0f} tok/s, errors {closed['errors']}"
    )
    q = opened["queue_delay"]
    print(
        f"open loop at {rate:g} req/s: achieved {opened['req_per_s']:.0f} req/s, client queue delay "
        f"p50 {q['p50'] * 1000:.1f} ms / p99 {q['p99'] * 1000:.1f} ms, errors {opened['errors']}"
    )
    for name, step in (("closed", closed), ("open", opened)):
        errs = [r["error"] for r in step["records"] if r["status"] != "ok"]
        if errs:
            print(f"{name} loop errors {step['error_kinds']}, first: {errs[0]}")
    verdict = "meets" if closed["req_per_s"] >= GOAL_REQ_PER_S else "is below"
    print(f"headroom {closed['req_per_s']:.0f} req/s {verdict} the {GOAL_REQ_PER_S:.0f} req/s goal")
    return {"closed": closed, "open": opened}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rate", type=float, default=GOAL_REQ_PER_S)
    args = p.parse_args(argv)
    headroom(args.seconds, args.concurrency, args.rate)


if __name__ == "__main__":
    main()
