"""Offline evaluation (prompts, batched greedy generation, scoring) and the learning curve's bookkeeping."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT
from train import evaluate
from train.evaluate import build_prompt, evaluate_offline, format_curve, generate, learning_curve, load_for_eval
from train.tasks import get_task


@pytest.fixture(autouse=True)
def _home(monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(ROOT))


@pytest.fixture(scope="module")
def tiny():
    return load_for_eval("tiny-random-llama", None, dtype="float32")


def test_chat_prompts_use_the_template_and_few_shot_adds_solved_examples(tiny):
    _, tok, _ = tiny
    task = get_task("contract")
    user = task.generate(1, "eval", 0)[0]["messages"][1]["content"]
    zero = build_prompt(task, tok, user, "zero_shot", k=3, seed=0)
    few = build_prompt(task, tok, user, "few_shot", k=3, seed=0)
    assert zero.startswith("<|im_start|>system\n" + task.system_prompt) and zero.endswith("<|im_start|>assistant\n")
    assert zero.count("<|im_start|>assistant") == 1 and few.count("<|im_start|>assistant") == 4
    assert user in zero and few.rstrip().endswith("<|im_start|>assistant")


def test_models_without_chat_template_get_the_plain_few_shot_prompt():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "models" / "gemma-3-270m")
    task = get_task("contract")
    prompt = build_prompt(task, tok, "THE CLAUSE", "few_shot", k=2, seed=0)
    assert prompt == task.few_shot_prompt("THE CLAUSE", 2, 0)
    assert prompt.endswith("Input: THE CLAUSE\nOutput:") and prompt.count("Input:") == 3


def test_batched_left_padded_generation_equals_one_by_one(tiny):
    model, tok, _ = tiny
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
        for c in ["hi", "a much longer question about shipping manifests and seals", "ok?"]
    ]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert tok.padding_side == "left"


@pytest.mark.parametrize("answers,accuracy", [("reference", 1.0), ("garbage", 0.0)])
def test_scores_come_from_the_task(monkeypatch, answers, accuracy):
    def fake_generate(model, tok, prompts, max_new_tokens, batch_size):
        refs = [ex["messages"][-1]["content"] for ex in get_task("contract").generate(len(prompts), "eval", 0)]
        return [f" {r}\n" if answers == "reference" else "no idea" for r in refs]

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    res = evaluate_offline("tiny-random-llama", None, "contract", n=5, dtype="float32")
    assert res["n"] == 5 and res["accuracy"] == accuracy and res["mean_score"] == accuracy
    assert all(e["correct"] == (accuracy == 1.0) for e in res["examples"])
    assert res["examples"][0]["prediction"] == res["examples"][0]["raw"].strip()


def test_evaluate_offline_runs_end_to_end_on_the_tiny_model():
    res = evaluate_offline("tiny-random-llama", None, "contract", n=3, max_new_tokens=4, batch_size=2, dtype="float32")
    assert res["n"] == 3 and 0.0 <= res["accuracy"] <= 1.0
    assert {"input", "reference", "prediction", "correct", "score"} <= set(res["examples"][0])
    assert res["adapter"] is None and res["model"].endswith("tiny-random-llama")


def test_curve_config_gives_small_sizes_a_minimum_of_steps(tmp_path):
    small = evaluate.curve_config("contract", 16, tmp_path, {"batch_size": 8}, min_steps=20)
    big = evaluate.curve_config("contract", 800, tmp_path, {"batch_size": 8, "epochs": 1}, min_steps=20)
    assert (small.n, small.max_steps) == (16, 20)
    assert (big.n, big.max_steps) == (800, 100)
    assert small.output_dir.endswith("n16") and small.task == "contract"


def test_learning_curve_trains_each_size_and_writes_json_and_png(tmp_path, monkeypatch):
    trained = []

    def fake_train(cfg, log=print):
        trained.append(cfg.n)
        out = tmp_path / f"a{cfg.n}"
        out.mkdir()
        metrics = {"steps": cfg.max_steps, "train_seconds": 1.0, "final_eval_loss": 1.0 / cfg.n}
        (out / "lorafleet_train.json").write_text(json.dumps({"metrics": metrics}))
        return out

    def fake_eval(base, adapter, task, n):
        size = 0 if adapter is None else int(adapter.name[1:])
        return {"accuracy": size / 100, "mean_score": size / 80}

    monkeypatch.setattr(evaluate, "run_training", fake_train)
    monkeypatch.setattr(evaluate, "evaluate_offline", fake_eval)
    res = learning_curve("contract", [10, 40], eval_n=7, out_dir=tmp_path / "curve")
    assert trained == [10, 40]
    assert [(p["train_examples"], p["accuracy"]) for p in res["points"]] == [(0, 0.0), (10, 0.1), (40, 0.4)]
    saved = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert saved["points"] == res["points"] and saved["eval_n"] == 7
    assert (tmp_path / "curve" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "40.00%" in format_curve(res)


def test_adapter_is_merged_for_eval(tmp_path):
    """An adapter with a non-zero update must change what the evaluated model computes."""
    from safetensors.torch import load_file, save_file

    from train.config import load_config
    from train.trainer import train

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "completion": "hello"}) + "\n")
    cfg = load_config(
        None,
        {
            "base_model": "tiny-random-llama",
            "data": str(data),
            "eval_fraction": 0.0,
            "max_steps": 1,
            "output_dir": str(tmp_path / "ad"),
            "progress": False,
        },
    )
    adapter = train(cfg, log=lambda _: None)
    weights = {
        k: (torch.ones_like(v) if "lora_B" in k else v)
        for k, v in load_file(adapter / "adapter_model.safetensors").items()
    }
    save_file(weights, adapter / "adapter_model.safetensors")
    ids = torch.tensor([[1, 2, 3, 4]])
    base, _, _ = load_for_eval("tiny-random-llama", None, dtype="float32")
    tuned, _, recorded = load_for_eval(None, adapter, dtype="float32")
    assert recorded == ROOT / "models" / "tiny-random-llama"
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, tuned(ids).logits)
