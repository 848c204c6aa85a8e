"""`python -m lorafleet.benches.cpu_lora`: vLLM's CPU LoRA ops vs serve/engines/cpu_lora.py's.

First on one forward pass's LoRA work of SmolLM2-135M (no engine), then, with --engine ADAPTER, through two real
vLLM engines serving the adapter (plugin off, then on) on a task's held-out prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import tempfile
import time
from pathlib import Path

import httpx
import torch

from loadtest.client import ClientPool, build_body, endpoint, post_json
from loadtest.config import Target
from lorafleet.stack import one_engine_config, running_stack
from serve.engines import cpu_lora
from train.models import ensure
from train.tasks import get_task

REPEATS = 5  # rounds of every arm in turn, best kept
# (input, output slices) per adapted projection of one layer: qkv, o, gate_up, down
SMOLLM2_LAYER = [(576, (576, 192, 192)), (576, (576,)), (576, (1536, 1536)), (1536, (576,))]


def _forward_lora(ops: dict, x_by_in: dict, weights: list, idx: torch.Tensor, layers: int) -> list[torch.Tensor]:
    """Shrink then expand for every projection of every layer, as vLLM's punica wrapper calls them."""
    outs = []
    for _ in range(layers):
        for (d_in, slices), (a, b) in zip(SMOLLM2_LAYER, weights, strict=True):
            x = x_by_in[d_in]
            y = torch.zeros(x.shape[0], sum(slices), dtype=x.dtype)
            buf = torch.zeros(len(slices), x.shape[0], a[0].shape[2], dtype=torch.float32)
            for i in range(len(slices)):
                ops["bgmv_shrink"](x, a[i], buf[i], idx, 1.0)
            offset = 0
            for i, size in enumerate(slices):
                ops["bgmv_expand_slice"](buf[i], b[i], y, idx, offset, size, True)
                offset += size
            outs.append(y)
    return outs


def _bench_case(tokens: int, adapters: int, layers: int, rank: int, slots: int) -> tuple[float, float, float]:
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    weights = [
        (
            [torch.randn(slots, 1, rank, d_in, generator=g).to(bf) for _ in slices],
            [torch.randn(slots, 1, s, rank, generator=g).to(bf) for s in slices],
        )
        for d_in, slices in SMOLLM2_LAYER
    ]
    x_by_in = {d: torch.randn(tokens, d, generator=g).to(bf) for d in (576, 1536)}
    # tokens spread over `adapters` slots; a quarter without an adapter when the batch is mixed
    idx = torch.arange(tokens) % adapters if adapters > 1 else torch.zeros(tokens, dtype=torch.long)
    if adapters > 1:
        idx[::4] = -1
        idx[idx == -1] = slots - 1  # vLLM's ops read -1 as the last slot; compare on the slot they really use
    theirs = {n: cpu_lora._vllm_op(n) for n in cpu_lora.PATCHED}
    timings = []
    for impl in (theirs, cpu_lora.PATCHED):
        _forward_lora(impl, x_by_in, weights, idx, 1)  # warm-up
        t0 = time.perf_counter()
        out = _forward_lora(impl, x_by_in, weights, idx, layers)
        timings.append((time.perf_counter() - t0, out))
    (t_theirs, ref), (t_ours, got) = timings
    err = max(
        (a.float() - b.float()).abs().max().item() / (a.float().abs().max().item() + 1e-6)
        for a, b in zip(ref, got, strict=True)
    )
    return t_theirs, t_ours, err


