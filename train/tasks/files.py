"""A tenant's own task: train and eval JSONL plus a scorer, described by one YAML file.

    # task.yaml (paths are relative to this file)
    name: tickets
    description: Route a support ticket to the team that handles it.
    train: train.jsonl          # chat ({"messages": [...]}) or {"prompt", "completion"} lines
    eval: eval.jsonl            # one input and its reference per line: [system], user, assistant
    scorer: {name: label, labels: [billing, bug, feature_request]}
    system: You route support tickets ...   # optional: the instruction for examples that carry none
    few_shot_k: 3               # solved examples in the k-shot baselines
    checks: {max_overlap: 0.0, near_similarity: 0.9}

`load_task` reads it, checks the data (train.tasks.checks) and returns a `FileTask`, which serves the trainer,
the evaluators and the harness exactly as a built-in task does.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator

from lorafleet.core.config import Strict, load_yaml
from lorafleet.core.scorers import Scorer, make_scorer
from lorafleet.core.tasks import Checks, Split, Task, _check_split
from train.data import DataError, to_conversation, write_jsonl
from train.tasks.checks import DataReport, Line, check_task

TASK_FILE = "task.yaml"
MAX_LISTED = 10  # bad lines listed in one error; the rest are counted


class TaskFile(Strict):
    name: str = Field(description="the task's name in reports and metrics")
    description: str = ""
    train: str = Field(description="train JSONL, relative to the task file")
    eval: str = Field(description="eval JSONL (held out), relative to the task file")
    scorer: str | dict[str, Any] = Field(description="a scorer name, or {name: ..., options}")
    system: str = Field("", description="system prompt for examples without one; default: the train examples' own")
    few_shot_k: int = Field(3, ge=0, description="solved examples in the k-shot baselines")
    checks: Checks = Field(default_factory=Checks)

    @field_validator("name")
    @classmethod
    def _simple_name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "_.-" for c in v):
            raise ValueError("use letters, digits, '_', '.', '-' only (it names adapters and files)")
        return v


class FileTask(Task):
    """A task whose examples are a tenant's files; see the module docstring."""

    def __init__(self, spec: TaskFile, path: Path, train: list[Line], evals: list[Line]):
        self.spec, self.path = spec, path
        self.name, self.description = spec.name, spec.description or f"task file {path}"
        self.scorer: Scorer = make_scorer(spec.scorer)
        self.lines = {"train": train, "eval": evals}
        self.system_prompt = spec.system or _common_system(train)
        self.few_shot_k, self.checks = spec.few_shot_k, spec.checks
        self.report: DataReport | None = None  # filled by load_task

    def size(self, split: Split) -> int:
        _check_split(split)
        return len(self.lines[split])

    def generate(self, n: int, split: Split, seed: int) -> list[dict]:
        """Up to n examples of a split. Fewer than the split holds: a seeded subset, in file order, and a larger n
        with the same seed holds every example of a smaller one (a learning curve's sizes are nested)."""
        _check_split(split)
        lines = self.lines[split]
        if n < len(lines):
            order = list(range(len(lines)))
            random.Random(f"{self.name}/{split}/{seed}").shuffle(order)
            lines = [lines[i] for i in sorted(order[:n])]
        return [{"messages": self.with_system(line.messages)} for line in lines]

    def shots(self, k: int, seed: int) -> list[dict]:
        # Drawn, not the first k lines: files are often sorted by label, and k-shot should show a fair sample.
        lines = self.lines["train"]
        picked = random.Random(f"{self.name}/shots/{seed}").sample(range(len(lines)), min(k, len(lines)))
        return [{"messages": self.with_system(lines[i].messages)} for i in picked]

    def with_system(self, messages: list[dict]) -> list[dict]:
        if messages[0]["role"] == "system" or not self.system_prompt:
            return messages
        return [{"role": "system", "content": self.system_prompt}, *messages]


def _common_system(lines: list[Line]) -> str:
    systems = Counter(line.messages[0]["content"] for line in lines if line.messages[0]["role"] == "system")
    return systems.most_common(1)[0][0] if systems else ""


def read_lines(path: Path, eval_split: bool = False) -> list[Line]:
    """Every example of a JSONL file; all bad lines are reported at once, as `file:line: reason`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    lines, problems = [], []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            messages = to_conversation(json.loads(raw))
            if eval_split:
                _one_input(messages)
            lines.append(Line(where, messages))
        except json.JSONDecodeError as e:
            problems.append(f"{where}: bad JSON: {e.msg} (column {e.colno})")
        except DataError as e:
            problems.append(f"{where}: {e}")
    if problems:
        raise DataError(_listing(f"{len(problems)} bad line(s) in {path}", problems))
    if not lines:
        raise DataError(f"{path}: no examples (the file is empty or has only blank lines)")
    return lines


def _one_input(messages: list[dict]) -> None:
    roles = [m["role"] for m in messages]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise DataError(f"an eval example is one input and its reference ([system], user, assistant), got {roles}")


def _listing(head: str, items: list[str]) -> str:
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return head + ":\n  " + "\n  ".join(items[:MAX_LISTED]) + more


def load_task(path: str | Path, allow_overlap: bool = False) -> FileTask:
    """A task file (or a folder holding task.yaml), its data read and checked; raises a UserError on a problem."""
    path = Path(path)
    if path.is_dir():
        path = path / TASK_FILE
    spec = TaskFile.parse(load_yaml(path, "task file"), f"task file {path}")
    task = FileTask(spec, path, read_lines(path.parent / spec.train), read_lines(path.parent / spec.eval, True))
    task.report = check_task(task, task.lines["train"], task.lines["eval"], allow_overlap=allow_overlap)
    return task


def write_task_file(task: Task, out: Path, n: int, eval_n: int, seed: int) -> Path:
    """Any task as files (train.jsonl, eval.jsonl, task.yaml): how a built-in task becomes a tenant's own."""
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(task.generate(n, "train", seed), out / "train.jsonl")
    write_jsonl(task.generate(eval_n, "eval", seed), out / "eval.jsonl")
    spec = {"name": task.name, "description": task.description, "train": "train.jsonl", "eval": "eval.jsonl",
            "scorer": task.scorer.spec(), "system": task.system_prompt, "few_shot_k": task.few_shot_k}  # fmt: skip
    if checks := task.checks.model_dump(exclude_defaults=True):
        spec["checks"] = checks
    (out / TASK_FILE).write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=120))
    return out / TASK_FILE
