"""Does the gateway hold up for long: `python -m lorafleet.benches.soak --seconds 600` (or `lorafleet serve soak`).

Starts one vLLM engine with two random LoRA adapters and the gateway (its own process, as in production) in
front of it, or uses a running gateway (`--gateway URL --target KEY=MODEL ...`). It measures capacity (closed
loop at `--concurrency` for `--capacity-s`), then sends a mixed load (tenants, adapters, streaming or not) as a
Poisson process at `--load` (default 80 %) of that capacity for `--seconds`, and reports:
  - errors (goal 0): any status but 200, a stream without [DONE] or with an error event, a broken connection;
  - the gateway's RSS, mean of the first window vs the last (goal: growth < 5 %);
  - p50 / p99 latency in the first and the last window.
A window is one minute, or a third of the run when that is shorter. JSON goes to runs/serve-soak/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from lorafleet.core import paths
from lorafleet.stack import one_engine_config, running_stack
from serve.config import ServeConfig
from train.export import random_adapter
from train.models import model_path

TENANTS = ("soak-a", "soak-b")
ADAPTERS = ("soak-lora-1", "soak-lora-2")
WORDS = "lighthouse river engine harbor lantern market garden winter copper signal".split()


@dataclass
class Target:
    key: str
    model: str


@dataclass
class SoakSettings:
    gateway: str  # root URL, e.g. http://127.0.0.1:8080
    targets: list[Target]
    seconds: float = 600.0
    capacity_s: float = 20.0
    concurrency: int = 8
    load: float = 0.8  # share of the measured capacity to send
    max_tokens: int = 16
    stream_share: float = 0.5
    rss_pid: int | None = None  # the gateway's process (None: RSS not measured)
    seed: int = 0


@dataclass
class Result:
    start: float  # seconds since the phase began
    latency: float
    ok: bool
    status: int
    error: str = ""


@dataclass
class SoakReport:
    capacity_rps: float
    target_rps: float
    seconds: float
    window_s: float
    requests: int
    errors: int
    error_kinds: dict[str, int]
    achieved_rps: float
    latency_p50_s: dict[str, float]
    latency_p99_s: dict[str, float]
    rss_mib: dict[str, float] = field(default_factory=dict)
    rss_growth: float | None = None  # last window mean / first window mean - 1


# -- one request


def _body(target: Target, stream: bool, max_tokens: int, rng: random.Random) -> dict:
    words = " ".join(rng.choice(WORDS) for _ in range(6))
    body = {
        "model": target.model,
        "messages": [{"role": "user", "content": f"Write one sentence about: {words}."}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _one(client: httpx.AsyncClient, s: SoakSettings, t0: float, rng: random.Random) -> Result:
    # Not loadtest.client.stream_request: errors are what a soak looks for, and this checks what that client
    # does not: that every stream ends with `data: [DONE]` (a gateway that ends a stream early without an error
    # event passes there), and half the requests are not streamed at all.
    target, stream = rng.choice(s.targets), rng.random() < s.stream_share
    body = _body(target, stream, s.max_tokens, rng)
    headers = {"Authorization": f"Bearer {target.key}"}
    start = time.perf_counter()
    try:
        if stream:
            async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                raw = await r.aread()
            ok = r.status_code == 200 and raw.rstrip().endswith(b"data: [DONE]") and b'data: {"error"' not in raw
            error = "" if ok else f"stream {r.status_code}: {raw[-200:]!r}"
        else:
            r = await client.post("/v1/chat/completions", json=body, headers=headers)
            ok = r.status_code == 200 and "usage" in r.json()
            error = "" if ok else f"{r.status_code}: {r.text[:200]}"
        status = r.status_code
    except (httpx.HTTPError, ValueError) as e:
        ok, status, error = False, 0, f"{type(e).__name__}: {e}"
    return Result(start - t0, time.perf_counter() - start, ok, status, error)


# -- the two phases


async def measure_capacity(client: httpx.AsyncClient, s: SoakSettings, rng: random.Random) -> float:
    """Completed requests per second with `concurrency` clients sending back to back."""
    t0 = time.perf_counter()
    done: list[Result] = []

    async def worker() -> None:
        while time.perf_counter() - t0 < s.capacity_s:
            done.append(await _one(client, s, t0, rng))

    await asyncio.gather(*(worker() for _ in range(s.concurrency)))
    wall = time.perf_counter() - t0
    failed = [r for r in done if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(done)} requests failed while measuring capacity: {failed[0].error}")
    return len(done) / wall


def rss_mib(pid: int) -> float:
    """Resident set size of a process (Linux /proc), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def open_loop(
    client: httpx.AsyncClient, s: SoakSettings, rate: float, rng: random.Random
) -> tuple[list[Result], list[tuple[float, float]]]:
    """Poisson arrivals at `rate` per second for `seconds`; RSS sampled every second alongside."""
    t0, results, rss = time.perf_counter(), [], []
    tasks: set[asyncio.Task] = set()
    # A bound on requests in flight: if the engine stalls, the soak must not pile up thousands of sockets.
    slots = asyncio.Semaphore(max(4 * s.concurrency, 16))

    async def sample_rss() -> None:
        while True:
            rss.append((time.perf_counter() - t0, rss_mib(s.rss_pid)))
            await asyncio.sleep(1.0)

    async def request() -> None:
        try:
            results.append(await _one(client, s, t0, rng))
        finally:
            slots.release()

    sampler = asyncio.create_task(sample_rss()) if s.rss_pid else None
    next_at = 0.0
    while next_at < s.seconds:
        await asyncio.sleep(max(0.0, next_at - (time.perf_counter() - t0)))
        await slots.acquire()
        task = asyncio.create_task(request())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        next_at += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    if sampler is not None:
        sampler.cancel()
    return results, rss