def _layer_case(idx: torch.Tensor, layers: int, rank: int, slots: int) -> dict[str, float]:
    """ms of one forward pass's fused LoRA layers, mixed batches computed masked, by segment or by run, and of the
    base projections of the same layers, in float32 (an engine runs SmolLM2 in bf16 where the CPU has AVX512-BF16,
    where base projections run 3-4x faster and LoRA's share of a layer is larger)."""
    tokens = idx.shape[0]
    cpu_lora._STACKS.clear()  # keyed by storage address, which the last case's freed weights may share
    g = torch.Generator().manual_seed(0)
    weights = [
        (
            tuple(torch.randn(slots, 1, rank, d_in, generator=g) / 50 for _ in slices),
            tuple(torch.randn(slots, 1, s, rank, generator=g) / 50 for s in slices),
        )
        for d_in, slices in SMOLLM2_LAYER
    ]
    base = [torch.randn(sum(slices), d_in, generator=g) for d_in, slices in SMOLLM2_LAYER]
    x_by_in = {d: torch.randn(tokens, d, generator=g) for d in (576, 1536)}
    ys = [torch.zeros(tokens, sum(slices)) for _, slices in SMOLLM2_LAYER]
    wrapper = type("Wrapper", (), {})()

    def lora() -> None:
        for (d_in, slices), (a, b), y in zip(SMOLLM2_LAYER, weights, ys, strict=True):
            cpu_lora.add_lora_linear(wrapper, y, x_by_in[d_in], a, b, 1.0, slices)

    def projections() -> None:
        for (d_in, _), w in zip(SMOLLM2_LAYER, base, strict=True):
            torch.nn.functional.linear(x_by_in[d_in], w)

    def once(fn) -> float:
        t0 = time.perf_counter()
        for _ in range(layers):
            fn()
        return time.perf_counter() - t0

    # each path as its thresholds make it (apply_lora reads them when it runs); arms timed in turn, best of REPEATS:
    # these machines' neighbours add noise, never speed, and alternating keeps a slow minute from favouring one arm
    arms = {"base": (projections, None, None), "masked": (lora, 10**9, 10**9), "segmented": (lora, 0, 10**9),
            "by run": (lora, 0, cpu_lora.RUN_MIN_TOKENS)}  # fmt: skip
    plans, best = {}, dict.fromkeys(arms, math.inf)
    saved = cpu_lora.SEGMENT_MIN_TOKENS, cpu_lora.RUN_MIN_TOKENS
    try:
        for name, (_, segment, run) in arms.items():
            if segment is not None:
                cpu_lora.RUN_MIN_TOKENS = run
                plans[name] = cpu_lora.make_plan(idx)
        for repeat in range(REPEATS + 1):  # the first: warm-up (and the stacked weights)
            for name, (fn, segment, run) in arms.items():
                if segment is not None:
                    cpu_lora.SEGMENT_MIN_TOKENS, cpu_lora.RUN_MIN_TOKENS = segment, run
                    wrapper._lorafleet_plan = plans[name]
                seconds = once(fn)
                if repeat:
                    best[name] = min(best[name], seconds * 1e3)
    finally:
        cpu_lora.SEGMENT_MIN_TOKENS, cpu_lora.RUN_MIN_TOKENS = saved
    return best


def prefill_chunks(decodes: int, prompts: int, prompt_tokens: int, adapters: int) -> torch.Tensor:
    """A batch's slot per token as vLLM lays it out: `decodes` tokens of sequences cycling over the adapters, then
    `prompts` prompts of `prompt_tokens` each, the tokens of each side by side."""
    return torch.cat(
        [torch.arange(decodes) % adapters, torch.arange(prompts).repeat_interleave(prompt_tokens) % adapters]
    )


