"""serve/engines/cpu_lora.py: the CPU LoRA ops compute what vLLM's do (minus the wrong slot for -1), and the engine uses them."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest
import torch

from serve.engines import cpu_lora
from serve.engines.deploy import gpu_count
from tests.serve.conftest import metric
from tests.serve.fake_engine import wait_for
from train.export import random_adapter

SLOTS, RANK = 4, 16
# The plugin acts on the CPU platform only; on a GPU host the engine runs vLLM's CUDA kernels instead.
cpu_engine = pytest.mark.skipif(
    gpu_count() > 0, reason="GPU host: vLLM serves LoRA with its CUDA kernels, not this plugin"
)


def reference(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Row by row, in float64: x[t] @ w[idx[t]].T, zero for -1."""
    w = w.squeeze(1).double()
    rows = [
        w[i] @ x[t].double() if i >= 0 else torch.zeros(w.shape[1], dtype=torch.float64)
        for t, i in enumerate(idx.tolist())
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("tokens", [5, 64, 65, 300])  # both sides of ALL_SLOTS_MAX_TOKENS
@pytest.mark.parametrize("layout", ["one", "mixed", "none"])
def test_lora_matmul_matches_row_by_row_reference(tokens, layout):
    g = torch.Generator().manual_seed(tokens)
    x, w = torch.randn(tokens, 96, generator=g), torch.randn(SLOTS, 1, RANK, 96, generator=g)
    idx = {"one": torch.full((tokens,), 2), "none": torch.full((tokens,), -1),
           "mixed": torch.arange(tokens) % (SLOTS + 1) - 1}[layout]  # fmt: skip
    got = cpu_lora.lora_matmul(x, w, idx, torch.float32)
    assert torch.allclose(got.double(), reference(x, w, idx), atol=1e-4)
    if layout == "none":
        assert not got.any()  # no adapter: nothing added (vLLM's own op would add the last slot's)


def _run_ops(impl: dict, x, a, b, idx) -> tuple[torch.Tensor, ...]:
    """A shrink and both expands, called as vLLM's punica wrapper calls them."""
    buf = torch.zeros(x.shape[0], RANK)
    impl["bgmv_shrink"](x, a, buf, idx, 0.5)
    y = torch.ones(x.shape[0], 100, dtype=torch.bfloat16)
    impl["bgmv_expand_slice"](buf, b, y, idx, 10, 48, True)
    z = torch.zeros(x.shape[0], 48, dtype=torch.bfloat16)
    impl["bgmv_expand"](buf, b, z, idx, False)
    return buf, y, z


def test_ops_match_vllms_where_every_token_has_an_adapter():

    theirs = {n: cpu_lora._vllm_op(n) for n in cpu_lora.PATCHED}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64, generator=g).to(torch.bfloat16)
    a = torch.randn(SLOTS, 1, RANK, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(SLOTS, 1, 48, RANK, generator=g).to(torch.bfloat16)
    idx = torch.arange(40) % SLOTS
    mine, vllms = _run_ops(cpu_lora.PATCHED, x, a, b, idx), _run_ops(theirs, x, a, b, idx)
    for m, v in zip(mine, vllms, strict=True):
        assert torch.allclose(m.float(), v.float(), rtol=2e-2, atol=2e-2)
    assert (mine[1][:, :10] == 1).all() and (mine[1][:, 58:] == 1).all()  # outside the slice untouched


def test_a_batch_without_adapters_adds_nothing():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 64, generator=g).to(torch.bfloat16)
    a = torch.randn(SLOTS, 1, RANK, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(SLOTS, 1, 48, RANK, generator=g).to(torch.bfloat16)
    buf, y, z = _run_ops(cpu_lora.PATCHED, x, a, b, torch.full((40,), -1))
    assert not buf.any() and (y == 1).all() and not z.any()


def test_shapes_vllms_einsum_broadcasts_fall_back_to_its_op():

    g = torch.Generator().manual_seed(1)
    x, b = torch.randn(1, RANK, generator=g), torch.randn(SLOTS, 1, 48, RANK, generator=g)
    idx = torch.tensor([0, 1, 2])
    mine, vllms = torch.zeros(3, 48), torch.zeros(3, 48)
    cpu_lora.bgmv_expand(x, b, mine, idx, False)
    cpu_lora._vllm_op("bgmv_expand")(x, b, vllms, idx, False)
    assert torch.equal(mine, vllms) and mine.any()


def test_register_installs_once_and_honours_the_off_switch(monkeypatch):
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.platforms.cpu import CpuPlatform

    wrapper, manager = punica_cpu.PunicaWrapperCPU, LoRAModelManager
    saved = {n: getattr(ops, n) for n in cpu_lora.PATCHED}
    saved_wrapper = {n: getattr(wrapper, n) for n in (*cpu_lora.WRAPPER, "add_lora_embedding")}
    saved_activate, saved_check = manager.activate_adapter, CpuPlatform.__dict__["check_and_update_config"]
    try:
        monkeypatch.setenv(cpu_lora.ENV, "0")
        cpu_lora.register()
        assert ops.bgmv_shrink is saved["bgmv_shrink"] or ops.bgmv_shrink is cpu_lora.bgmv_shrink
        monkeypatch.setenv(cpu_lora.ENV, "1")
        monkeypatch.delenv(cpu_lora.COMPILE_ENV, raising=False)  # the default: compiled
        cpu_lora.register()
        assert ops.bgmv_shrink is cpu_lora.bgmv_shrink and punica_cpu.bgmv_expand is cpu_lora.bgmv_expand
        assert wrapper.add_lora_linear is cpu_lora.add_lora_linear_compiled
        assert wrapper.add_lora_embedding is cpu_lora.add_lora_embedding_compiled
        assert CpuPlatform.__dict__["check_and_update_config"] is not saved_check
        assert manager.activate_adapter is cpu_lora.activate_adapter
        assert cpu_lora.install() is False  # vLLM may load plugins more than once per process
    finally:
        for module in (ops, punica_cpu):
            for n, fn in saved.items():
                setattr(module, n, fn)
        for n, fn in saved_wrapper.items():
            setattr(wrapper, n, fn)
        manager.activate_adapter = saved_activate
        CpuPlatform.check_and_update_config = saved_check
        cpu_lora._ORIGINAL.clear()


def test_ops_only_mode_leaves_the_layer_methods_to_vllm(monkeypatch):
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    wrapper = punica_cpu.PunicaWrapperCPU
    saved, saved_linear = {n: getattr(ops, n) for n in cpu_lora.PATCHED}, wrapper.add_lora_linear
    try:
        monkeypatch.setenv(cpu_lora.ENV, "ops")
        cpu_lora.register()
        assert ops.bgmv_shrink is cpu_lora.bgmv_shrink and wrapper.add_lora_linear is saved_linear
        assert "per-op" in cpu_lora.path()
    finally:
        for module in (ops, punica_cpu):
            for n, fn in saved.items():
                setattr(module, n, fn)
        cpu_lora._ORIGINAL.clear()


# --- the per-layer path, on vLLM's real CPU punica wrapper ---

IN, OUTS, MAX_RANK = 96, (48, 16, 16), 16  # a qkv-like layer: three slices


@pytest.fixture
def ops_installed(monkeypatch):
    """The per-op replacements in place, as in an engine (large mixed batches fall back to vLLM's loop over them)."""
    import vllm.lora.ops.torch_ops as ops_pkg
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    for name, fn in cpu_lora.PATCHED.items():
        monkeypatch.setitem(cpu_lora._ORIGINAL, name, getattr(ops, name))
        for module in (ops, ops_pkg, punica_cpu):
            monkeypatch.setattr(module, name, fn)


def punica(slot_ids: list, token_ids: list[int]):
    """vLLM's CPU punica wrapper given a batch mapping (token -> adapter id, 0 = base), the way its model manager
    gives it, with the plan update installed."""
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    wrapper = PunicaWrapperCPU(max_num_batched_tokens=512, max_batches=512, device="cpu")
    cpu_lora._ORIGINAL.setdefault("update_metadata", PunicaWrapperCPU.update_metadata)
    cpu_lora._ORIGINAL.setdefault("add_lora_linear", PunicaWrapperCPU.add_lora_linear)
    mapping = LoRAMapping(tuple(token_ids), tuple(token_ids), is_prefill=True)
    cpu_lora.update_metadata(wrapper, mapping, slot_ids, len(slot_ids) + 1, 1000)
    return wrapper


def layer_weights(seed: int, rank: int = 8, slices=OUTS):
    """Stacked A and B per slice as vLLM allocates them ([slots, 1, R, in], [slots, 1, out, R]): each adapter
    fills only `rank` of the MAX_RANK rows."""
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.zeros(SLOTS, 1, MAX_RANK, IN) for _ in slices)
    b = tuple(torch.zeros(SLOTS, 1, out, MAX_RANK) for out in slices)
    for w in a:
        w[:, :, :rank] = torch.randn(SLOTS, 1, rank, IN, generator=g) / 10
    for w in b:
        w[:, :, :, :rank] = torch.randn(*w.shape[:3], rank, generator=g) / 10
    return a, b