def _quantile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def summarize(s: SoakSettings, capacity: float, rate: float, results: list[Result], rss: list) -> SoakReport:
    window = min(60.0, s.seconds / 3)
    first = [r.latency for r in results if r.start < window]
    last = [r.latency for r in results if r.start >= s.seconds - window]
    errors = [r for r in results if not r.ok]
    kinds: dict[str, int] = {}
    for r in errors:
        kind = str(r.status) if r.status else r.error.split(":")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    report = SoakReport(
        capacity_rps=capacity,
        target_rps=rate,
        seconds=s.seconds,
        window_s=window,
        requests=len(results),
        errors=len(errors),
        error_kinds=kinds,
        achieved_rps=len(results) / s.seconds,
        latency_p50_s={"first": _quantile(first, 0.5), "last": _quantile(last, 0.5)},
        latency_p99_s={"first": _quantile(first, 0.99), "last": _quantile(last, 0.99)},
    )
    if rss:
        head = [m for t, m in rss if t < window]
        tail = [m for t, m in rss if t >= s.seconds - window]
        report.rss_mib = {"first": statistics.mean(head), "last": statistics.mean(tail), "max": max(m for _, m in rss)}
        report.rss_growth = report.rss_mib["last"] / report.rss_mib["first"] - 1
    return report


