"""Built-in tenant tasks with exact ground truth: `get_task("manifest").generate(600, "train", seed=0)`."""

from __future__ import annotations

from lorafleet.core.tasks import Task
from train.tasks import contract, drugs, manifest

TASKS: dict[str, Task] = {t.name: t for t in (manifest.TASK, contract.TASK, drugs.TASK)}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}: known tasks are {', '.join(TASKS)}") from None


__all__ = ["TASKS", "Task", "get_task"]
