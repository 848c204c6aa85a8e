"""Task accuracy through the API: a task's eval split (built-in or a tenant's task file), scored with its scorer.

Modes: `zero_shot` (chat: system + user), `few_shot_chat` (k worked examples as chat turns before the user
turn), `few_shot_completion` (a base model without a chat template: /v1/completions on the task's few-shot
prompt, the answer cut out with `task.extract_answer`). Greedy decoding, so a rerun gives the same answers.

A task (`train.tasks.get_task(name or task file)`, the lorafleet.core.tasks interface) provides:
`generate(n, split, seed)` -> [{"messages": [system, user, assistant]}], `correct(prediction, reference) -> bool`,
optionally `score(prediction, reference) -> float` (partial credit, defaults to correct), `few_shot_messages(k,
seed)`, `few_shot_prompt(user, k)`, `extract_answer(text)`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from loadtest.client import ClientPool, auth_headers, post_json, quiet
from loadtest.config import Eval, Quality, Target
from loadtest.traffic import split_item
from train.tasks import get_task


def default_get_task() -> Callable[[str], Any]:
    return get_task


def _request(target: Target, ev: Eval, task: Any, item: dict, shots: list[dict], max_tokens: int):
    system, user, reference = split_item(item)
    model = ev.model or target.model
    if ev.mode == "few_shot_completion":
        body = {"model": model, "prompt": task.few_shot_prompt(user["content"], ev.k)}
        if getattr(task, "few_shot_stop", None):
            body["stop"] = list(task.few_shot_stop)
        url = f"{target.base_url}/completions"
    else:
        head = [] if shots and shots[0]["role"] == "system" else ([system] if system else [])
        body = {"model": model, "messages": [*head, *shots, user]}
        url = f"{target.base_url}/chat/completions"
    body.update(max_tokens=max_tokens, temperature=0.0)
    return url, body, reference


def _answer_text(resp: dict[str, Any]) -> str:
    choice = resp["choices"][0]
    if "message" in choice:
        return choice["message"].get("content") or ""
    return choice.get("text") or ""


def _score(task: Any, prediction: str, reference: str) -> tuple[bool, float]:
    correct = bool(task.correct(prediction, reference))
    score = getattr(task, "score", None)
    return correct, float(score(prediction, reference)) if score else float(correct)


async def run_eval(
    pool: ClientPool,
    target: Target,
    ev: Eval,
    q: Quality,
    get_task: Callable[[str], Any],
    progress: bool = True,
) -> dict[str, Any]:
    """Ask every eval item once and score it; errors count as wrong answers and are reported."""
    task = get_task(ev.task)
    items = task.generate(ev.n or q.n, "eval", q.seed)
    shots = task.few_shot_messages(ev.k, q.seed) if ev.mode == "few_shot_chat" and ev.k else []
    headers = auth_headers(target.key(ev.model or target.model))
    sem = asyncio.Semaphore(q.concurrency)
    desc = f"quality {target.name}/{ev.model or target.model} {ev.task} {ev.mode}"
    bar = tqdm(total=len(items), desc=desc, unit="item", disable=quiet(progress), leave=False)

    async def one(i: int, item: dict) -> dict[str, Any]:
        url, body, reference = _request(target, ev, task, item, shots, q.max_tokens)
        async with sem, pool.lease() as client:
            t = time.perf_counter()
            resp, err = await post_json(client, url, headers, body)
            latency = time.perf_counter() - t
        bar.update(1)
        row = {"index": i, "input": split_item(item)[1]["content"], "reference": reference, "prediction": None,
               "correct": False, "score": 0.0}  # fmt: skip
        row.update(latency_s=latency, error=err, prompt_tokens=0, completion_tokens=0)
        if resp is None:
            return row
        try:
            text = _answer_text(resp)
        except (KeyError, IndexError, TypeError):
            row["error"] = "response has no choices"
            return row
        usage = resp.get("usage") or {}
        row["prompt_tokens"] = int(usage.get("prompt_tokens") or 0)
        row["completion_tokens"] = int(usage.get("completion_tokens") or 0)
        row["prediction"] = task.extract_answer(text) if ev.mode == "few_shot_completion" else text.strip()
        row["correct"], row["score"] = _score(task, row["prediction"], reference)
        return row

    try:
        rows = await asyncio.gather(*(one(i, it) for i, it in enumerate(items)))
    finally:
        bar.close()
    return summarize_eval(target.name, ev.model or target.model, ev, rows)


def summarize_eval(target: str, model: str, ev: Eval, rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    return {
        "target": target,
        "model": model,
        "task": ev.task,
        "mode": ev.mode,
        "k": ev.k if ev.mode != "zero_shot" else 0,
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else None,
        "score": sum(r["score"] for r in rows) / n if n else None,
        "errors": sum(r["error"] is not None for r in rows),
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "completion_tokens": sum(r["completion_tokens"] for r in rows),
        "items": rows,
    }
