"""Faster multi-LoRA ops for vLLM on CPU, loaded into every vLLM process as a `vllm.general_plugins` entry point.

vLLM's CPU path applies LoRA with PyTorch ops (vllm/lora/ops/torch_ops) that gather a full copy of the adapter's
weight matrix for every token (`w[indices]`, then a batched mat-vec): a 500-token prefill copies the weights 500 times
per projection. Here each adapter slot present in the batch does one matmul over its own tokens instead; the
arithmetic is the same, the copies are gone (`python -m lorafleet.benches.cpu_lora` measures both).

It also mends the slot of tokens without an adapter: vLLM marks them -1, which the gather reads as the *last*
slot, so a base-model request batched beside adapter requests got the last slot's adapter once that slot held one
(tests/serve/test_cpu_lora.py shows it). Here -1 adds nothing, as in vLLM's GPU kernels.

On top of the ops, each LoRA layer is applied as a whole (`add_lora_linear`, replacing vLLM's loop of one shrink
and one expand per slice): the batch's slot plan is worked out once per batch, not per op; a batch without adapter
tokens does no LoRA work at all, nor does a layer no adapter of the batch trains (zero slots); and any other batch
costs one matmul for the shrink of every slice and one for the expand of every slice (B block-diagonal by slice), on weights stacked once per set of slots in use (trimmed to
the rank the loaded adapters really have). Tokens of a decode-sized mixed batch are computed against every adapter
in the batch and masked to their own: n adapters cost n times the (rank-sized) FLOPs of one, which on these shapes
is far cheaper than a loop of small ops per adapter; a prefill-sized one goes adapter by adapter, each on its own
tokens (SGMV-style), where the wasted FLOPs would cost more than the loop; and a prompt of one adapter (a run of its
tokens side by side) is computed on its rows in place, without the gather and scatter of a segment. vLLM writes a
slot only when it activates an adapter; that drops the stacked copies.

LORAFLEET_CPU_LORA=ops keeps only the per-op replacements; =0 runs vLLM's own ops (to compare).
LoRA engines are compiled as vLLM compiles LoRA-off ones (LORAFLEET_CPU_LORA_COMPILE=0: eager, vLLM's CPU default;
see "compiled engines" below).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from serve.engines.engine import LORA_COMPILE_ENV

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
    slots, slot_of_row, rows, has_lora = _plan(idx)
    if slots == [-1]:  # base-model tokens only: nothing to compute
        return x.new_zeros(x.shape[0], w.shape[1], dtype=dtype)
    x = x.to(dtype)
    if len(slots) == 1:  # the common case: one adapter in the batch
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


def _base_only(inputs, lora_indices_tensor) -> bool:
    """No token of the batch has an adapter (a LoRA engine serving base-model requests): the ops add nothing."""
    return inputs.shape[0] == lora_indices_tensor.shape[0] and _plan(lora_indices_tensor)[0] == [-1]


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    if inputs.shape[0] != lora_indices_tensor.shape[0]:  # a shape vLLM's einsum broadcasts: keep its own op
        return _vllm_op("bgmv_shrink")(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
    if _base_only(inputs, lora_indices_tensor):
        output_tensor[:, : lora_a_weights.shape[-2]] = 0
        return None
    outputs = lora_matmul(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    if inputs.shape[0] != lora_indices_tensor.shape[0]:
        return _vllm_op("bgmv_expand")(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
    if add_inputs and _base_only(inputs, lora_indices_tensor):
        return None
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
    if add_inputs and _base_only(inputs, lora_indices_tensor):
        return None
    outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


# --- one LoRA layer at a time (PunicaWrapperCPU.add_lora_linear) ---

STACKS_PER_LAYER = 4  # stacked copies of several slots kept per layer, one per set of slots in use
# A mixed batch with at least this many adapter tokens (a prefill) is computed adapter by adapter, each on its own
# tokens; a smaller one (decode) against every adapter at once, masked, where fewer, larger matmuls win. Measured
# by `python -m lorafleet.benches.cpu_lora` (LoRA ms / base ms, SmolLM2, 8 adapters): 16 tokens 0.26 masked vs 0.42
# by adapter, 64 tokens 0.26 vs 0.24, 256 tokens 0.30 vs 0.16, 1024 tokens 0.32 vs 0.16.
SEGMENT_MIN_TOKENS = 128
# A run of at least this many consecutive tokens of one adapter (a prompt: vLLM lays a request's tokens side by
# side, after the decodes) is computed on its own rows in place, with no gather and no scatter; the batch's other
# adapter tokens go by segment. `python -m lorafleet.benches.cpu_lora`, float32 on an AVX2 CPU: LoRA time / base
# projections' time with 16 decodes beside prompts of 280 tokens, by segment -> by run: 1 prompt, 3 adapters
# 0.145 -> 0.116; 1 prompt, 8 adapters 0.186 -> 0.158; 6 prompts, 3 adapters 0.154 -> 0.112; 6 prompts, 8 adapters
# 0.229 -> 0.149; and LoRA ms per engine-like step (a new mix of decodes each step) 190 -> 136 (8 adapters), 172 ->
# 121 (3). With a threshold of 32, 8 prompts of 64 tokens over 8 adapters went from 0.205 to 0.218-0.241 (a script
# of the same shape): many short runs cost more ops than they save.
RUN_MIN_TOKENS = 128


@dataclass
class Plan:
    """Which adapter slot each token of a batch reads, worked out once per batch: vLLM calls update_metadata when the
    batch's token-to-adapter mapping changes, and every LoRA layer of every forward pass then reads this."""

    tokens: int
    slots: tuple[int, ...]  # slots used by at least one token, ascending; () when no token has an adapter
    pos: torch.Tensor  # [tokens]: position of each token's slot in `slots`; -1 without an adapter
    uniform: bool  # every token uses slots[0]
    order: torch.Tensor  # the tokens with an adapter, grouped by slot (in the order of `slots`)
    segments: tuple[tuple[int, int, int], ...]  # (slot, start, end) of each slot's tokens in `order`
    runs: tuple[tuple[int, int, int], ...] = ()  # (slot, start, end): runs of >= RUN_MIN_TOKENS tokens of one slot
    rest: Plan | None = None  # with runs: the batch's other adapter tokens (the runs' marked -1)
    masks: dict = field(default_factory=dict)

    @property
    def segmented(self) -> bool:
        return not self.uniform and len(self.order) >= SEGMENT_MIN_TOKENS

    def mask(self, slices: int, rank: int, dtype: torch.dtype, scale: float) -> torch.Tensor:
        """[tokens, slices * len(slots) * rank]: `scale` where a column belongs to the token's own slot, else 0."""
        key = (slices, rank, dtype, scale)
        if key not in self.masks:
            n = len(self.slots)
            own = (self.pos.unsqueeze(1) == torch.arange(n)).to(dtype) * scale  # [tokens, n]
            self.masks[key] = own[:, None, :, None].expand(-1, slices, n, rank).reshape(self.tokens, -1)
        return self.masks[key]


