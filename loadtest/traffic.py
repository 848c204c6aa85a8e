"""What the harness sends and when: arrival times, the weighted model mix, and the prompt pools."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from loadtest.client import PreflightError
from loadtest.config import Prompts, Target
from train.tasks import get_task

# Plain, common words: synthetic prompts tokenize to about one token per word with any BPE vocabulary.
WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education"
).split()


def arrival_times(rate: float, burstiness: float, seed: int) -> Iterator[float]:
    """Send times (s from the step start) of an open-loop arrival process, forever.

    Gaps are gamma distributed with shape `burstiness` and mean 1/rate: burstiness 1 is a Poisson process,
    below 1 the traffic comes in bursts (coefficient of variation 1/sqrt(burstiness)), above 1 it is more even.
    """
    rng = np.random.default_rng(seed)
    scale = 1.0 / (rate * burstiness)
    t = 0.0
    while True:
        for gap in rng.gamma(burstiness, scale, size=1024):
            t += float(gap)
            yield t


class ModelPicker:
    """Picks the model (adapter) of each request by weight, reproducibly."""

    def __init__(self, weights: dict[str, float], seed: int):
        self.models = list(weights)
        p = np.array([weights[m] for m in self.models], dtype=float)
        self.cum = np.cumsum(p / p.sum())
        self.rng = np.random.default_rng(seed)

    def pick(self) -> str:
        i = int(np.searchsorted(self.cum, self.rng.random(), side="right"))
        return self.models[min(i, len(self.models) - 1)]


def synthetic_text(n_words: int, rng: np.random.Generator) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=n_words))


def _task_loader() -> Callable[[str], Any]:
    return get_task


def task_items(get_task: Callable[[str], Any], task: str, n: int, seed: int) -> tuple[Any, list[dict]]:
    try:
        t = get_task(task)
    except (KeyError, ValueError) as e:
        raise PreflightError(f"prompts.task: {e}") from e
    return t, t.generate(n, "eval", seed)


def split_item(item: dict) -> tuple[dict | None, dict, str]:
    """(system message or None, user message, reference answer) of a task example."""
    msgs = item["messages"]
    system = msgs[0] if msgs[0]["role"] == "system" else None
    user = next(m for m in reversed(msgs) if m["role"] == "user")  # the input; earlier turns are context
    reference = next((m["content"] for m in reversed(msgs) if m["role"] == "assistant"), "")
    return system, user, reference


def prompt_pool(
    target: Target,
    model: str,
    prompts: Prompts,
    seed: int,
    get_task: Callable[[str], Any] | None = None,
) -> list[Any]:
    """Distinct prompts for one model of a target: chat messages, or a string for `api: completions`."""
    rng = np.random.default_rng(seed)
    task_name = prompts.task_for(model)
    if task_name is None:
        texts = [synthetic_text(prompts.input_tokens, rng) for _ in range(prompts.pool_size)]
        if target.api == "chat":
            return [[{"role": "user", "content": t}] for t in texts]
        return texts
    task, items = task_items(get_task or _task_loader(), task_name, prompts.pool_size, seed)
    pool: list[Any] = []
    for item in items:
        system, user, _ = split_item(item)
        if target.api == "chat":
            pool.append([system, user] if system else [user])
        else:
            pool.append(task.few_shot_prompt(user["content"], prompts.completion_few_shot_k))
    return pool