def layer_bench(layers: int, slots: int) -> None:
    print(f"\nFused LoRA layers of one forward pass ({layers} layers, r=8 adapters, {slots} slots), float32;")
    print(f"mixed batches computed against every adapter and masked, by segment (>= {cpu_lora.SEGMENT_MIN_TOKENS} "
          f"adapter tokens), or by run (runs of >= {cpu_lora.RUN_MIN_TOKENS} tokens of one adapter in place, "
          "the rest by segment: the default); x: LoRA ms / base projections ms")  # fmt: skip
    print(f"{'case':44} {'base ms':>8} {'masked x':>9} {'segment x':>10} {'by run x':>9}")
    cases = [(f"{tokens} tokens, {n} adapters, interleaved", torch.arange(tokens) % n)
             for tokens in (16, 64, 256, 1024) for n in sorted({3, 6, min(8, slots)})]  # fmt: skip
    cases += [(f"16 decodes + {p} prompts x {t}, {n} adapters", prefill_chunks(16, p, t, n))
              for p, t in ((1, 280), (6, 280), (8, 64)) for n in sorted({3, min(8, slots)})]  # fmt: skip
    for name, idx in cases:
        r = _layer_case(idx, layers, 8, slots)
        print(f"{name:44} {r['base']:8.1f} {r['masked'] / r['base']:9.3f} {r['segmented'] / r['base']:10.3f} "
              f"{r['by run'] / r['base']:9.3f}")  # fmt: skip


def steps_bench(layers: int, slots: int, steps: int = 12) -> None:
    """Engine-like steps: 16 decodes over `slots` adapters beside 2 prompts of 280 tokens, a new mix each step, each
    layer with weights of its own (so stacked weight sets are cached per layer, as in an engine)."""
    cpu_lora._STACKS.clear()  # keyed by storage address, which an earlier case's freed weights may share
    g, rng = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    weights = [[(tuple(torch.randn(slots, 1, 8, d, generator=g) / 50 for _ in sl),
                 tuple(torch.randn(slots, 1, o, 8, generator=g) / 50 for o in sl)) for d, sl in SMOLLM2_LAYER]
               for _ in range(layers)]  # fmt: skip
    batches = [torch.cat([torch.randint(slots, (16,), generator=rng),
                          torch.randint(slots, (2,), generator=rng).repeat_interleave(280)]) for _ in range(steps)]  # fmt: skip
    x_by_in = {d: torch.randn(len(batches[0]), d, generator=g) for d in (576, 1536)}
    ys = [torch.zeros(len(batches[0]), sum(sl)) for _, sl in SMOLLM2_LAYER]
    wrapper, best, run_min = type("Wrapper", (), {})(), {}, cpu_lora.RUN_MIN_TOKENS
    try:
        for repeat in range(REPEATS + 1):
            for arm, threshold in (("by segment", 10**9), ("by run", run_min)):
                cpu_lora.RUN_MIN_TOKENS = threshold
                t0 = time.perf_counter()
                for idx in batches:
                    wrapper._lorafleet_plan = cpu_lora.make_plan(idx)
                    for layer in weights:
                        for (d_in, sl), (a, b), y in zip(SMOLLM2_LAYER, layer, ys, strict=True):
                            cpu_lora.add_lora_linear(wrapper, y, x_by_in[d_in], a, b, 1.0, sl)
                if repeat:
                    best[arm] = min(best.get(arm, math.inf), (time.perf_counter() - t0) / steps * 1e3)
    finally:
        cpu_lora.RUN_MIN_TOKENS = run_min
    print(f"\n{steps} steps of 16 decodes over {slots} adapters beside 2 prompts of 280 tokens, a new mix each step, "
          f"{layers} layers: LoRA ms per step by segment {best['by segment']:.1f}, by run {best['by run']:.1f}")  # fmt: skip


async def _timed_requests(url: str, items: list[dict], concurrency: int) -> tuple[float, int]:
    """The items' prompts to the adapter, not streamed, `concurrency` at a time: (wall seconds, output tokens)."""
    target = Target(name="cpu-lora", base_url=f"{url}/v1", model="adapter", price={"usd_per_hour": 1})
    sem = asyncio.Semaphore(concurrency)

    async def one(pool: ClientPool, item: dict) -> int:
        body = build_body(target, "adapter", item["messages"][:-1], 64, stream=False)
        async with sem, pool.lease() as client:
            reply, error = await post_json(client, endpoint(target), {}, body)
        if error:
            raise RuntimeError(f"request to {url} failed: {error}")
        return reply["usage"]["completion_tokens"]

    async with ClientPool(timeout_s=600) as pool:
        await one(pool, items[0])  # warm-up
        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(one(pool, it) for it in items))
        return time.perf_counter() - t0, sum(tokens)