def make_plan(idx: torch.Tensor) -> Plan:
    plan = _grouped_plan(idx)
    if plan.uniform or len(plan.order) < RUN_MIN_TOKENS:
        return plan
    runs, covered = _long_runs(idx)
    if runs:
        plan.runs, plan.rest = runs, _grouped_plan(idx.masked_fill(covered, -1))
    return plan


def _long_runs(idx: torch.Tensor) -> tuple[tuple[tuple[int, int, int], ...], torch.Tensor]:
    """The runs of at least RUN_MIN_TOKENS consecutive tokens of one slot, and a mask of the tokens they cover."""
    n = idx.shape[0]
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (idx[1:] != idx[:-1]).nonzero().squeeze(1) + 1])
    ends = torch.cat([starts[1:], torch.tensor([n])])
    keep = ((ends - starts) >= RUN_MIN_TOKENS) & (idx[starts] >= 0)
    runs = tuple(zip(idx[starts[keep]].tolist(), starts[keep].tolist(), ends[keep].tolist(), strict=True))
    covered = torch.zeros(n, dtype=torch.bool)
    for _, start, end in runs:
        covered[start:end] = True
    return runs, covered


def _grouped_plan(idx: torch.Tensor) -> Plan:
    slots = tuple(s for s in torch.unique(idx).tolist() if s >= 0)
    lookup = torch.full((max(slots, default=0) + 2,), -1)  # index -1 reads the last entry: -1
    lookup[list(slots)] = torch.arange(len(slots))
    pos = lookup[idx]
    has = (pos >= 0).nonzero().squeeze(1)
    order = has[torch.argsort(pos[has], stable=True)]
    ends = torch.bincount(pos[has], minlength=len(slots)).cumsum(0).tolist()
    segments = tuple(zip(slots, [0, *ends][:-1], ends, strict=True))
    return Plan(idx.shape[0], slots, pos, len(slots) == 1 and len(has) == idx.shape[0], order, segments)


