"""`lorafleet train run|validate|merge|eval|curve|bench`: fine-tune, check, fold and score LoRA adapters.

Only argparse and the torch-free modules at the top: the commands that train or score import train.trainer,
train.evaluate and train.bench (torch) when they run, so `lorafleet train data` and `validate` stay fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorafleet.core.config import parse_overrides
from lorafleet.core.errors import UserError
from train.config import describe, load_config
from train.export import merge_adapter, validate_adapter
from train.models import ModelError


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    _add_run(sub)
    _add_validate(sub)
    _add_merge(sub)
    _add_eval(sub)
    _add_curve(sub)
    _add_bench(sub)


# --- run ------------------------------------------------------------------------------------------------------


def _add_run(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser(
        "run",
        help="fine-tune a LoRA adapter from a YAML config plus key=value overrides",
        description="Config keys (key=default: help):\n" + describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML file, or a built-in config name (tiny, manifest, contract, drugs)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override fields, e.g. max_steps=3 lr=2e-3")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from train.auto import format_table, run
    from train.trainer import REPORT_FILE

    out = run(load_config(args.config, args.overrides))
    report = json.loads((out / REPORT_FILE).read_text())
    m = report["metrics"]
    if "auto" in report:
        print(format_table(report["auto"]))
    if "score" in report:
        sc = report["score"]
        print(f"held-out score (n={sc['n']}): exact {sc['best_exact']:.1%} at step {sc['best_step']} (kept)")
    print(
        f"adapter: {out}  (train loss {m['final_train_loss']}, eval loss {m['final_eval_loss']}, "
        f"{m['tokens_per_s']} tok/s, {m['train_seconds']:.0f} s, peak RSS {m['peak_rss_mb']:.0f} MB)"
    )
    return 0


# --- validate / merge -------------------------------------------------------------------------------------------


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check that vLLM would accept an adapter folder")
    p.add_argument("adapter", type=Path, metavar="DIR")
    p.add_argument("--base", default=None, help="base model it will be served on (default: the recorded one)")
    p.add_argument("--max-rank", type=int, default=16, help="the server's --max-lora-rank (default 16)")
    p.set_defaults(func=_validate)


def _validate(args: argparse.Namespace) -> int:

    problems = validate_adapter(args.adapter, base_model=args.base, max_rank=args.max_rank)
    if not problems:
        print(f"OK: {args.adapter}")
        return 0
    for problem in problems:
        print(f"problem: {problem}")
    return 1


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="fold an adapter into its base: a standalone HF model folder")
    p.add_argument("--adapter", type=Path, required=True, metavar="DIR")
    p.add_argument("--out", type=Path, required=True, metavar="OUT")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.set_defaults(func=_merge)


def _merge(args: argparse.Namespace) -> int:
    out = merge_adapter(args.adapter, args.out, dtype=args.dtype)
    print(f"merged model: {out}")
    return 0


# --- eval / curve -----------------------------------------------------------------------------------------------


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="held-out accuracy of a base model or an adapter on a task")
    p.add_argument("--adapter", type=Path, default=None, metavar="DIR", help="adapter folder (omit: base alone)")
    p.add_argument("--task", required=True, help="built-in task name, or a task file (task.yaml or its folder)")
    p.add_argument("--base", default=None, help="base model (default: the adapter's recorded base)")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--mode", default="zero_shot", choices=["zero_shot", "few_shot"])
    p.add_argument("--k", type=int, default=3, help="solved examples in a few-shot prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--out", type=Path, default=None, help="write the full result (with examples) as JSON")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from train.evaluate import evaluate_offline

    if args.adapter is None and args.base is None:
        raise UserError("give --adapter DIR, --base MODEL, or both")
    try:
        res = evaluate_offline(
            args.base, args.adapter, args.task, n=args.n, mode=args.mode, k=args.k, max_new_tokens=args.max_new_tokens
        )
    except (ModelError, ValueError) as e:
        raise UserError(str(e)) from e
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(
        f"{res['task']} {res['mode']}: accuracy {res['accuracy']:.2%}, mean score {res['mean_score']:.3f} "
        f"(n={res['n']}, {res['seconds']} s) model={res['model']} adapter={res['adapter']}"
    )
    for warning in res["diagnosis"]["warnings"]:
        print(f"WARNING: {warning}")
    return 0


def _add_curve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curve", help="train on growing data sizes and plot held-out accuracy")
    p.add_argument("--task", required=True, help="built-in task name, or a task file (task.yaml or its folder)")
    p.add_argument("--sizes", default="50,100,250,500,1000", help="comma list of training-set sizes")
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--min-steps", type=int, default=20, help="small sizes still train at least this many steps")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    p.set_defaults(func=_curve)


def _curve(args: argparse.Namespace) -> int:
    from train.evaluate import format_curve, learning_curve

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError as e:
        raise UserError(f"--sizes must be a comma list of integers, got {args.sizes!r}") from e
    if not sizes or min(sizes) < 1:
        raise UserError("--sizes needs at least one size >= 1")
    res = learning_curve(args.task, sizes, parse_overrides(args.overrides), args.eval_n, args.min_steps)
    print(format_curve(res))
    print(f"wrote {res['dir']}/curve.json and curve.png")
    return 0


# --- bench ------------------------------------------------------------------------------------------------------


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from train import bench

    p = sub.add_parser(
        "bench",
        help="training tokens/s: ours vs transformers.Trainer + PEFT",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(p)
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from train import bench

    try:
        return bench.main_args(args)
    except (ValueError, RuntimeError) as e:
        raise UserError(str(e)) from e
