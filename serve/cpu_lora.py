"""Faster multi-LoRA ops for vLLM on CPU, loaded into every vLLM process as a `vllm.general_plugins` entry point.

vLLM's CPU path applies LoRA with PyTorch ops (vllm/lora/ops/torch_ops) that gather a full copy of the adapter's
weight matrix for every token (`w[indices]`, then a batched mat-vec): a 500-token prefill copies the weights 500 times
per projection. Here each adapter slot present in the batch does one matmul over its own tokens instead; the
arithmetic is the same, the copies are gone (`python -m serve.cpu_lora` measures both).

It also mends the slot of tokens without an adapter: vLLM marks them -1, which the gather reads as the *last*
slot, so a base-model request batched beside adapter requests got the last slot's adapter once that slot held one
(tests/serve/test_cpu_lora.py shows it). Here -1 adds nothing, as in vLLM's GPU kernels.

Off with LORAFLEET_CPU_LORA=0 (vLLM's own ops then run, e.g. to compare).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ENV = "LORAFLEET_CPU_LORA"
ALL_SLOTS_MAX_TOKENS = 64  # up to this many tokens, one matmul over all slots (see lora_matmul)


def _plan(idx: torch.Tensor) -> tuple:
    """What lora_matmul needs to know about a batch's slot indices, computed once per batch, not per projection.

    vLLM hands every projection of a forward pass the same indices; comparing them with the last ones is one cheap
    op (vLLM runs under inference_mode, where tensors carry no version counter to key a cache on).
    """
    seen = _PLAN_CACHE.get("idx")
    if seen is None or seen.shape != idx.shape or not torch.equal(seen, idx):
        rows = torch.arange(idx.shape[0])
        plan = (torch.unique(idx).tolist(), idx.clamp(min=0), rows, (idx >= 0).unsqueeze(1))
        _PLAN_CACHE.update(idx=idx.clone(), plan=plan)
    return _PLAN_CACHE["plan"]


_PLAN_CACHE: dict = {}


def lora_matmul(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row t of the result is x[t] @ w[idx[t]].T; rows with idx -1 (no adapter) are zero.

    x: [T, in]; w: [slots, out, in] or [slots, 1, out, in]; idx: [T] slot per token.
    """
    if w.dim() == 4:
        w = w.squeeze(1)
    x = x.to(dtype)
    slots, slot_of_row, rows, has_lora = _plan(idx)
    if len(slots) == 1 and slots[0] >= 0:  # the common case: one adapter in the batch
        return x @ w[slots[0]].to(dtype).T
    if x.shape[0] <= ALL_SLOTS_MAX_TOKENS:
        # decode-sized mixed batches: every slot's product in one batched matmul beats a Python loop over
        # slots; the extra FLOPs are rank-sized
        every = torch.matmul(x, w.to(dtype).transpose(1, 2))  # [slots, T, out]
        return every[slot_of_row, rows] * has_lora
    out = x.new_zeros(x.shape[0], w.shape[1])
    for s in slots:
        if s >= 0:
            picked = (idx == s).nonzero().squeeze(1)
            out.index_copy_(0, picked, x.index_select(0, picked) @ w[s].to(dtype).T)
    return out


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    if inputs.shape[0] != lora_indices_tensor.shape[0]:  # a shape vLLM's einsum broadcasts: keep its own op
        return _vllm_op("bgmv_shrink")(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
    outputs = lora_matmul(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    if inputs.shape[0] != lora_indices_tensor.shape[0]:
        return _vllm_op("bgmv_expand")(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
    outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    # the same row limit and padding rules as vLLM's op
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int, add_inputs=True
):
    if inputs.shape[0] != lora_indices_tensor.shape[0]:
        return _vllm_op("bgmv_expand_slice")(
            inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs
        )
    outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def _vllm_op(name: str):
    import vllm.lora.ops.torch_ops.lora_ops as ops

    return _ORIGINAL.get(name) or getattr(ops, name)


PATCHED = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
_ORIGINAL: dict = {}


def install() -> bool:
    """Swap the ops into vLLM's torch_ops (where its sgmv_* ops look them up) and its CPU punica wrapper."""
    import vllm.lora.ops.torch_ops as ops_pkg
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    if ops.bgmv_shrink is bgmv_shrink:
        return False  # plugins may load more than once per process
    for name, fn in PATCHED.items():
        _ORIGINAL[name] = getattr(ops, name)
        for module in (ops, ops_pkg, punica_cpu):
            setattr(module, name, fn)
    return True


def register() -> None:
    """The vLLM plugin hook: runs in every vLLM process; acts only on the CPU platform."""
    if os.environ.get(ENV, "1") == "0":
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and install():
        # one line in each engine's log, so a reader (and tests/serve/test_cpu_lora.py) can tell it is on
        print(f"lorafleet: CPU LoRA ops from serve.cpu_lora installed (pid {os.getpid()}; {ENV}=0 turns them off)")


# --- `python -m serve.cpu_lora`: vLLM's ops vs these, on one forward pass's LoRA work of SmolLM2-135M ---

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
    import time

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
    theirs = {n: _vllm_op(n) for n in PATCHED}
    timings = []
    for impl in (theirs, PATCHED):
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


def _engine_round(plugin_on: bool, adapter: Path, task: str, n: int, concurrency: int, log_dir: Path) -> dict:
    """One vLLM engine with the adapter, plugin on or off: n held-out prompts of the task, `concurrency` at a time."""
    import asyncio
    import time

    import httpx

    from serve.bench import free_port
    from serve.engine import Engine, EngineSpec
    from train.models import ensure
    from train.tasks import get_task

    os.environ[ENV] = "1" if plugin_on else "0"
    spec = EngineSpec(name="cpu-lora", model=ensure("smollm2-135m-instruct"), port=free_port(),
                      served_name="base", lora_modules={"adapter": adapter})  # fmt: skip
    engine = Engine(spec, log_dir / f"engine-{'ours' if plugin_on else 'vllm'}.log").start()
    items = get_task(task).generate(n, "eval", seed=0)
    try:
        engine.wait_ready(timeout=600)

        async def run() -> tuple[float, int]:
            sem = asyncio.Semaphore(concurrency)
            async with httpx.AsyncClient(base_url=spec.url, timeout=600) as client:

                async def one(item: dict) -> int:
                    body = {"model": "adapter", "messages": item["messages"][:-1], "max_tokens": 64, "temperature": 0}
                    async with sem:
                        r = (await client.post("/v1/chat/completions", json=body)).raise_for_status()
                    return r.json()["usage"]["completion_tokens"]

                await one(items[0])  # warm-up
                t0 = time.perf_counter()
                tokens = await asyncio.gather(*(one(it) for it in items))
                return time.perf_counter() - t0, sum(tokens)

        seconds, tokens = asyncio.run(run())
    finally:
        engine.stop()
    return {"seconds": seconds, "out_tokens": tokens}


def engine_bench(adapter: Path, task: str, n: int, concurrency: int) -> None:
    import tempfile

    if not (adapter / "adapter_config.json").is_file():
        raise SystemExit(f"no adapter at {adapter}: train one first (make demo, or lorafleet train run)")
    log_dir = Path(tempfile.mkdtemp(prefix="cpu-lora-bench-"))
    print(f"{n} {task} eval requests through vLLM with adapter {adapter}, {concurrency} at a time (logs: {log_dir})")
    res = {}
    for on in (False, True):
        res[on] = r = _engine_round(on, adapter, task, n, concurrency, log_dir)
        name = "serve.cpu_lora ops" if on else "vLLM's own CPU ops"
        print(f"  {name:20} {r['seconds']:7.1f} s  {r['out_tokens'] / r['seconds']:6.1f} out tok/s")
    print(f"  speed-up: {res[False]['seconds'] / res[True]['seconds']:.2f}x wall time")


def main() -> None:
    import argparse

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
    if args.engine:
        engine_bench(args.engine, args.task, args.requests, args.concurrency)


if __name__ == "__main__":
    main()