# a layer's first lora_a_stacked tensor (its storage: a compiled graph hands the op new tuples of the same tensors)
# -> {slots: (a_t, bs, rank)}; emptied on every slot write
_STACKS: dict[int, dict] = {}


def stacked(a_stacked, b_stacked, slots: tuple[int, ...], dtype: torch.dtype):
    """The layer's weights for `slots`, laid out for two matmuls: a_t [in, slices * n * rank] (columns ordered by
    slice, then slot, then rank) and b [slices * n * rank, sum of the slices' outputs], block-diagonal by slice.
    Rank rows that are zero in every slot's A (vLLM pads each adapter to --max-lora-rank) are left out: they add
    exactly nothing. None when every row is: no adapter of `slots` trains this layer (a recipe that adapts only the
    top layers leaves the others' slots zero), so the layer costs what the base model's costs."""
    cache = _STACKS.setdefault(a_stacked[0].data_ptr(), {})
    if slots in cache:
        return cache[slots]
    pick = torch.tensor(slots)
    a = torch.stack([w.squeeze(1).index_select(0, pick) for w in a_stacked])  # [slices, n, R, in]
    live = a.abs().amax(dim=(0, 1, 3)).nonzero()
    if not live.numel():
        cache[slots] = None
        return None
    rank = int(live.max()) + 1
    a_t = a[:, :, :rank].reshape(-1, a.shape[-1]).t().contiguous().to(dtype)
    bs = [
        w.squeeze(1).index_select(0, pick)[:, :, :rank].transpose(1, 2).reshape(len(slots) * rank, -1).to(dtype)
        for w in b_stacked
    ]
    # one block-diagonal B for all slices: a single matmul and a single add into y, where a loop over the slices
    # cost three small ops each; the zero blocks add rank-sized FLOPs, far cheaper here than the per-op overhead
    b = torch.block_diag(*bs).contiguous()
    several = [k for k in cache if len(k) > 1]
    if len(slots) > 1 and len(several) >= STACKS_PER_LAYER:  # one slot's copy each is bounded by --max-loras
        cache.pop(several[0])
    cache[slots] = (a_t, b, rank)
    return cache[slots]


def update_metadata(self, mapping, *args, **kwargs):
    _ORIGINAL["update_metadata"](self, mapping, *args, **kwargs)
    _LIVE[:] = [self]
    self._lorafleet_plan = make_plan(self.token_lora_indices)
    self._lorafleet_sampler_plan = make_plan(self.sampler_indices)  # one row per sampled token (the lm_head's)


def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
    """y[:, slice s] += scale * x @ A_s[slot].T @ B_s[slot].T for every token with a slot, every slice s.

    Every tensor op here costs microseconds of dispatch, as much as a decode batch's rank-sized matmul: the code
    keeps to as few ops as it can (no view or cast that is not needed, the expand added into y by addmm_).
    """
    plan: Plan | None = getattr(self, "_lorafleet_plan", None)
    x2 = x if x.dim() == 2 else x.view(-1, x.shape[-1])
    if plan is None or plan.tokens != x2.shape[0]:  # a batch this plan was not made for: vLLM's loop of ops
        return _ORIGINAL["add_lora_linear"](
            self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
        )
    return apply_lora(plan, y, x2, lora_a_stacked, lora_b_stacked, scale, output_slices)


