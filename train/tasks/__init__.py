"""Tasks: the built-in ones (seeded generators with exact answers) and a tenant's own task files.

`get_task("contract")` is a built-in task; `get_task("path/to/task.yaml")` (or its folder) reads a task file
(train.tasks.files). Both give the same interface (lorafleet.core.tasks.Task), so every command that takes a task
takes either.
"""

from __future__ import annotations

from pathlib import Path

from lorafleet.core.tasks import Task
from train.tasks import contract, drugs, manifest
from train.tasks.files import TASK_FILE, FileTask, load_task

TASKS: dict[str, Task] = {t.name: t for t in (manifest.TASK, contract.TASK, drugs.TASK)}
_loaded: dict[tuple, FileTask] = {}


def is_task_file(ref: str) -> bool:
    """Whether a task reference names a file (or a folder with task.yaml) rather than a built-in task."""
    return ref.endswith((".yaml", ".yml")) or "/" in ref or (Path(ref) / TASK_FILE).is_file()


def get_task(ref: str) -> Task:
    """A built-in task by name, or a task file (read and checked once per process while its files are unchanged)."""
    if ref in TASKS:
        return TASKS[ref]
    if not is_task_file(ref):
        raise ValueError(f"unknown task {ref!r}: built-in tasks are {', '.join(TASKS)}; or give a task file "
                         f"(a {TASK_FILE} or its folder, see train/tasks/files.py)")  # fmt: skip
    path = Path(ref) / TASK_FILE if Path(ref).is_dir() else Path(ref)
    key = (str(path.resolve()), path.stat().st_mtime_ns if path.is_file() else None)
    if key not in _loaded:
        _loaded[key] = load_task(path)
    task = _loaded[key]
    return task


__all__ = ["TASKS", "Task", "get_task", "is_task_file", "load_task"]
