"""Training throughput: our trainer against a plain `transformers.Trainer` + PEFT baseline, same data, same run.

    python -m train.bench                     # SmolLM2, contract task, 10 steps of 8 examples, 3 rounds
    lorafleet train bench --task manifest --steps 6 --variants baseline,ours

Variants (each in its own process, so peak RSS is its own):
  baseline          transformers.Trainer + PEFT LoRA, fp32, DataCollatorForSeq2Seq padding to the longest
                    in a random batch, full logits at every position
  ours              train.trainer: bf16 base + autocast, length-grouped batches, LM head only at label positions,
                    the prefix every row shares (the system prompt) run once per batch
  ours-no-prefix-sharing  ours running every row's copy of the shared prefix (shows what sharing is worth)
  ours-full-logits  ours with the LM head at every position (shows what the sparse LM head is worth)
  ours-fp32         ours without bf16 (shows what bf16 is worth)
  ours-top-half     ours with r=16 on the top half of the layers (the built-in configs' shape): the same
                    trainable-parameter count as r=8 everywhere, but the backward pass stops half way
Throughput counts real (non-pad) tokens only, per wall second and per CPU-second (all threads; steadier when
other processes share the machine). Rounds alternate the variants and the best round of each is reported.
"""

# torch, transformers and the trainer are imported inside the variants: each runs in its own process, and
# `lorafleet train`'s parser reads this module's arguments without paying for them.

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lorafleet.core.paths import runs_dir
from train.config import load_config
from train.models import ensure

VARIANTS = ("baseline", "ours", "ours-no-prefix-sharing", "ours-full-logits", "ours-fp32", "ours-top-half")
DEFAULT_VARIANTS = ("baseline", "ours", "ours-no-prefix-sharing")
RESULT_TAG = "BENCH_RESULT "


def _config(spec: dict[str, Any], out: str, **extra: Any):

    return load_config(
        None,
        {
            "base_model": spec["model"],
            "task": spec["task"],
            "n": spec["n"],
            "eval_n": 1,
            "seed": spec["seed"],
            "max_steps": spec["steps"],
            "batch_size": spec["batch_size"],
            "lr": 2e-4,
            "r": 8,
            "alpha": 16,
            "output_dir": out,
            "progress": False,
            "max_len": spec["max_len"],
            **extra,
        },
    )