def apply_lora(plan: Plan, y, x2, lora_a_stacked, lora_b_stacked, scale: float, output_slices) -> None:
    if not plan.slots:
        return None  # no token has an adapter
    # In the engine's dtype, bf16 included: a float32 intermediate (as vLLM's kernels keep) cost a cast of x and a
    # full-width float32 product, more than the base projection itself at 256+ tokens on an AVX512-BF16 CPU
    # (python -m lorafleet.benches.cpu_lora). Rounding the rank-sized intermediate to bf16 moves the delta by
    # about 2^-8 of itself, the rounding y gets anyway.
    dtype = x2.dtype
    y2 = y if y.dim() == 2 else y.view(-1, y.shape[-1])
    width = sum(output_slices)
    out = y2 if y2.shape[1] == width else y2[:, :width]
    if plan.runs:
        return _add_by_run(plan, out, x2, lora_a_stacked, lora_b_stacked, scale, dtype)
    if plan.segmented:
        return _add_by_segment(plan, out, x2, lora_a_stacked, lora_b_stacked, scale, dtype)
    weights = stacked(lora_a_stacked, lora_b_stacked, plan.slots, dtype)
    if weights is None:
        return None  # no adapter of the batch trains this layer
    a_t, b, rank = weights
    h = torch.mm(x2, a_t)
    if not plan.uniform:
        h.mul_(plan.mask(len(output_slices), rank, dtype, scale))
    elif scale != 1.0:
        h.mul_(scale)
    if out.dtype == dtype:
        out.addmm_(h, b)
    else:
        out += torch.mm(h, b).to(out.dtype)
    return None


def _add_by_run(plan: Plan, out, x2, lora_a_stacked, lora_b_stacked, scale: float, dtype) -> None:
    """Each long run of one adapter's tokens added in place on its own rows; the other adapter tokens (decodes) by
    segment, on one adapter's stacked weights at a time. Not masked, even when few: that stacks the weights of the
    decodes' set of adapters, which changes from batch to batch, so the few sets kept per layer were stacked again
    and again (a script of steps_bench's shape, 8 adapters: 168 ms a step with the decodes masked, 125 by segment)."""
    weights = {slot: stacked(lora_a_stacked, lora_b_stacked, (slot,), dtype) for slot in plan.slots}
    if all(w is None for w in weights.values()):
        return None  # no adapter of the batch trains this layer
    for slot, start, end in plan.runs:
        w = weights[slot]
        if w is None:
            continue  # this adapter does not train this layer
        h = torch.mm(x2[start:end], w[0])
        if out.dtype == dtype:
            out[start:end].addmm_(h, w[1], alpha=scale)
        else:
            out[start:end] += torch.mm(h, w[1]).mul_(scale).to(out.dtype)
    if plan.rest.slots:
        _add_by_segment(plan.rest, out, x2, lora_a_stacked, lora_b_stacked, scale, dtype)


def _add_by_segment(plan: Plan, out, x2, lora_a_stacked, lora_b_stacked, scale: float, dtype) -> None:
    """Each adapter's tokens through its own weights only: no FLOPs spent on the other adapters (SGMV-style)."""
    weights = [stacked(lora_a_stacked, lora_b_stacked, (slot,), dtype) for slot, _, _ in plan.segments]
    if all(w is None for w in weights):
        return None  # no adapter of the batch trains this layer
    xs = x2.index_select(0, plan.order)
    delta = xs.new_zeros(xs.shape[0], out.shape[1]) if None in weights else xs.new_empty(xs.shape[0], out.shape[1])
    for (_, start, end), w in zip(plan.segments, weights, strict=True):
        if w is not None:
            torch.mm(torch.mm(xs[start:end], w[0]), w[1], out=delta[start:end])
    if scale != 1.0:
        delta.mul_(scale)
    out.index_add_(0, plan.order, delta if delta.dtype == out.dtype else delta.to(out.dtype))


