"""Adapter validation against what vLLM accepts, and merging an adapter into its base."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafleet.core.vllm import LLAMA_STYLE
from tests.conftest import ROOT
from train.config import load_config
from train.export import AdapterError, check_adapter, merge_adapter, validate_adapter
from train.trainer import train


@pytest.fixture(autouse=True)
def _home(monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(ROOT))


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory) -> Path:
    """A real adapter from 2 steps on the tiny model, with random (non-zero) LoRA B so a merge changes the model."""
    tmp = tmp_path_factory.mktemp("adapter")
    data = tmp / "d.jsonl"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text((json.dumps(row) + "\n") * 4)
    cfg = load_config(
        None,
        {
            "base_model": "tiny-random-llama",
            "data": str(data),
            "eval_fraction": 0.0,
            "max_steps": 2,
            "batch_size": 2,
            "output_dir": str(tmp / "good"),
            "progress": False,
        },
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAFLEET_HOME", str(ROOT))
        out = train(cfg, log=lambda _: None)
    weights = load_file(out / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for k, v in weights.items():
        if "lora_B" in k:
            weights[k] = torch.randn(v.shape, generator=gen) * 0.5
    save_file(weights, out / "adapter_model.safetensors")
    return out


def copy(adapter: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "adapter"
    shutil.copytree(adapter, dst)
    return dst


def edit_config(**changes):
    def apply(d: Path) -> None:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(changes)
        (d / "adapter_config.json").write_text(json.dumps(cfg))

    return apply


def add_tensors(**tensors):
    def apply(d: Path) -> None:
        weights = load_file(d / "adapter_model.safetensors")
        weights.update({k.replace("__", "."): v for k, v in tensors.items()})
        save_file(weights, d / "adapter_model.safetensors")

    return apply


def remove(name: str):
    return lambda d: (d / name).unlink()


def write(name: str, text: str):
    return lambda d: (d / name).write_text(text)


BAD = [
    # (case, how to break the good adapter, extra validate kwargs, message pattern)
    ("modules_to_save", edit_config(modules_to_save=["lm_head"]), {}, "modules_to_save being None"),
    ("DoRA", edit_config(use_dora=True), {}, "does not support DoRA"),
    ("rank 12", edit_config(r=12), {}, "r=12 is not one vLLM serves"),
    ("rank 32 > max 16", edit_config(r=32), {}, "r=32 is greater than the server's max LoRA rank 16"),
    ("rank > given max", lambda d: None, {"max_rank": 1}, "r=8 is greater than the server's max LoRA rank 1"),
    ("bias", edit_config(bias="all"), {}, "bias='all'"),
    ("not LoRA", edit_config(peft_type="IA3"), {}, "peft_type is 'IA3'"),
    ("base-changing init", edit_config(init_lora_weights="pissa"), {}, "changes the base weights"),
    (
        "lm_head target",
        add_tensors(
            base_model__model__lm_head__lora_A__weight=torch.zeros(8, 64),
            base_model__model__lm_head__lora_B__weight=torch.zeros(49152, 8),
        ),
        {},
        r"target modules \['lm_head'\] are not supported by vLLM",
    ),
    (
        "embed_tokens target",
        add_tensors(
            base_model__model__model__embed_tokens__lora_A__weight=torch.zeros(8, 64),
            base_model__model__model__embed_tokens__lora_B__weight=torch.zeros(64, 8),
        ),
        {},
        r"target modules \['embed_tokens'\] are not supported",
    ),
    (
        "non-LoRA tensor",
        add_tensors(base_model__model__model__norm__weight=torch.ones(64)),
        {},
        "'base_model.model.model.norm.weight' is not a LoRA A/B weight",
    ),
    (
        "shape mismatch",
        add_tensors(base_model__model__model__layers__0__self_attn__q_proj__lora_A__weight=torch.zeros(8, 32)),
        {},
        r"q_proj: adapter maps 32 -> 64 but the base layer is 64 -> 64",
    ),
    ("missing safetensors", remove("adapter_model.safetensors"), {}, "adapter_model.safetensors is missing"),
    ("missing config", remove("adapter_config.json"), {}, "adapter_config.json is missing"),
    ("config not JSON", write("adapter_config.json", "{r: 8"), {}, "not valid JSON"),
    (
        "base mismatch",
        lambda d: None,
        {"base_model": "smollm2-135m-instruct"},
        "trained on 'tiny-random-llama', not on the given base 'smollm2-135m-instruct'",
    ),
    ("base not recorded", edit_config(base_model_name_or_path=None), {}, "base_model_name_or_path is not recorded"),
]


@pytest.mark.parametrize("case,breaker,kwargs,pattern", BAD, ids=[b[0] for b in BAD])
def test_validator_rejects_each_bad_adapter_kind(good_adapter, tmp_path, case, breaker, kwargs, pattern):
    d = copy(good_adapter, tmp_path)
    breaker(d)
    problems = validate_adapter(d, **kwargs)
    assert any(re.search(pattern, p) for p in problems), problems
    with pytest.raises(AdapterError, match=pattern):
        check_adapter(d, **kwargs)


def test_validator_accepts_a_good_adapter(good_adapter):
    assert validate_adapter(good_adapter) == []
    assert validate_adapter(good_adapter, base_model="tiny-random-llama", max_rank=16) == []
    assert validate_adapter(good_adapter, base_model=str(ROOT / "models" / "tiny-random-llama")) == []


def test_check_adapter_lists_every_problem_at_once(good_adapter, tmp_path):
    d = copy(good_adapter, tmp_path)
    edit_config(use_dora=True, modules_to_save=["lm_head"], bias="all")(d)
    with pytest.raises(AdapterError) as err:
        check_adapter(d)
    assert all(s in str(err.value) for s in ("DoRA", "modules_to_save", "bias='all'"))


@pytest.mark.parametrize("model_file", ["llama.py", "gemma3.py"])
def test_supported_modules_match_vllms_packed_mapping(model_file):
    # Read vLLM's source instead of importing it (importing vLLM takes many seconds on 2 cores).
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None:
        pytest.skip("vLLM is not installed")
    src = (Path(spec.origin).parent / "model_executor" / "models" / model_file).read_text()
    block = src[src.index("packed_modules_mapping = {") :].split("}", 1)[0]
    packed = set(re.findall(r'"(\w+_proj)"', block.split("{", 1)[1]))
    children = packed - {"qkv_proj", "gate_up_proj"}
    assert children == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    assert children | {"o_proj", "down_proj"} == LLAMA_STYLE


def test_cli_validate_prints_ok_or_each_problem(good_adapter, tmp_path, capsys):
    from lorafleet.cli import main

    assert main(["train", "validate", str(good_adapter)]) == 0
    assert "OK" in capsys.readouterr().out
    d = copy(good_adapter, tmp_path)
    edit_config(r=12, use_dora=True)(d)
    assert main(["train", "validate", str(d), "--max-rank", "16"]) == 1
    out = capsys.readouterr().out
    assert "r=12" in out and "DoRA" in out


# ---------------------------------------------------------------- merge


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-4), ("bfloat16", 0.05)])
def test_merged_model_gives_peft_models_logits(good_adapter, tmp_path, dtype, atol):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge_adapter(good_adapter, tmp_path / "merged", dtype=dtype)
    base_dir = ROOT / "models" / "tiny-random-llama"
    ids = torch.tensor([[1, 520, 3012, 87, 2048, 33, 9, 401]])
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base_logits = _logits(base, ids)
    peft_logits = _logits(PeftModel.from_pretrained(base, str(good_adapter)), ids)
    merged = AutoModelForCausalLM.from_pretrained(out)
    merged_logits = _logits(merged, ids)
    assert merged.dtype == getattr(torch, dtype)
    assert (peft_logits - base_logits).abs().max() > 10 * atol  # the adapter really changes the model
    assert torch.allclose(merged_logits, peft_logits, atol=atol)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.chat_template == AutoTokenizer.from_pretrained(base_dir).chat_template
    assert not list(out.glob("adapter_*"))  # a standalone model, not an adapter


def test_merge_refuses_an_invalid_adapter(good_adapter, tmp_path):
    d = copy(good_adapter, tmp_path)
    edit_config(use_dora=True)(d)
    with pytest.raises(AdapterError, match="DoRA"):
        merge_adapter(d, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
