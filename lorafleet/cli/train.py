"""`lorafleet train <subcommand>`: one `_add_<name>` (arguments) and one `_<name>` (action) per subcommand."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorafleet.cli.train_run import add_subcommands as add_run_subcommands
from lorafleet.core.errors import UserError
from train.data import DataError
from train.tasks import TASKS, get_task
from train.tasks.checks import check_task, lines_of
from train.tasks.files import load_task, write_task_file


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="train_cmd", required=True, metavar="SUBCOMMAND")
    _add_data(sub)
    _add_check(sub)
    add_run_subcommands(sub)  # run, validate, merge, eval, curve, bench (lorafleet/cli/train_run.py)


# --- data ---------------------------------------------------------------------------------------------------


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="write a built-in task as a task file: train/eval JSONL (chat) + task.yaml")
    p.add_argument("--task", required=True, help=f"built-in task: {', '.join(TASKS)}")
    p.add_argument("--n", type=int, default=600, help="number of train examples (default 600)")
    p.add_argument("--eval-n", type=int, default=200, help="number of eval examples (default 200)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same data (default 0)")
    p.add_argument("--out", type=Path, required=True, help="folder for train.jsonl, eval.jsonl and task.yaml")
    p.set_defaults(func=_data)


def _data(args: argparse.Namespace) -> int:
    try:
        task = get_task(args.task)
    except ValueError as e:
        raise UserError(str(e)) from e
    for flag, value in (("--n", args.n), ("--eval-n", args.eval_n)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    spec = write_task_file(task, args.out, args.n, args.eval_n, args.seed)
    print(f"{task.name}: {args.n} train + {args.eval_n} eval examples (seed {args.seed}) -> {args.out}")
    print(f"task file: {spec}  (use it wherever a task is asked for, e.g. lorafleet prove)")
    return 0


# --- check ----------------------------------------------------------------------------------------------------


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="check a task's data: overlap, answer distribution, majority baseline, size")
    p.add_argument("task", help=f"a task file (task.yaml or its folder) or a built-in task: {', '.join(TASKS)}")
    p.add_argument("--allow-overlap", action="store_true", help="report train/eval overlap instead of refusing")
    p.add_argument("--n", type=int, default=600, help="built-in tasks: train examples to check (default 600)")
    p.add_argument("--eval-n", type=int, default=200, help="built-in tasks: eval examples to check (default 200)")
    p.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    try:
        if args.task in TASKS:
            task = TASKS[args.task]
            report = check_task(task, *lines_of(task, args.n, args.eval_n), allow_overlap=args.allow_overlap)
        else:
            report = load_task(args.task, allow_overlap=args.allow_overlap).report
    except DataError as e:
        raise UserError(str(e)) from e
    print(report.text())
    print("OK: the data can be used")
    return 0