# (first lora_a_stacked storage, slot) -> whether that slot's adapter changes the layer; emptied on every slot write
_ADAPTS: dict[tuple[int, int], bool] = {}


def _adapts(a: torch.Tensor, b: torch.Tensor, slot: int) -> bool:
    key = (a.data_ptr(), slot)
    if key not in _ADAPTS:
        _ADAPTS[key] = bool(a[slot].any()) and bool(b[slot].any())
    return _ADAPTS[key]


def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
    """The lm_head's LoRA for each sampled token, as add_lora_linear computes a layer's. vLLM wraps the lm_head
    whenever LoRA is on, yet adapters rarely train it: slots whose lm_head weights are all zero cost nothing (before,
    a mixed decode batch of 8 adapters multiplied 16 rows by 8 x 49,152 zero columns every step)."""
    plan: Plan | None = getattr(self, "_lorafleet_sampler_plan", None)
    x2 = x if x.dim() == 2 else x.view(-1, x.shape[-1])
    if plan is None or plan.tokens != x2.shape[0]:
        return _ORIGINAL["add_lora_logits"](self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs)
    if not any(_adapts(lora_a_stacked, lora_b_stacked, s) for s in plan.slots):
        return None
    return apply_lora(plan, y, x2, (lora_a_stacked,), (lora_b_stacked,), scale, (lora_b_stacked.shape[-2],))


# --- compiled engines: the wrapper's methods as opaque ops ---
#
# vLLM's CPU platform runs every LoRA engine eagerly: its own CPU ops read the batch's slot mapping from Python
# state (`indices_len`, `is_prefill`) that a graph traced once would freeze. Here (unless
# LORAFLEET_CPU_LORA_COMPILE=0, or an engine's `compile_lora: false`) the engine is compiled like a LoRA-off one,
# and the two wrapper methods the model's forward calls become custom ops: the graph calls them, and they read the
# current batch's plan when they run, never when the graph was traced.

_LIVE: list = []  # the engine process's punica wrapper, set by update_metadata before any forward pass
COMPILE_ENV = LORA_COMPILE_ENV


_LIB = torch.library.Library("lorafleet", "FRAGMENT")  # the ops below live as long as this object


def _register(name: str, impl, fake) -> None:
    """Define `lorafleet::name` straight on the dispatcher, as vLLM's direct_register_custom_op does: through
    torch.library.custom_op's Python layer a call cost 69 us here, this way 13 us, and a SmolLM2 forward calls the
    op 121 times (about 7 ms of a 150-180 ms decode step at 16 sequences)."""
    _LIB.define(name + torch.library.infer_schema(impl, mutates_args=("y",)))
    _LIB.impl(name, impl, "CPU")
    torch.library.register_fake(f"lorafleet::{name}", fake, lib=_LIB)


def _linear_op(
    y: torch.Tensor, x: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor], scale: float, slices: list[int]
) -> None:
    if _LIVE:  # no batch metadata yet: no adapter either
        add_lora_linear(_LIVE[0], y, x, tuple(a), tuple(b), scale, tuple(slices))


def _embedding_op(y: torch.Tensor, x: torch.Tensor, b: torch.Tensor, add_inputs: bool) -> None:
    if _LIVE:
        _ORIGINAL["add_lora_embedding"](_LIVE[0], y, x, b, add_inputs)


def _no_output(*args) -> None:
    return None


_register("add_lora_linear", _linear_op, _no_output)
_register("add_lora_embedding", _embedding_op, _no_output)


def add_lora_linear_compiled(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, **kwargs):
    if not torch.compiler.is_compiling():  # an engine run eagerly after all (e.g. -O0): no dispatcher detour
        return add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, **kwargs)
    torch.ops.lorafleet.add_lora_linear(y, x, list(lora_a_stacked), list(lora_b_stacked), scale, list(output_slices))


def add_lora_embedding_compiled(self, y, x, lora_b_stacked, add_inputs: bool = True, **kwargs):
    if not torch.compiler.is_compiling():
        return _ORIGINAL["add_lora_embedding"](self, y, x, lora_b_stacked, add_inputs, **kwargs)
    torch.ops.lorafleet.add_lora_embedding(y, x, lora_b_stacked, add_inputs)


