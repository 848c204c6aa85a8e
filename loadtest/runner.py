"""The load run: per target (one after another), a warm-up, then one or more load steps, then the quality evals.

Open loop: requests start on the arrival schedule whatever the server does; if the client itself falls behind,
the lag is recorded as queue delay and counted in the SLO. Closed loop: `concurrency` workers, each sending its
next request when the previous one ends. A sweep raises the load step by step until the SLO breaks or the
output throughput stops growing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from loadtest.client import (
    ClientPool,
    PreflightError,
    RequestRecord,
    auth_headers,
    build_body,
    endpoint,
    preflight,
    quiet,
    stream_request,
)
from loadtest.config import BenchConfig, Load, Target
from loadtest.cost import target_cost, tokens_cost_usd, usd_per_1k_correct
from loadtest.metrics import BenchMetrics
from loadtest.quality import default_get_task, run_eval
from loadtest.stats import check_slo, stop_reason, summarize_step
from loadtest.traffic import ModelPicker, arrival_times, prompt_pool

Send = Callable[[float], Awaitable[None]]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class BenchState:
    """Everything a run has produced so far; written out even when the run is interrupted."""

    config: BenchConfig
    started_at: str = field(default_factory=_now)
    finished_at: str | None = None
    interrupted: bool = False
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    quality: list[dict[str, Any]] = field(default_factory=list)

    def target_state(self, name: str) -> dict[str, Any]:
        return self.targets.setdefault(name, {"steps": [], "stop_reason": None, "warmup": None, "cost": None})


def required_models(cfg: BenchConfig) -> dict[str, set[str]]:
    """Per target, every model name the run will send, so preflight can check they are served."""
    need = {t.name: set(t.mix()) if cfg.load else set() for t in cfg.targets}
    for ev in cfg.quality.evals if cfg.quality else []:
        need[ev.target].add(ev.model or cfg.target(ev.target).model)
    return need


class TargetLoad:
    """Sends one target's requests: picks the model by weight and the model's next prompt."""

    def __init__(
        self,
        cfg: BenchConfig,
        target: Target,
        pool: ClientPool,
        metrics: BenchMetrics,
        get_task: Callable[[str], Any] | None,
    ):
        self.cfg, self.target, self.pool, self.metrics = cfg, target, pool, metrics
        mix = target.mix()
        self.url = endpoint(target)
        self.headers = {m: auth_headers(target.key(m)) for m in mix}
        self.pools = {m: prompt_pool(target, m, cfg.prompts, cfg.seed + i, get_task) for i, m in enumerate(mix)}
        self.cursor = {m: itertools.cycle(pool) for m, pool in self.pools.items()}
        self.picker = ModelPicker(mix, cfg.seed)
        self.inflight = metrics.inflight.labels(target.name)

    async def send(self, model: str, scheduled: float, t0: float) -> RequestRecord:
        load = self.cfg.load
        body = build_body(
            self.target,
            model,
            next(self.cursor[model]),
            load.max_tokens,
            force_output_len=load.force_output_len,
            temperature=load.temperature,
        )
        rec = RequestRecord(model=model, scheduled=scheduled)
        self.inflight.inc()
        try:
            async with self.pool.lease() as client:
                await stream_request(client, self.url, self.headers[model], body, rec, t0)
        finally:
            self.inflight.dec()
        return rec


async def open_loop(send: Send, rate: float, burstiness: float, seed: int, load: Load, t0: float) -> None:
    tasks: set[asyncio.Task] = set()
    try:
        for i, at in enumerate(arrival_times(rate, burstiness, seed)):
            if (load.num_requests is not None and i >= load.num_requests) or (
                load.end_s is not None and at > load.end_s
            ):
                break
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(send(at))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def closed_loop(send: Send, concurrency: int, load: Load, t0: float) -> None:
    issued = 0

    async def worker(k: int) -> None:
        nonlocal issued
        # Staggered starts: requests of one length started together stay in lockstep, every one of them waiting
        # for the whole batch's prefill (a herd no real traffic makes); spread out, they keep their phases.
        await asyncio.sleep(load.ramp_up_s * k / concurrency)
        while True:
            now = time.perf_counter() - t0
            if load.num_requests is not None and issued >= load.num_requests:
                return
            if load.end_s is not None and now >= load.end_s:
                return
            issued += 1
            await send(now)

    await asyncio.gather(*(worker(k) for k in range(concurrency)))


async def warmup(tl: TargetLoad, n: int, progress: bool) -> dict[str, Any]:
    """Open connections and load every adapter once; these requests are left out of every figure."""
    models = list(tl.pools)
    n = max(n, len(models)) if n else 0
    if n == 0:
        return {"requests": 0, "errors": 0}
    order = [models[i % len(models)] for i in range(n)]
    sem = asyncio.Semaphore(4)
    bar = tqdm(total=n, desc=f"{tl.target.name} warm-up", unit="req", disable=quiet(progress), leave=False)

    async def one(model: str) -> RequestRecord:
        async with sem:
            rec = await tl.send(model, 0.0, time.perf_counter())
        bar.update(1)
        return rec

    try:
        recs = await asyncio.gather(*(one(m) for m in order))
    finally:
        bar.close()
    errors = [r for r in recs if not r.ok]
    return {"requests": n, "errors": len(errors), "first_error": errors[0].error if errors else None}


async def run_step(tl: TargetLoad, index: int, load_value: float, steps: list[dict[str, Any]], progress: bool) -> None:
    """Run one load step and append its summary to `steps`, also when cancelled part-way."""
    cfg, name = tl.cfg, tl.target.name
    load = cfg.load
    records: list[RequestRecord] = []
    tl.metrics.target_rate.labels(name).set(load_value)
    unit = "req/s" if load.mode == "open" else "concurrent"
    bar = tqdm(
        total=load.num_requests,
        desc=f"{name} step {index} ({load_value:g} {unit})",
        unit="req",
        disable=quiet(progress),
    )

    errors = 0

    async def send(scheduled: float) -> None:
        nonlocal errors
        rec = await tl.send(tl.picker.pick(), scheduled, t0)
        records.append(rec)
        tl.metrics.observe(name, rec)
        bar.update(1)
        if not rec.ok:
            errors += 1
            bar.set_postfix(errors=errors, refresh=False)

    t0 = time.perf_counter()
    interrupted = False
    try:
        if load.mode == "open":
            await open_loop(send, load_value, load.burstiness, cfg.seed + 7919 * index, load, t0)
        else:
            await closed_loop(send, int(load_value), load, t0)
    except asyncio.CancelledError:
        interrupted = True
        raise
    finally:
        bar.close()
        summary = summarize_step(records, time.perf_counter() - t0, since=load.ramp_up_s)
        summary.update(index=index, load=load_value, mode=load.mode, interrupted=interrupted)
        summary["slo"] = check_slo(summary, cfg.slo)
        summary["records"] = [r.to_json() for r in records]
        steps.append(summary)


def step_line(name: str, s: dict[str, Any]) -> str:
    ttft = s["ttft_incl_queue"]["p90"]
    return (
        f"{name} step {s['index']} (load {s['load']:g}): {s['req_per_s']:.2f} req/s, {s['output_tok_per_s']:.1f} "
        f"out tok/s, TTFT p90 {'-' if ttft is None else f'{ttft * 1000:.0f} ms'}, errors {s['errors']}, "
        f"SLO {'met' if s['slo']['met'] else 'missed'}"
    )


async def run_target_load(tl: TargetLoad, state: BenchState, progress: bool) -> None:
    ts = state.target_state(tl.target.name)
    ts["warmup"] = await warmup(tl, tl.cfg.load.warmup_requests, progress)
    try:
        for i, value in enumerate(tl.cfg.load.steps()):
            await run_step(tl, i, value, ts["steps"], progress)
            if progress:
                tqdm.write(step_line(tl.target.name, ts["steps"][-1]))
            reason = stop_reason(ts["steps"], tl.cfg.load.min_gain) if tl.cfg.load.sweep else None
            if reason:
                ts["stop_reason"] = reason
                break
    finally:
        tl.metrics.target_rate.labels(tl.target.name).set(0)  # dashboards: this target is no longer loaded


async def run_bench(
    cfg: BenchConfig,
    state: BenchState,
    metrics: BenchMetrics,
    progress: bool = True,
    get_task: Callable[[str], Any] | None = None,
) -> None:
    """Preflight every target, then load-test and evaluate them one at a time, filling `state`."""
    await preflight(cfg.targets, required_models(cfg))
    needs_tasks = cfg.quality is not None or cfg.prompts.source == "task"
    get_task = get_task or (default_get_task() if needs_tasks else None)
    check_tasks(cfg, get_task)
    for target in cfg.targets:
        # A fresh pool per target: no connection or warm state carries over from the previous target.
        async with ClientPool(cfg.request_timeout_s) as pool:
            if cfg.load:
                tl = TargetLoad(cfg, target, pool, metrics, get_task)
                await run_target_load(tl, state, progress)
            for ev in cfg.quality.evals if cfg.quality else []:
                if ev.target == target.name:
                    state.quality.append(await run_eval(pool, target, ev, cfg.quality, get_task, progress))


def check_tasks(cfg: BenchConfig, get_task: Callable[[str], Any] | None) -> None:
    """Every task named in the config must exist before any load is sent, not after an hour of it."""
    names: dict[str, str] = {}
    if cfg.prompts.source == "task":
        tasks = cfg.prompts.task if isinstance(cfg.prompts.task, dict) else {"": cfg.prompts.task}
        names.update({f"prompts.task{'.' + k if k else ''}": v for k, v in tasks.items()})
        for t in cfg.targets:
            for m in t.mix():
                if cfg.prompts.task_for(m) is None:
                    raise PreflightError(f"prompts.task: no task for model {m!r} of target {t.name!r}; add it or '*'")
    for i, ev in enumerate(cfg.quality.evals if cfg.quality else []):
        names[f"quality.evals.{i}.task"] = ev.task
    problems = []
    for where, name in names.items():
        try:
            get_task(name)
        except (KeyError, ValueError) as e:
            problems.append(f"{where}: {e}")
    if problems:
        raise PreflightError("preflight failed:\n  " + "\n  ".join(problems))


def finalize(state: BenchState) -> None:
    """Price every target and join the quality results with cost; safe to call on a partial run."""
    cfg = state.config
    for target in cfg.targets:
        ts = state.target_state(target.name)
        ts["cost"] = target_cost(target.price, ts["steps"], slo_set=cfg.slo.is_set())
    for q in state.quality:
        cost = state.targets[q["target"]]["cost"]
        q["cost_usd"] = tokens_cost_usd(cost, q["prompt_tokens"], q["completion_tokens"])
        q["usd_per_1k_correct"] = usd_per_1k_correct(q["cost_usd"], q["correct"])
    state.finished_at = _now()