def expected(y, x, a, b, slot_of_token: list[int], slices=OUTS, scale: float = 1.0) -> torch.Tensor:
    """Row by row in float64: y[t, slice s] + scale * x[t] @ A_s[slot].T @ B_s[slot].T; nothing for slot -1."""
    out = y.double().clone()
    for t, slot in enumerate(slot_of_token):
        offset = 0
        for s, size in enumerate(slices):
            if slot >= 0:
                h = a[s][slot, 0].double() @ x[t].double()
                out[t, offset : offset + size] += scale * (b[s][slot, 0].double() @ h)
            offset += size
    return out


RUN = 40  # tokens per prompt in the layouts below; the tests lower RUN_MIN_TOKENS to 32 to keep batches small
DECODES = (0, 11, 12, 14, 11, 0)


def prefills(tokens: int, decodes_after: bool = False) -> list[int]:
    """A batch as vLLM lays out decodes beside prefill chunks: 6 decode tokens of mixed adapters (and the base),
    then each request's prompt tokens side by side, RUN at a time: adapter 11, the base, 14, 11 again, 12, ...
    `decodes_after`: the decodes split, half before the prompts and half after."""
    head, tail = (DECODES[:3], DECODES[3:]) if decodes_after else (DECODES, ())
    prompts = tokens - min(tokens, len(head) + len(tail))
    ids = list(head) + [(11, 0, 14, 11, 12)[(t // RUN) % 5] for t in range(prompts)] + list(tail)
    return ids[:tokens]


LAYOUTS = ["uniform", "mixed", "none", "one-beside-base", "prefills", "prefills-split"]


def layout_ids(layout: str, tokens: int) -> list[int]:
    """Adapter id per token (0: the base model) for a batch of `tokens` in one of LAYOUTS."""
    if layout.startswith("prefills"):
        return prefills(tokens, decodes_after=layout == "prefills-split")
    return {"uniform": [12] * tokens, "none": [0] * tokens, "one-beside-base": [14, 0] * tokens,
            "mixed": [(0, 11, 12, 14)[t % 4] for t in range(tokens)]}[layout][:tokens]  # fmt: skip


@pytest.fixture(autouse=True)
def short_runs(monkeypatch):
    monkeypatch.setattr(cpu_lora, "RUN_MIN_TOKENS", 32)


def slot_indices(ids: list[int]) -> torch.Tensor:
    return torch.tensor([{0: -1, 11: 0, 12: 1, 14: 3}[i] for i in ids])


def test_prefill_runs_are_found_and_the_rest_planned_apart():
    plan = cpu_lora.make_plan(slot_indices(prefills(200)))
    # 40-token runs from token 6 on: 11, base (no run: nothing to add), 14, 11, 12 (cut to 34 tokens: still a run)
    assert plan.runs == ((0, 6, 46), (3, 86, 126), (0, 126, 166), (1, 166, 200))
    # the other adapter tokens (the decodes) are planned by segment, grouped by slot, the runs' tokens left out
    assert plan.rest.order.tolist() == [1, 4, 2, 3] and plan.rest.segments == ((0, 0, 2), (1, 2, 3), (3, 3, 4))
    split = cpu_lora.make_plan(slot_indices(prefills(200, decodes_after=True)))
    assert split.rest.order.tolist() == [1, 198, 2, 197]  # decodes on both sides of the prompts
    short = cpu_lora.make_plan(torch.tensor([0] * 31 + [1] * 31))
    assert not short.runs and short.rest is None  # runs under RUN_MIN_TOKENS: the grouped paths as before


@pytest.mark.parametrize("tokens", [1, 16, 64, 65, 200])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("path", "scale"), [("masked", 1.0), ("segmented", 1.0), ("masked", 0.5), ("segmented", 0.5)])
def test_fused_layer_matches_row_by_row_reference(tokens, layout, path, scale, ops_installed, monkeypatch):
    """Every way of computing a mixed batch: every adapter at once and masked, each adapter on its own tokens, and
    (layout "prefills") runs of one adapter's tokens in place beside the rest."""
    monkeypatch.setattr(cpu_lora, "SEGMENT_MIN_TOKENS", 0 if path == "segmented" else 10**9)
    cpu_lora._STACKS.clear()
    slot_ids = [11, 12, None, 14]  # adapter id per slot; slot 2 empty
    ids = layout_ids(layout, tokens)
    slot_of = {0: -1, 11: 0, 12: 1, 14: 3}
    g = torch.Generator().manual_seed(tokens)
    x, y = torch.randn(tokens, IN, generator=g), torch.randn(tokens, sum(OUTS), generator=g)
    a, b = layer_weights(seed=3)
    want = expected(y, x, a, b, [slot_of[i] for i in ids], scale=scale)
    wrapper = punica(slot_ids, ids)
    cpu_lora.add_lora_linear(wrapper, y, x, a, b, scale, OUTS)
    assert torch.allclose(y.double(), want, atol=1e-5)


@pytest.mark.parametrize("path", ["masked", "segmented", "prefills"])
def test_a_bf16_engines_fused_layer_stays_within_bf16_rounding_of_the_reference(path, ops_installed, monkeypatch):
    """bf16 engines compute the LoRA delta in bf16 (no float32 intermediate): the delta stays within a few bf16
    roundings of the float64 reference, where dropping it would miss by its whole size."""
    monkeypatch.setattr(cpu_lora, "SEGMENT_MIN_TOKENS", 0 if path == "segmented" else 10**9)
    cpu_lora._STACKS.clear()
    ids = layout_ids("prefills" if path == "prefills" else "mixed", 200)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(200, IN, generator=g).bfloat16(), torch.randn(200, sum(OUTS), generator=g).bfloat16()
    a, b = (tuple(w.bfloat16() for w in ws) for ws in layer_weights(seed=3))
    want = expected(y, x, a, b, [{0: -1, 11: 0, 12: 1, 14: 3}[i] for i in ids])
    got = y.clone()
    cpu_lora.add_lora_linear(punica([11, 12, None, 14], ids), got, x, a, b, 1.0, OUTS)
    assert got.dtype == torch.bfloat16
    delta, err = (want - y.double()).abs().mean(), (got.double() - want).abs()
    assert delta > 0.1 and err.mean() < delta / 50  # bf16 keeps about 3 digits
    assert torch.allclose(got.double(), want, rtol=2e-2, atol=2e-2)


def test_fused_layer_leaves_out_only_rank_rows_that_are_zero_everywhere():
    cpu_lora._STACKS.clear()
    a, b = layer_weights(seed=5, rank=4)
    a[1][3, 0, 6] = 0.5  # one adapter of rank 7 among rank-4 ones: rows up to 7 must stay
    _, _, rank = cpu_lora.stacked(a, b, (0, 3), torch.float32)
    assert rank == 7
    _, _, rank = cpu_lora.stacked(a, b, (0, 1), torch.float32)
    assert rank == 4


@pytest.mark.parametrize("path", ["masked", "segmented", "prefills"])
def test_a_layer_no_adapter_of_the_batch_trains_costs_no_lora_work(path, ops_installed, monkeypatch):
    """A recipe that adapts only the top layers leaves the other layers' slots zero: a batch of such adapters adds
    nothing there without a matmul, and a batch that mixes them with one that does train the layer stays exact."""
    monkeypatch.setattr(cpu_lora, "SEGMENT_MIN_TOKENS", 0 if path == "segmented" else 10**9)
    cpu_lora._STACKS.clear()
    slot_ids, slot_of = [11, 12, None, 14], {0: -1, 11: 0, 12: 1, 14: 3}
    ids = layout_ids("prefills" if path == "prefills" else "mixed", 200)
    a, b = layer_weights(seed=4)
    for w in a:
        w[1] = 0  # adapter 12 does not train this layer (vLLM leaves its slot zero)
    x, y = torch.randn(200, IN), torch.randn(200, sum(OUTS))
    want = expected(y, x, a, b, [slot_of[i] for i in ids])
    cpu_lora.add_lora_linear(punica(slot_ids, ids), y, x, a, b, 1.0, OUTS)
    assert torch.allclose(y.double(), want, atol=1e-5)

    for w in a:
        w[:] = 0  # now no adapter of the batch trains it
    cpu_lora._STACKS.clear()

    def no_matmul(*args, **kwargs):
        raise AssertionError("multiplied by the weights of a layer no adapter of the batch trains")

    monkeypatch.setattr(torch, "mm", no_matmul)
    before = y.clone()
    cpu_lora.add_lora_linear(punica(slot_ids, ids), y, x, a, b, 1.0, OUTS)
    assert torch.equal(y, before)


def test_a_slot_written_again_is_never_served_from_the_old_stack(monkeypatch):
    """vLLM reuses a slot for another adapter by writing its weights in place; the stacked copy must not outlive it."""
    cpu_lora._STACKS.clear()
    a, b = layer_weights(seed=9)
    x, ids = torch.randn(4, IN), [11, 11, 11, 11]
    wrapper = punica([11, None, None, None], ids)
    first = torch.zeros(4, sum(OUTS))
    cpu_lora.add_lora_linear(wrapper, first, x, a, b, 1.0, OUTS)
    for w in (*a, *b):  # what vLLM's set_lora does when another adapter takes slot 0
        w[0].mul_(-2)
    monkeypatch.setitem(cpu_lora._ORIGINAL, "activate_adapter", lambda manager, lora_id: True)
    assert cpu_lora._adapts(a[0], b[0], 0)
    assert cpu_lora.activate_adapter(None, 99) is True
    assert not cpu_lora._ADAPTS  # whether a slot adapts the lm_head is asked again too
    second = torch.zeros(4, sum(OUTS))
    cpu_lora.add_lora_linear(wrapper, second, x, a, b, 1.0, OUTS)
    assert torch.allclose(second, first * 4, atol=1e-5)  # A and B both scaled by -2


def test_lm_head_lora_is_added_per_sampled_token_and_skipped_where_no_adapter_trains_it(ops_installed, monkeypatch):
    cpu_lora._STACKS.clear()
    cpu_lora._ADAPTS.clear()
    vocab = 40
    (a,), (b,) = layer_weights(seed=6, slices=(vocab,))
    a[1], b[1] = 0, 0  # adapter 12 leaves the lm_head alone, as nearly every PEFT adapter does
    slot_ids, slot_of = [11, 12, None, 14], {0: -1, 11: 0, 12: 1, 14: 3}
    ids = [11, 12, 0, 14, 11, 12]
    x, y = torch.randn(len(ids), IN), torch.randn(len(ids), vocab)
    want = expected(y, x, (a,), (b,), [slot_of[i] for i in ids], slices=(vocab,))
    cpu_lora.add_lora_logits(punica(slot_ids, ids), y, x, a, b, 1.0)
    assert torch.allclose(y.double(), want, atol=1e-5)

    def no_work(*args):
        raise AssertionError("computed the lm_head LoRA of adapters that leave it alone")

    monkeypatch.setattr(cpu_lora, "apply_lora", no_work)
    y = torch.randn(3, vocab)
    before = y.clone()
    cpu_lora.add_lora_logits(punica(slot_ids, [12, 0, 12]), y, torch.randn(3, IN), a, b, 1.0)
    assert torch.equal(y, before)


def test_a_graph_traced_once_applies_each_batchs_own_adapters(ops_installed):
    """Compiled engines (the default; LORAFLEET_CPU_LORA_COMPILE=0 turns it off) trace the model once: the layer op must read the slot plan of
    the batch it runs on, not the one it was traced with. One trace serves three batches with different slots."""
    from torch._dynamo.testing import CompileCounterWithBackend

    cpu_lora._STACKS.clear()
    a, b = layer_weights(seed=4)
    counter = CompileCounterWithBackend("aot_eager")  # functionalizes the in-place op like inductor does

    @torch.compile(backend=counter, fullgraph=True, dynamic=False)
    def layer(y, x):
        cpu_lora.add_lora_linear_compiled(None, y, x, a, b, 1.0, OUTS)
        return y * 1

    slot_ids, slot_of = [11, 12, None, 14], {0: -1, 11: 0, 12: 1, 14: 3}
    x = torch.randn(8, IN, generator=torch.Generator().manual_seed(1))
    for ids in ([12] * 8, [0, 11, 12, 14] * 2, [0] * 8):
        punica(slot_ids, ids)  # what vLLM does before each batch's forward pass
        y = torch.randn(8, sum(OUTS), generator=torch.Generator().manual_seed(2))
        want = expected(y, x, a, b, [slot_of[i] for i in ids])
        assert torch.allclose(layer(y.clone(), x).double(), want, atol=1e-5), ids
    assert counter.frame_count == 1


def test_entry_point_is_registered_with_vllm():
    from importlib.metadata import entry_points

    assert "serve.engines.cpu_lora:register" in [e.value for e in entry_points(group="vllm.general_plugins")]


# --- through a real vLLM engine ---


def small_adapter(base_path, out_dir, seed: int, std: float = 0.02, layers: list[int] | None = None):
    """A LoRA adapter that changes the model clearly but keeps its outputs in a sane range."""
    return random_adapter(base_path, out_dir, seed=seed, r=8, std=std, layers=layers)


def load_adapter(url: str, name: str, path) -> None:
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=120)
    assert r.status_code == 200, r.text


def prompt_logprobs(url: str, model: str, ids: list[int]) -> list[float]:
    body = {"model": model, "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 0, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["token_logprobs"][1 : len(ids)]


def decode_stream(url: str, model: str, prompt: str, decoding: threading.Event, stop: threading.Event) -> bool:
    """A streamed completion of forced tokens that runs until `stop` is set (closing the stream aborts it in vLLM);
    sets `decoding` once tokens flow. True if it was still decoding when stopped, so the overlap is proven whatever
    the machine's speed."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1800, "temperature": 0, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=150) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if stop.is_set():
                    return True
                if line.startswith("data: {"):
                    decoding.set()
        return False
    finally:
        decoding.set()


def next_token_logprobs(url: str, model: str, ids: list[int], k: int = 20) -> list[float]:
    """The k largest next-token log-probs after `ids`, sorted: a continuous summary of the distribution that does
    not jump when two near-tied tokens swap places."""
    body = {"model": model, "prompt": ids, "max_tokens": 1, "logprobs": k, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return sorted(r.json()["choices"][0]["logprobs"]["top_logprobs"][0].values(), reverse=True)


def distance(a: list[list[float]], b: list[list[float]]) -> float:
    """Mean absolute difference of the top log-probs, over every probe position."""
    diffs = [
        abs(x - y) for pa, pb in zip(a, b, strict=True) for x, y in zip(pa, pb, strict=False)
    ]  # top-k dicts may merge tokens that print alike
    return sum(diffs) / len(diffs)


def engine_queue(url: str) -> tuple[float, float]:
    """The engine's running and waiting requests (its own gauges; waiting counts those deferred for max_loras)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return metric(text, "vllm:num_requests_running"), metric(text, "vllm:num_requests_waiting")


def engine_state(url: str, log_path) -> str:
    """What to print when a request goes missing: the queue gauges, the adapters vLLM says run or wait, the log's
    tail."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    loras = [line for line in text.splitlines() if line.startswith("vllm:lora_requests_info")]
    tail = log_path.read_text(errors="replace").splitlines()[-15:] if log_path else []
    return "\n".join([f"running, waiting: {engine_queue(url)}", *loras, "engine log tail:", *tail])


COMPANION_FIRST_TOKEN_S, COMPANION_TRIES, PROBE_ROUNDS = 60, 3, 3


def start_companion(pool, url: str, model: str, prompt: str, stop: threading.Event, log_path):
    """A decoding companion stream of `model`, asked again (up to COMPANION_TRIES) if it gets no first token."""
    for _ in range(COMPANION_TRIES):
        decoding = threading.Event()
        stream = pool.submit(decode_stream, url, model, prompt, decoding, stop)
        if decoding.wait(COMPANION_FIRST_TOKEN_S) and not stream.done():
            return stream
        print(f"\na {model} companion got no token in {COMPANION_FIRST_TOKEN_S} s; asking again. "
              f"{engine_state(url, log_path)}")  # fmt: skip
    raise AssertionError(f"no {model} companion decoded in {COMPANION_TRIES} tries")


def probes_beside(url: str, base: str, prefixes: list[list[int]], companions: list[str], prompt: str, log_path=None):
    """Next-token log-probs of base requests (one per prefix) prefilled while one request per `companions` model
    is decoding, so that base and companion tokens share the engine's batches.

    With one companion per --max-loras slot, a single request of another adapter still running in the engine would
    keep the last companion waiting (vLLM schedules at most max_loras adapters at once), so it first waits for an
    idle engine; and whatever happens, the companions are stopped on the way out (they are long).

    Companions start one at a time, each once the one before decodes. CI has seen one companion of four started
    together get no token in minutes while the other three decoded, in no queue of the engine's (running 3, waiting
    0): that is vLLM's liveness, not the slot isolation this measures, so a companion that gets no first token is
    asked again (the lost request ends at its read timeout) and the engine's state is printed. The overlap is then
    checked, not assumed: the probes count only if every companion was decoding before they were sent and still is
    after they were answered. Else (on a slow machine the retries can use up an earlier companion's tokens) the
    companions that ended are started again and the probes asked again.
    """
    assert wait_for(lambda: engine_queue(url) == (0, 0), timeout=120), f"engine busy: {engine_queue(url)}"
    stop = threading.Event()
    streams: dict[int, Future] = {}  # companion index -> its decoding stream
    with ThreadPoolExecutor(len(companions) * COMPANION_TRIES * PROBE_ROUNDS + len(prefixes)) as pool:
        try:
            for _ in range(PROBE_ROUNDS):
                for i, model in enumerate(companions):
                    if i not in streams or streams[i].done():
                        streams[i] = start_companion(pool, url, model, prompt, stop, log_path)
                if any(f.done() for f in streams.values()):
                    continue  # one ended while a later one started
                got = list(pool.map(lambda ids: next_token_logprobs(url, base, ids), prefixes))
                if not any(f.done() for f in streams.values()):
                    return got  # Without overlap the probes ran alone and the comparison would prove nothing.
                print(f"\na companion ended before the probes were answered; again. {engine_state(url, log_path)}")
            raise AssertionError(f"no overlap of probes and companions in {PROBE_ROUNDS} rounds")
        finally:
            stop.set()


@pytest.mark.vllm
@cpu_engine
def test_engine_loads_the_plugin_and_is_compiled(vllm_engine):
    log = vllm_engine.log_path.read_text(errors="replace")
    assert "CPU LoRA ops from serve.engines.cpu_lora installed: lorafleet fused per-layer CPU LoRA, compiled" in log
    # vLLM's CPU platform would have set CompilationMode.NONE for a LoRA engine
    assert "'mode': <CompilationMode.DYNAMO_TRACE_ONCE" in log and "--enable-lora" in " ".join(
        vllm_engine.spec.command()
    )


def test_an_engine_configured_eager_tells_the_plugin(tmp_path):
    from serve.engines.engine import LORA_COMPILE_ENV, EngineSpec

    eager = EngineSpec(name="e", model=tmp_path, port=8001, compile_lora=False).env()
    assert eager[LORA_COMPILE_ENV] == "0"
    default = EngineSpec(name="e", model=tmp_path, port=8001).env()  # the plugin's default (compiled), or the env's
    assert default.get(LORA_COMPILE_ENV) == os.environ.get(LORA_COMPILE_ENV)


@pytest.mark.vllm
@pytest.mark.parametrize("layers", [None, list(range(15, 30))], ids=["every-layer", "top-15-layers"])
def test_served_lora_matches_peft_in_transformers(vllm_engine, smollm2_path, tmp_path, layers):
    """Prefill through vLLM with the adapter gives the log-probs PEFT computes in float32 (top_layers adapters too)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = f"fidelity-{len(layers or [])}"
    adapter = small_adapter(smollm2_path, tmp_path / name, seed=7, std=0.05, layers=layers)
    load_adapter(vllm_engine.spec.url, name, adapter)
    text = (
        "The shipment of 1,450 kg of coffee arrived in Rotterdam on 3 May; the seal was intact and the count matched."
    )
    ids = AutoTokenizer.from_pretrained(smollm2_path)(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    with torch.no_grad():
        base_lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
        peft = PeftModel.from_pretrained(model, adapter)
        lora_lp = torch.log_softmax(peft(torch.tensor([ids])).logits[0, :-1], -1)
    nxt = torch.tensor(ids[1:]).unsqueeze(1)
    want, base = lora_lp.gather(1, nxt).squeeze(1), base_lp.gather(1, nxt).squeeze(1)
    got = torch.tensor(prompt_logprobs(vllm_engine.spec.url, name, ids))
    err, effect = (got - want).abs().mean().item(), (want - base).abs().mean().item()
    assert effect > 0.5, f"the adapter barely changes the model ({effect:.3f}); the comparison would prove nothing"
    assert err < effect / 5, (
        f"vLLM LoRA log-probs differ from PEFT's by {err:.3f} on average (adapter effect {effect:.3f})"
    )


@pytest.mark.vllm
@cpu_engine
def test_base_requests_stay_base_when_every_slot_holds_an_adapter(vllm_engine, smollm2_path, tmp_path):
    """vLLM's own CPU ops gave base-model tokens the last slot's adapter once all --max-loras slots were used.

    vLLM CPU in bf16 is not batch-invariant (a base request's greedy text changes beside other base requests), so
    this compares base requests' next-token log-probs in two batches of the same shapes: beside one decoding request
    per adapter, and beside as many decoding base requests. (Prompt log-probs cannot be used: vLLM CPU's LoRA logits
    path crashes the engine on them in a batch that holds LoRA requests.) The two must agree far more closely than the smallest
    change any of the adapters makes. With LORAFLEET_CPU_LORA=0 (vLLM's ops) it fails.
    """
    from transformers import AutoTokenizer

    url, base, slots = vllm_engine.spec.url, "smollm2-135m-instruct", vllm_engine.spec.max_loras
    prompt = "List three ports in northern Europe:"
    text = "The cargo of 1,200 bags of green coffee was discharged in Hamburg; two bags were torn and resealed."
    ids = AutoTokenizer.from_pretrained(smollm2_path)(text)["input_ids"]
    prefixes = [ids[:n] for n in range(4, len(ids), 2)]
    names = [f"slot-{i}" for i in range(slots)]
    for i, name in enumerate(names):
        load_adapter(url, name, small_adapter(smollm2_path, tmp_path / name, seed=100 + i, std=0.05))
        next_token_logprobs(url, name, ids)  # takes a slot
    beside_adapters = probes_beside(url, base, prefixes, names, prompt, vllm_engine.log_path)
    beside_base = probes_beside(url, base, prefixes, [base] * slots, prompt, vllm_engine.log_path)
    effects = [distance([next_token_logprobs(url, n, p) for p in prefixes], beside_base) for n in names]
    drift = distance(beside_adapters, beside_base)
    print(f"\nbase drift beside adapters {drift:.4f} nats; adapter effects {[round(e, 3) for e in effects]}")
    assert min(effects) > 0.3, f"the adapters barely change the model ({min(effects):.3f}): proves nothing"
    assert drift < min(effects) / 10, (
        f"base requests batched beside adapters moved {drift:.3f} nats (reference: beside base requests of the "
        f"same shapes); the smallest adapter effect is {min(effects):.3f}: base tokens got an adapter's weights"
    )


def steps_over(url: str, tokens: int) -> float:
    """How many engine steps so far processed more than `tokens` tokens (vLLM's histogram of tokens per step;
    `tokens` must be one of its bucket bounds)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return metric(text, "vllm:iteration_tokens_total_count") - metric(
        text, "vllm:iteration_tokens_total_bucket", le=f"{float(tokens)}"
    )


def salted_logprobs(url: str, model: str, ids: list[int]) -> list[float]:
    """next_token_logprobs with a fresh cache salt: no prefix-cache hit, so the whole prompt is prefilled."""
    body = {"model": model, "prompt": ids, "max_tokens": 1, "logprobs": 20, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json={**body, "cache_salt": os.urandom(8).hex()}, timeout=300)
    assert r.status_code == 200, r.text
    return sorted(r.json()["choices"][0]["logprobs"]["top_logprobs"][0].values(), reverse=True)


HOLD_S = 5  # how long the paused engine holds requests: they reach its queue in milliseconds


def held_then_released(url: str, pool, calls: list):
    """Run `calls` with the engine's scheduler paused for HOLD_S, so that they queue in it together: the step after
    the resume schedules them together, whatever the machine's speed.

    vLLM's `/pause?mode=keep` (dev mode, which the test engine runs in) freezes every request, a decoding one too.
    A paused engine does not step, so nothing reports its queue: the hold is a fixed time, and whether the calls
    shared a step is for the caller to check. Sent without it, two prompts arrived a few ms apart, and a fresh clone
    saw vLLM put them in separate steps in 3 tries of 3."""
    r = httpx.post(f"{url}/pause", params={"mode": "keep"}, timeout=60)
    assert r.status_code == 200, f"the engine did not pause (VLLM_SERVER_DEV_MODE off?): {r.status_code} {r.text}"
    try:
        futures = [pool.submit(call) for call in calls]
        time.sleep(HOLD_S)
    finally:
        assert httpx.post(f"{url}/resume", timeout=60).status_code == 200
    return [f.result() for f in futures]


@pytest.mark.vllm
@cpu_engine
def test_prompts_of_two_adapters_prefilled_together_keep_their_own_adapters(vllm_engine, smollm2_path, tmp_path):
    """Two adapters' prompts of 200 tokens prefilled in one step, beside a third adapter's decode: each prompt is a
    run of one adapter's tokens, computed on its rows in place (cpu_lora's runs, RUN_MIN_TOKENS 128), the decode by
    segment. Each prompt's next-token log-probs must match the same prompt prefilled alone far more closely
    than the adapters change the model. The prompts are held in the paused engine and released together; that they
    shared a step is then read from vLLM's histogram of tokens per step (alone, a step holds at most 201 tokens;
    together over 256), not assumed."""
    from transformers import AutoTokenizer

    url, base = vllm_engine.spec.url, "smollm2-135m-instruct"
    names = ["run-a", "run-b", "run-c"]
    for i, name in enumerate(names):
        load_adapter(url, name, small_adapter(smollm2_path, tmp_path / name, seed=200 + i, std=0.05))
    words = "cargo seal bags coffee port tally draft hold crane berth pallet manifest".split()
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    ids = {n: tok(" ".join(words[(i * 7 + k) % len(words)] for i in range(400)))["input_ids"][:200] for k, n in
           enumerate(names[:2])}  # fmt: skip
    alone = {n: [salted_logprobs(url, n, ids[n])] for n in ids}
    effects = [distance(alone[n], [salted_logprobs(url, base, ids[n])]) for n in ids]
    assert min(effects) > 0.3, f"the adapters barely change the model ({min(effects):.3f}): proves nothing"
    stop, decoding = threading.Event(), threading.Event()
    with ThreadPoolExecutor(3) as pool:
        companion = pool.submit(decode_stream, url, names[2], "List three ports:", decoding, stop)
        try:
            assert decoding.wait(COMPANION_FIRST_TOKEN_S), "the decoding companion got no token"
            before = steps_over(url, 256)
            calls = [lambda n=n: [salted_logprobs(url, n, ids[n])] for n in ids]
            together = dict(zip(ids, held_then_released(url, pool, calls), strict=True))
            shared = steps_over(url, 256) - before
        finally:
            stop.set()
        assert not companion.exception()
    assert shared >= 1, f"the two prompts, held {HOLD_S} s and released together, went in separate steps"
    drift = max(distance(together[n], alone[n]) for n in ids)
    print(f"\nprompts prefilled together vs alone: drift {drift:.4f} nats; adapter effects {effects}")
    assert drift < min(effects) / 10, (
        f"a prompt prefilled beside another adapter's moved {drift:.3f} nats from itself prefilled alone; the "
        f"smallest adapter effect is {min(effects):.3f}: a run got another adapter's weights, or none"
    )


def test_path_names_the_engine_mode_its_flags_force_over_the_environment(monkeypatch):
    monkeypatch.delenv(cpu_lora.ENV, raising=False)
    monkeypatch.setenv(cpu_lora.COMPILE_ENV, "1")
    assert "compiled engine" in cpu_lora.path()
    assert "eager engine" in cpu_lora.path(compiled=False)  # lora_cost --eager: -O0 beats the compiled default
    monkeypatch.setenv(cpu_lora.COMPILE_ENV, "0")
    assert "eager engine" in cpu_lora.path() and "compiled engine" in cpu_lora.path(compiled=True)
