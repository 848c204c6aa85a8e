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
tokens does no LoRA work at all; and any other batch costs one matmul for the shrink of every slice and one per
slice for the expand, on weights stacked once per set of slots in use (trimmed to the rank the loaded adapters
really have). Tokens of a mixed batch are computed against every adapter in the batch and masked to their own: n
adapters cost n times the (rank-sized) FLOPs of one, which on these shapes is far cheaper than a loop of small ops
per adapter. vLLM writes a slot only when it activates an adapter; that
drops the stacked copies.

LORAFLEET_CPU_LORA=ops keeps only the per-op replacements; =0 runs vLLM's own ops (to compare).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

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

STACKS_PER_LAYER = 4  # stacked copies kept per layer, one per set of slots in use


@dataclass
class Plan:
    """Which adapter slot each token of a batch reads, worked out once per batch: vLLM calls update_metadata when the
    batch's token-to-adapter mapping changes, and every LoRA layer of every forward pass then reads this."""

    tokens: int
    slots: tuple[int, ...]  # slots used by at least one token, ascending; () when no token has an adapter
    pos: torch.Tensor  # [tokens]: position of each token's slot in `slots`; -1 without an adapter
    uniform: bool  # every token uses slots[0]
    masks: dict = field(default_factory=dict)

    def mask(self, slices: int, rank: int, dtype: torch.dtype, scale: float) -> torch.Tensor:
        """[tokens, slices * len(slots) * rank]: `scale` where a column belongs to the token's own slot, else 0."""
        key = (slices, rank, dtype, scale)
        if key not in self.masks:
            n = len(self.slots)
            own = (self.pos.unsqueeze(1) == torch.arange(n)).to(dtype) * scale  # [tokens, n]
            self.masks[key] = own[:, None, :, None].expand(-1, slices, n, rank).reshape(self.tokens, -1)
        return self.masks[key]


def make_plan(idx: torch.Tensor) -> Plan:
    slots = tuple(s for s in torch.unique(idx).tolist() if s >= 0)
    lookup = torch.full((max(slots, default=0) + 2,), -1)  # index -1 reads the last entry: -1
    lookup[list(slots)] = torch.arange(len(slots))
    pos = lookup[idx]
    return Plan(idx.shape[0], slots, pos, len(slots) == 1 and bool((pos == 0).all()))


_STACKS: dict[int, dict] = {}  # id(a layer's lora_a_stacked) -> {slots: (a_t, bs, rank)}; emptied on every slot write


def stacked(a_stacked, b_stacked, slots: tuple[int, ...], dtype: torch.dtype):
    """The layer's weights for `slots`, laid out for two matmuls: a_t [in, slices * n * rank] (columns ordered by
    slice, then slot, then rank) and one b [n * rank, out_slice] per slice. Rank rows that are zero in every slot's
    A (vLLM pads each adapter to --max-lora-rank) are left out: they add exactly nothing."""
    cache = _STACKS.setdefault(id(a_stacked), {})
    if slots in cache:
        return cache[slots]
    pick = torch.tensor(slots)
    a = torch.stack([w.squeeze(1).index_select(0, pick) for w in a_stacked])  # [slices, n, R, in]
    live = a.abs().amax(dim=(0, 1, 3)).nonzero()
    rank = int(live.max()) + 1 if live.numel() else 1
    a_t = a[:, :, :rank].reshape(-1, a.shape[-1]).t().contiguous().to(dtype)
    bs = [
        w.squeeze(1).index_select(0, pick)[:, :, :rank].transpose(1, 2).reshape(len(slots) * rank, -1).to(dtype)
        for w in b_stacked
    ]
    if len(cache) >= STACKS_PER_LAYER:
        cache.pop(next(iter(cache)))
    cache[slots] = (a_t, bs, rank)
    return cache[slots]


def update_metadata(self, mapping, *args, **kwargs):
    _ORIGINAL["update_metadata"](self, mapping, *args, **kwargs)
    self._lorafleet_plan = make_plan(self.token_lora_indices)


def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
    """y[:, slice s] += scale * x @ A_s[slot].T @ B_s[slot].T for every token with a slot, every slice s."""
    plan: Plan | None = getattr(self, "_lorafleet_plan", None)
    x2 = x.view(-1, x.shape[-1])
    if (
        plan is None or plan.tokens != x2.shape[0]
    ):  # a batch this plan was not made for: vLLM's loop over the ops above
        return _ORIGINAL["add_lora_linear"](
            self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
        )
    if not plan.slots:
        return None  # no token has an adapter
    # bf16/fp16 engines: the rank-sized intermediate stays float32, as in vLLM's kernels
    dtype = torch.float32 if x2.dtype in (torch.bfloat16, torch.float16) else x2.dtype
    a_t, bs, rank = stacked(lora_a_stacked, lora_b_stacked, plan.slots, dtype)
    h = x2.to(dtype) @ a_t
    if not plan.uniform:
        h *= plan.mask(len(output_slices), rank, dtype, scale)
    elif scale != 1.0:
        h *= scale
    y2, width, offset = y.view(-1, y.shape[-1]), len(plan.slots) * rank, 0
    for s, (b, size) in enumerate(zip(bs, output_slices, strict=True)):
        y2[:, offset : offset + size] += (h[:, s * width : (s + 1) * width] @ b).to(y2.dtype)
        offset += size
    return None


def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
    plan: Plan | None = getattr(self, "_lorafleet_plan", None)
    if plan is not None and not plan.slots:
        return None  # no token of the batch has an adapter: no sampled token has one either
    return _ORIGINAL["add_lora_logits"](self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs)


def activate_adapter(self, lora_id: int) -> bool:
    written = _ORIGINAL["activate_adapter"](self, lora_id)
    if written:  # a slot's weights changed in place: every stacked copy may hold the old ones
        _STACKS.clear()
    return written


WRAPPER = {"update_metadata": update_metadata, "add_lora_linear": add_lora_linear, "add_lora_logits": add_lora_logits}


def _vllm_op(name: str):
    import vllm.lora.ops.torch_ops.lora_ops as ops

    return _ORIGINAL.get(name) or getattr(ops, name)


PATCHED = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
_ORIGINAL: dict = {}


def install(fused: bool = True) -> bool:
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
        _ORIGINAL["activate_adapter"] = LoRAModelManager.activate_adapter
        LoRAModelManager.activate_adapter = activate_adapter
    return True


def path() -> str:
    """Which LoRA kernels an engine started with this environment runs."""
    return {"0": "vLLM's own CPU LoRA ops", "ops": "lorafleet per-op CPU LoRA ops"}.get(
        os.environ.get(ENV, "1"), "lorafleet fused per-layer CPU LoRA"
    )


def register() -> None:
    """The vLLM plugin hook: runs in every vLLM process; acts only on the CPU platform."""
    mode = os.environ.get(ENV, "1")
    if mode == "0":
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and install(fused=mode != "ops"):
        # one line in each engine's log, so a reader (and tests/serve/test_cpu_lora.py) can tell it is on
        print(
            f"lorafleet: CPU LoRA ops from serve.engines.cpu_lora installed: {path()} "
            f"(pid {os.getpid()}; {ENV}=ops or 0 to compare)"
        )