def _depth(model: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(ensure(model)).num_hidden_layers


def run_ours(spec: dict[str, Any], variant: str) -> dict[str, Any]:
    from train.trainer import REPORT_FILE, train

    extra = {
        "logits_at_labels": variant != "ours-full-logits",
        "share_prefix": variant != "ours-no-prefix-sharing",
        "bf16": "false" if variant == "ours-fp32" else "auto",
    }
    if variant == "ours-top-half":
        extra |= {"r": 16, "alpha": 32, "top_layers": _depth(spec["model"]) // 2}
    with tempfile.TemporaryDirectory() as tmp:
        out = train(_config(spec, tmp, **extra), log=lambda _: None)
        m = json.loads((out / REPORT_FILE).read_text())["metrics"]
    return {
        "tokens": m["tokens"],
        "seconds": m["train_seconds"],
        "cpu_seconds": m["train_cpu_seconds"],
        "final_loss": m["final_train_loss"],
    }


def run_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """What most people would write first: Trainer + PEFT, fp32, default collator, nothing clever."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from train.dataset import build_dataset
    from train.lora import linear_module_names
    from train.trainer import resolve_base

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(spec, tmp)
        base_path, _ = resolve_base(cfg)
        tok = AutoTokenizer.from_pretrained(base_path)
        rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in build_dataset(tok, cfg, lambda _: None).train]
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        torch.manual_seed(cfg.seed)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=linear_module_names(model), task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        counter = _CountingCollator(DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100))
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=cfg.batch_size,
            max_steps=cfg.max_steps,
            learning_rate=2e-4,
            lr_scheduler_type="cosine",
            warmup_steps=1,
            logging_steps=cfg.max_steps,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=cfg.seed,
            disable_tqdm=True,
            remove_unused_columns=False,
        )
        timer = _step_timer()
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=counter, callbacks=[timer])
        result = trainer.train()
    return {
        "tokens": counter.tokens,
        "seconds": round(timer.seconds, 2),
        "cpu_seconds": round(timer.cpu_seconds, 2),
        "final_loss": result.training_loss,
    }


class _CountingCollator:
    def __init__(self, inner):
        self.inner, self.tokens = inner, 0

    def __call__(self, features):
        batch = self.inner(features)
        self.tokens += int(batch["attention_mask"].sum())
        return batch


def _step_timer():
    """Time inside optimizer steps only, as our trainer reports it (no model load, no setup)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        seconds, cpu_seconds, t0, c0 = 0.0, 0.0, 0.0, 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.seconds += time.perf_counter() - self.t0
            self.cpu_seconds += time.process_time() - self.c0

    return StepTimer()


def worker(variant: str, spec: dict[str, Any]) -> dict[str, Any]:
    from train.trainer import peak_rss_mb

    res = run_baseline(spec) if variant == "baseline" else run_ours(spec, variant)
    res["tokens_per_s"] = round(res["tokens"] / res["seconds"], 1)
    res["tokens_per_cpu_s"] = round(res["tokens"] / res["cpu_seconds"], 1)
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    res["variant"] = variant
    return res


def run_variant(variant: str, spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "train.bench", "--worker", variant, "--spec", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(f"bench variant {variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def bench(spec: dict[str, Any], variants: list[str], rounds: int = 1, log=print) -> dict[str, Any]:
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants:
            res = run_variant(v, spec)
            log(
                f"round {r + 1}/{rounds} {v:17} {res['tokens_per_s']:7.1f} tok/s {res['tokens_per_cpu_s']:7.1f} "
                f"tok/cpu-s {res['peak_rss_mb']:6.0f} MB {res['seconds']:6.1f} s  loss {res['final_loss']:.4f}"
            )
            runs[v].append(res)
    summary = {v: _summarise(rs) for v, rs in runs.items()}
    if "baseline" in summary:
        base = summary["baseline"]
        for s in summary.values():
            s["ratio_vs_baseline"] = round(s["tokens_per_s"] / base["tokens_per_s"], 2)
            s["cpu_ratio_vs_baseline"] = round(s["tokens_per_cpu_s"] / base["tokens_per_cpu_s"], 2)
    return {"spec": spec, "rounds": rounds, "summary": summary, "runs": runs}


def _summarise(rs: list[dict]) -> dict[str, Any]:
    # Best of the rounds, as timeit does: other processes on a shared machine only ever slow a run down.
    # Tokens per CPU-second (all threads) is the steadier figure when the machine is shared.
    return {
        "tokens_per_s": max(r["tokens_per_s"] for r in rs),
        "tokens_per_cpu_s": max(r["tokens_per_cpu_s"] for r in rs),
        "all_tokens_per_s": [r["tokens_per_s"] for r in rs],
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs), 1),
    }


def format_summary(result: dict[str, Any]) -> str:
    head = f"{'variant':18} {'tok/s':>7} {'x base':>7} {'tok/cpu-s':>10} {'x base':>7} {'peak RSS MB':>12}  tok/s by round"
    lines = [head]
    for v, s in result["summary"].items():
        ratio = f"{s['ratio_vs_baseline']:.2f}" if "ratio_vs_baseline" in s else "-"
        cpu_ratio = f"{s['cpu_ratio_vs_baseline']:.2f}" if "cpu_ratio_vs_baseline" in s else "-"
        rounds = ", ".join(f"{t:.0f}" for t in s["all_tokens_per_s"])
        lines.append(
            f"{v:18} {s['tokens_per_s']:>7.1f} {ratio:>7} {s['tokens_per_cpu_s']:>10.1f} {cpu_ratio:>7} "
            f"{s['peak_rss_mb']:>12.0f}  {rounds}"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model id or folder")
    p.add_argument("--task", default="contract", help="built-in task whose train split is the data")
    p.add_argument("--n", type=int, default=96, help="training examples")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per variant")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rounds", type=int, default=3, help="repeat all variants, alternating; the best round is reported"
    )
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--out", default=None, help="JSON result file (default runs/bench-train-<time>.json)")


def main_args(args: argparse.Namespace) -> int:

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    spec = {
        "model": args.model,
        "task": args.task,
        "n": args.n,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_len": args.max_len,
        "seed": args.seed,
    }
    result = bench(spec, variants, args.rounds)
    print(format_summary(result))
    out = Path(args.out) if args.out else runs_dir() / f"bench-train-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(args.worker, json.loads(args.spec))), flush=True)
        return 0
    return main_args(args)


if __name__ == "__main__":
    sys.exit(main())
