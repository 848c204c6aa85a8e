"""`lorafleet train <subcommand>`: one `_add_<name>` (arguments) and one `_<name>` (action) per subcommand."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorafleet.cli.train_run import add_subcommands as add_run_subcommands
from lorafleet.core.errors import UserError
from train.data import write_json, write_jsonl
from train.tasks import TASKS, get_task


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="train_cmd", required=True, metavar="SUBCOMMAND")
    _add_data(sub)
    add_run_subcommands(sub)  # run, validate, merge, eval, curve, bench (lorafleet/cli/train_run.py)
    # Other subcommands (run, validate, eval, curve, merge) register here: `_add_<name>(sub)`, defined below.


# --- data ---------------------------------------------------------------------------------------------------


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="generate a built-in task's train/eval JSONL (chat format)")
    p.add_argument("--task", required=True, help=f"built-in task: {', '.join(TASKS)}")
    p.add_argument("--n", type=int, default=600, help="number of train examples (default 600)")
    p.add_argument("--eval-n", type=int, default=200, help="number of eval examples (default 200)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same data (default 0)")
    p.add_argument("--out", type=Path, required=True, help="folder for train.jsonl, eval.jsonl and task.json")
    p.set_defaults(func=_data)


def _data(args: argparse.Namespace) -> int:
    try:
        task = get_task(args.task)
    except ValueError as e:
        raise UserError(str(e)) from e
    for flag, value in (("--n", args.n), ("--eval-n", args.eval_n)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    train = task.generate(args.n, "train", args.seed)
    evals = task.generate(args.eval_n, "eval", args.seed)
    write_jsonl(train, args.out / "train.jsonl")
    write_jsonl(evals, args.out / "eval.jsonl")
    meta = {
        "task": task.name,
        "description": task.description,
        "n": args.n,
        "eval_n": args.eval_n,
        "seed": args.seed,
        "counts": {"train": len(train), "eval": len(evals)},
    }
    write_json(meta, args.out / "task.json")
    print(f"{task.name}: {len(train)} train + {len(evals)} eval examples (seed {args.seed}) -> {args.out}")
    return 0
