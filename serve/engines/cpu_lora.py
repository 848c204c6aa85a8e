"""Faster multi-LoRA ops for vLLM on CPU, loaded into every vLLM process as a `vllm.general_plugins` entry point.

vLLM's CPU path applies LoRA with PyTorch ops (vllm/lora/ops/torch_ops) that gather a full copy of the adapter's
weight matrix for every token (`w[indices]`, then a batched mat-vec): a 500-token prefill copies the weights 500 times
per projection. Here each adapter slot present in the batch does one matmul over its own tokens instead; the
arithmetic is the same, the copies are gone (`python -m lorafleet.benches.cpu_lora` measures both).

It also mends the slot of tokens without an adapter: vLLM marks them -1, which the gather reads as the *last*
slot, so a base-model request batched beside adapter requests got the last slot's adapter once that slot held one
(tests/serve/test_cpu_lora.py shows it). Here -1 adds nothing, as in vLLM's GPU kernels.

Off with LORAFLEET_CPU_LORA=0 (vLLM's own ops then run, e.g. to compare).
"""

from __future__ import annotations

import os

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
        print(
            f"lorafleet: CPU LoRA ops from serve.engines.cpu_lora installed (pid {os.getpid()}; {ENV}=0 turns them off)"
        )