def _engine_round(plugin_on: bool, adapter: Path, task: str, n: int, concurrency: int, log_dir: Path) -> dict:
    """One vLLM engine with the adapter, plugin on or off: n held-out prompts of the task, `concurrency` at a time."""
    os.environ[cpu_lora.ENV] = "1" if plugin_on else "0"  # the engine inherits it
    name = f"engine-{'ours' if plugin_on else 'vllm'}"
    cfg = one_engine_config(str(ensure("smollm2-135m-instruct")), log_dir, name=name)
    items = get_task(task).generate(n, "eval", seed=0)
    with running_stack(cfg, "none", ready_timeout=600) as stack:
        url = stack.engine_url()
        load = {"lora_name": "adapter", "lora_path": str(adapter.resolve())}  # as --lora-modules would at start
        r = httpx.post(f"{url}/v1/load_lora_adapter", json=load, timeout=120, trust_env=False)
        if r.status_code != 200:
            raise SystemExit(f"vLLM refused the adapter {adapter}: HTTP {r.status_code} {r.text[:500]}")
        seconds, tokens = asyncio.run(_timed_requests(url, items, concurrency))
    return {"seconds": seconds, "out_tokens": tokens}


def engine_bench(adapter: Path, task: str, n: int, concurrency: int) -> None:
    if not (adapter / "adapter_config.json").is_file():
        raise SystemExit(f"no adapter at {adapter}: train one first (make demo, or lorafleet train run)")
    log_dir = Path(tempfile.mkdtemp(prefix="cpu-lora-bench-"))
    print(f"{n} {task} eval requests through vLLM with adapter {adapter}, {concurrency} at a time (logs: {log_dir})")
    res = {}
    for on in (False, True):
        res[on] = r = _engine_round(on, adapter, task, n, concurrency, log_dir)
        name = "serve.engines.cpu_lora ops" if on else "vLLM's own CPU ops"
        print(f"  {name:20} {r['seconds']:7.1f} s  {r['out_tokens'] / r['seconds']:6.1f} out tok/s")
    print(f"  speed-up: {res[False]['seconds'] / res[True]['seconds']:.2f}x wall time")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M: 30)")
    p.add_argument("--rank", type=int, default=16, help="--max-lora-rank: vLLM pads every adapter to it")
    p.add_argument("--slots", type=int, default=4, help="--max-loras")
    p.add_argument("--engine", type=Path, metavar="ADAPTER", help="also time real vLLM engines serving this adapter")
    p.add_argument("--task", default="manifest", help="with --engine: whose held-out prompts to send")
    p.add_argument("--requests", type=int, default=32, help="with --engine: how many")
    p.add_argument("--concurrency", type=int, default=8, help="with --engine: how many at a time")
    args = p.parse_args()
    cases = [("prefill 512 tokens, 1 adapter", 512, 1), ("prefill 512 tokens, 3 adapters", 512, 3),
             ("decode 16 sequences, 1 adapter", 16, 1), ("decode 16 sequences, 3 adapters", 16, 3)]  # fmt: skip
    print(f"LoRA work of one forward pass ({args.layers} layers, rank {args.rank}, {args.slots} slots), bf16:")
    print(f"{'case':34} {'vLLM ops ms':>12} {'ours ms':>9} {'speed-up':>9} {'max rel diff':>13}")
    for name, tokens, adapters in cases:
        t_theirs, t_ours, err = _bench_case(tokens, adapters, args.layers, args.rank, args.slots)
        print(f"{name:34} {t_theirs * 1e3:12.1f} {t_ours * 1e3:9.1f} {t_theirs / t_ours:8.1f}x {err:13.2e}")
    layer_bench(args.layers, max(args.slots, 8))
    steps_bench(args.layers, max(args.slots, 8))
    if args.engine:
        engine_bench(args.engine, args.task, args.requests, args.concurrency)


if __name__ == "__main__":
    main()