def keep_compilation(original):
    """CpuPlatform.check_and_update_config, but a LoRA engine keeps the compilation a LoRA-off one gets."""

    def check_and_update_config(cls, vllm_config) -> None:
        lora, vllm_config.lora_config = vllm_config.lora_config, None
        try:
            original(vllm_config)
        finally:
            vllm_config.lora_config = lora

    return classmethod(check_and_update_config)


def activate_adapter(self, lora_id: int) -> bool:
    written = _ORIGINAL["activate_adapter"](self, lora_id)
    if written:  # a slot's weights changed in place: every stacked copy may hold the old ones
        _STACKS.clear()
        _ADAPTS.clear()
    return written


WRAPPER = {"update_metadata": update_metadata, "add_lora_linear": add_lora_linear, "add_lora_logits": add_lora_logits}


def _vllm_op(name: str):
    import vllm.lora.ops.torch_ops.lora_ops as ops

    return _ORIGINAL.get(name) or getattr(ops, name)


PATCHED = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
_ORIGINAL: dict = {}


def install(fused: bool = True, compiled: bool = False) -> bool:
    """Swap the ops into vLLM's torch_ops (where its sgmv_* ops look them up) and its CPU punica wrapper; with
    `fused`, also the wrapper's per-layer methods, and a hook on the adapter manager's slot writes."""
    import vllm.lora.ops.torch_ops as ops_pkg
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu
    from vllm.lora.model_manager import LoRAModelManager

    if ops.bgmv_shrink is bgmv_shrink:
        return False  # plugins may load more than once per process
    for name, fn in PATCHED.items():
        _ORIGINAL[name] = getattr(ops, name)
        for module in (ops, ops_pkg, punica_cpu):
            setattr(module, name, fn)
    if fused:
        for name, fn in WRAPPER.items():
            _ORIGINAL[name] = getattr(punica_cpu.PunicaWrapperCPU, name)
            setattr(punica_cpu.PunicaWrapperCPU, name, fn)
    if fused and compiled:
        from vllm.platforms.cpu import CpuPlatform

        _ORIGINAL["add_lora_embedding"] = punica_cpu.PunicaWrapperCPU.add_lora_embedding
        punica_cpu.PunicaWrapperCPU.add_lora_linear = add_lora_linear_compiled
        punica_cpu.PunicaWrapperCPU.add_lora_embedding = add_lora_embedding_compiled
        CpuPlatform.check_and_update_config = keep_compilation(CpuPlatform.check_and_update_config)
    if fused:
        _ORIGINAL["activate_adapter"] = LoRAModelManager.activate_adapter
        LoRAModelManager.activate_adapter = activate_adapter
    return True


def path(compiled: bool | None = None) -> str:
    """Which LoRA kernels an engine started with this environment runs; `compiled=False` for an engine that its
    own flags run eagerly (`--optimization-level 0`), whatever the environment says."""
    if compiled is None:
        compiled = os.environ.get(COMPILE_ENV, "1") != "0"
    fused = "lorafleet fused per-layer CPU LoRA, " + ("compiled engine" if compiled else "eager engine")
    return {"0": "vLLM's own CPU LoRA ops", "ops": "lorafleet per-op CPU LoRA ops"}.get(
        os.environ.get(ENV, "1"), fused
    )


def register() -> None:
    """The vLLM plugin hook: runs in every vLLM process; acts only on the CPU platform."""
    mode = os.environ.get(ENV, "1")
    if mode == "0":
        return
    from vllm.platforms import current_platform

    compiled = os.environ.get(COMPILE_ENV, "1") != "0"
    if current_platform.is_cpu() and install(fused=mode != "ops", compiled=compiled):
        # one line in each engine's log, so a reader (and tests/serve/test_cpu_lora.py) can tell it is on
        print(
            f"lorafleet: CPU LoRA ops from serve.engines.cpu_lora installed: {path()} "
            f"(pid {os.getpid()}; {ENV}=ops or 0 to compare)"
        )