async def soak_async(s: SoakSettings) -> SoakReport:
    rng = random.Random(s.seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(120.0, connect=5.0)
    async with httpx.AsyncClient(base_url=s.gateway, limits=limits, timeout=timeout, trust_env=False) as client:
        capacity = await measure_capacity(client, s, rng)
        rate = s.load * capacity
        print(f"==> capacity {capacity:.2f} req/s; soaking at {rate:.2f} req/s for {s.seconds:.0f} s", flush=True)
        results, rss = await open_loop(client, s, rate, rng)
    return summarize(s, capacity, rate, results, rss)


def run_soak(s: SoakSettings) -> SoakReport:
    """Measure capacity, then soak at `load` of it; returns the figures (printing is `print_report`)."""
    if not s.targets:
        raise ValueError("targets: give at least one KEY=MODEL to send requests as")
    return asyncio.run(soak_async(s))


def print_report(r: SoakReport) -> None:
    w = f"{r.window_s:.0f} s"
    print(
        f"\n== soak: {r.seconds:.0f} s at {r.target_rps:.2f} req/s ({r.target_rps / r.capacity_rps:.0%} of capacity)"
    )
    print(f"  requests {r.requests} ({r.achieved_rps:.2f} req/s), errors {r.errors} (goal 0) {r.error_kinds or ''}")
    p50, p99 = r.latency_p50_s, r.latency_p99_s
    print(f"  latency p50: first {w} {p50['first']:.2f} s, last {w} {p50['last']:.2f} s")
    print(f"  latency p99: first {w} {p99['first']:.2f} s, last {w} {p99['last']:.2f} s")
    if r.rss_growth is not None:
        m = r.rss_mib
        print(
            f"  gateway RSS: first {w} {m['first']:.1f} MiB, last {w} {m['last']:.1f} MiB, max {m['max']:.1f} MiB,"
            f" growth {r.rss_growth:+.2%} (goal < 5 %)"
        )


# -- the command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lorafleet.benches.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seconds", type=float, default=600.0, help="length of the soak at constant load")
    p.add_argument("--capacity-s", type=float, default=20.0, help="length of the capacity measurement")
    p.add_argument("--concurrency", type=int, default=8, help="clients while measuring capacity")
    p.add_argument("--load", type=float, default=0.8, help="share of the capacity to send (0..1]")
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model the started engine serves")
    p.add_argument("--gateway", help="use this running gateway (root URL) instead of starting one")
    p.add_argument("--target", action="append", default=[], metavar="KEY=MODEL", help="with --gateway; repeat")
    p.add_argument("--gateway-pid", type=int, help="with --gateway: its process id, to measure its RSS")
    p.add_argument("--out", default=None, help="JSON results folder (default runs/serve-soak)")
    args = p.parse_args(argv)
    if args.gateway and not args.target:
        p.error("--gateway needs at least one --target KEY=MODEL")
    if not 0 < args.load <= 1:
        p.error("--load must be in (0, 1]")
    return args


def _targets(specs: list[str]) -> list[Target]:
    targets = []
    for spec in specs:
        key, sep, model = spec.partition("=")
        if not sep or not key or not model:
            raise SystemExit(f"--target {spec!r}: expected KEY=MODEL")
        targets.append(Target(key, model))
    return targets


def _stack_config(args: argparse.Namespace, work: Path) -> tuple[ServeConfig, list[Target]]:
    """One engine with two random adapters (same weights, two names: two adapters to vLLM), two tenants with a key
    each, each allowed the base model and its own adapter; and the targets the soak sends to."""
    random_adapter(model_path(args.model), work / ADAPTERS[0])
    shutil.copytree(work / ADAPTERS[0], work / ADAPTERS[1])
    base = Path(args.model).name  # the engine's served name: the model id, or its folder's name
    keys = {t: f"sk-{t}" for t in TENANTS}
    tenants = {t: (keys[t], [base, a]) for t, a in zip(TENANTS, ADAPTERS, strict=True)}
    cfg = one_engine_config(args.model, work, ADAPTERS, tenants, name="soak", max_loras=len(ADAPTERS))
    return cfg, [Target(keys[t], m) for t, (_, models) in tenants.items() for m in models]


def _soak(args: argparse.Namespace, url: str, targets: list[Target], pid: int | None) -> SoakReport:
    return run_soak(
        SoakSettings(
            gateway=url,
            targets=targets,
            seconds=args.seconds,
            capacity_s=args.capacity_s,
            concurrency=args.concurrency,
            load=args.load,
            max_tokens=args.max_tokens,
            rss_pid=pid,
        )
    )


def _started_and_soaked(args: argparse.Namespace) -> SoakReport:
    work = Path(tempfile.mkdtemp(prefix="lorafleet-soak-"))
    try:
        cfg, targets = _stack_config(args, work)
        with running_stack(cfg, "process") as stack:  # the gateway in its own process: RSS and CPU are its own
            return _soak(args, stack.url, targets, stack.gateway_pid)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gateway:
        report = _soak(args, args.gateway.rstrip("/"), _targets(args.target), args.gateway_pid)
    else:
        report = _started_and_soaked(args)
    print_report(report)
    out = Path(args.out) if args.out else paths.runs_dir() / "serve-soak"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
