"""Held-out accuracy of a base model or base + adapter on a task, and the learning curve over data sizes.

Generation is plain transformers greedy decoding, batched with left padding, on the task's eval split (entities
never seen in training). Chat models get the chat template; base models without one get the task's plain-text
few-shot prompt and their answer is cut out with `task.extract_answer`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Literal

from lorafleet.core.diagnose import diagnose
from lorafleet.core.paths import runs_dir
from train.auto import run as run_training
from train.config import CONFIGS_DIR, load_config
from train.data import split_prompt
from train.export import recorded_base
from train.lora import use_bf16
from train.models import model_path as resolve
from train.tasks import get_task
from train.validate import generate

Mode = Literal["zero_shot", "few_shot"]


def load_for_eval(model_path: str | Path | None, adapter_dir: str | Path | None, dtype: str = "auto"):
    """(model, tokenizer, base folder): the adapter merged in fp32, then cast to `dtype` (auto: bf16 if the CPU is
    fast at it, as vLLM would serve it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_path is None and adapter_dir is None:
        raise ValueError("give a base model, an adapter, or both")
    base = resolve(str(model_path)) if model_path is not None else recorded_base(adapter_dir)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    if dtype == "bfloat16" or (dtype == "auto" and use_bf16("auto")):
        model = model.to(torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side = "left"  # generation appends on the right, so prompts must end at the same column
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok, base


def build_prompt(task, tok, user_content: str, mode: Mode, k: int, seed: int) -> str:
    if tok.chat_template is None:
        return task.few_shot_prompt(user_content, k if mode == "few_shot" else 0, seed)
    messages = task.few_shot_chat(user_content, k, seed) if mode == "few_shot" else task.chat(user_content)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def evaluate_offline(
    model_path: str | Path | None,
    adapter_dir: str | Path | None,
    task: str,
    n: int = 100,
    mode: Mode = "zero_shot",
    k: int = 3,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    seed: int = 0,
    dtype: str = "auto",
) -> dict[str, Any]:
    """Accuracy (exact, per `task.correct`) and mean partial score on `n` eval-split examples.

    Args:
        model_path: base model id or folder; None = the base recorded in the adapter.
        adapter_dir: a PEFT LoRA adapter folder, or None for the base model alone.
        task: a built-in task name or a task file (train.tasks.get_task).
        mode: zero_shot (system prompt + input) or few_shot (k solved train-split examples first).
        dtype: auto | bfloat16 | float32 for the model during generation.
    """

    t = get_task(task)
    model, tok, base = load_for_eval(model_path, adapter_dir, dtype)
    rows = [split_prompt(ex["messages"]) for ex in t.generate(n, "eval", seed)]
    users = [msgs[-1]["content"] for msgs, _ in rows]
    prompts = [build_prompt(t, tok, u, mode, k, seed) for u in users]
    t0 = time.perf_counter()
    raw = generate(model, tok, prompts, max_new_tokens, batch_size)
    seconds = time.perf_counter() - t0
    examples = []
    for user, (_, ref), text in zip(users, rows, raw, strict=True):
        pred = t.extract_answer(text) if tok.chat_template is None else text.strip()
        examples.append(
            {
                "input": user,
                "reference": ref,
                "prediction": pred,
                "raw": text,
                "correct": bool(t.correct(pred, ref)),
                "score": float(t.score(pred, ref)),
            }
        )
    preds, refs = [e["prediction"] for e in examples], [e["reference"] for e in examples]
    return {
        "task": t.name,
        "model": str(base),
        "adapter": str(adapter_dir) if adapter_dir else None,
        "mode": mode,
        "k": k if mode == "few_shot" else 0,
        "n": len(examples),
        "accuracy": sum(e["correct"] for e in examples) / len(examples),
        "mean_score": sum(e["score"] for e in examples) / len(examples),
        "seconds": round(seconds, 1),
        "diagnosis": diagnose(preds, refs).to_dict(),
        "examples": examples,
    }


# ---------------------------------------------------------------- learning curve


def recipe_path(task: str) -> Path:
    """A built-in task's own config, else the default recipe every tenant task starts from."""
    path = CONFIGS_DIR / f"{task}.yaml"
    return path if path.is_file() else CONFIGS_DIR / "recipe.yaml"


def curve_config(task: str, size: int, out: Path, overrides: dict[str, Any], min_steps: int):
    """The task's recipe trained on `size` examples; small sizes still get `min_steps` steps."""

    name = get_task(task).name
    values = {"task": task, "n": size, "name": f"{name}-n{size}", "output_dir": str(out / f"n{size}"), **overrides}
    cfg = load_config(recipe_path(task), values)
    if not cfg.max_steps:
        cfg.max_steps = max(min_steps, math.ceil(cfg.epochs * size / (cfg.batch_size * cfg.grad_accum)))
    return cfg


def learning_curve(
    task: str,
    sizes: list[int],
    overrides: dict[str, Any] | None = None,
    eval_n: int = 100,
    min_steps: int = 20,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Train one adapter per training-set size and score each (and the base, size 0) on the same eval split.
    Writes curve.json and curve.png under runs/curve-<task>-<timestamp>/ (or `out_dir`)."""

    out = out_dir or runs_dir() / f"curve-{get_task(task).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    base_cfg = curve_config(task, max(sizes), out, overrides or {}, min_steps)
    points = [_point(0, None, evaluate_offline(base_cfg.base_model, None, task, n=eval_n))]
    for size in sizes:
        cfg = curve_config(task, size, out, overrides or {}, min_steps)
        adapter = run_training(cfg)
        report = json.loads((adapter / "lorafleet_train.json").read_text())
        points.append(_point(size, report, evaluate_offline(cfg.base_model, adapter, task, n=eval_n)))
    result = {"task": get_task(task).name, "base_model": base_cfg.base_model, "eval_n": eval_n, "points": points}
    (out / "curve.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_curve(result, out / "curve.png")
    result["dir"] = str(out)
    return result


def _point(size: int, report: dict | None, ev: dict) -> dict[str, Any]:
    metrics = (report or {}).get("metrics", {})
    return {
        "train_examples": size,
        "accuracy": ev["accuracy"],
        "mean_score": ev["mean_score"],
        "steps": metrics.get("steps", 0),
        "train_seconds": metrics.get("train_seconds", 0.0),
        "final_eval_loss": metrics.get("final_eval_loss"),
    }


def plot_curve(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    pts = result["points"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["train_examples"] for p in pts], [p["accuracy"] for p in pts], marker="o", label="accuracy")
    ax.plot([p["train_examples"] for p in pts], [p["mean_score"] for p in pts], marker="s", label="mean score")
    ax.set_xlabel("training examples (0 = base, zero-shot)")
    ax.set_ylabel(f"held-out score (n={result['eval_n']})")
    ax.set_ylim(0, 1)
    ax.set_title(f"{result['task']}: LoRA on {result['base_model']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_curve(result: dict[str, Any]) -> str:
    lines = [f"{'examples':>9} {'accuracy':>9} {'score':>7} {'steps':>6} {'train s':>8} {'eval loss':>10}"]
    for p in result["points"]:
        loss = f"{p['final_eval_loss']:.4f}" if p["final_eval_loss"] is not None else "-"
        lines.append(
            f"{p['train_examples']:>9} {p['accuracy']:>9.2%} {p['mean_score']:>7.3f} {p['steps']:>6} "
            f"{p['train_seconds']:>8.0f} {loss:>10}"
        )
    return "\n".join(lines)
