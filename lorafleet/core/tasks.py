"""The task interface: what the trainer, the evaluators, the harness and the proof need from any tenant task.

A task has train and eval examples (chat conversations ending in the reference answer), a scorer
(lorafleet.core.scorers) and the prompts built from its own train split: zero-shot chat, k-shot chat, and k-shot
plain completion for base models without a chat template. The built-in tasks generate their examples
(`GeneratedTask`); a tenant's task reads them from files (train.tasks.files). Nothing downstream tells them apart.
"""

from __future__ import annotations

import random
from typing import ClassVar, Literal

from pydantic import Field

from lorafleet.core.config import Strict
from lorafleet.core.scorers import Scorer

Split = Literal["train", "eval"]
SPLITS = ("train", "eval")


def split_pool(pool: list[str], split: Split) -> list[str]:
    """The half of an entity pool a split may use; the halves are disjoint so eval never shows a train entity."""
    _check_split(split)
    return pool[0::2] if split == "train" else pool[1::2]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def prompt_and_answer(example: dict) -> tuple[list[dict], str]:
    """(the messages before the final assistant turn, that turn's content) of a chat example."""
    msgs = example["messages"]
    return msgs[:-1], msgs[-1]["content"]


class Checks(Strict):
    """What a task's data must pass before anything trains on it (train.tasks.checks)."""

    max_overlap: float = Field(
        0.0, ge=0, le=1, description="share of eval inputs that may also be (nearly) in train before it is refused"
    )
    near_similarity: float = Field(
        0.9, gt=0, le=1, description="word-set Jaccard similarity from which two inputs count as near-identical"
    )
    min_train: int = Field(500, ge=1, description="fewer train examples than this: a warning (the article's ~500)")


class Task:
    """A tenant task. Subclasses give `name`, `description`, `system_prompt`, `scorer` and `generate`."""

    name: str
    description: str
    system_prompt: str
    scorer: Scorer
    few_shot_k: int = 3  # solved examples in the k-shot baselines
    checks: Checks = Checks()
    # Where a base model's completion of `few_shot_prompt` stops being the answer: it goes on to invent the next
    # example. Sent as `stop`, so the server does not generate the rest (extract_answer cuts the same place).
    few_shot_stop: ClassVar[tuple[str, ...]] = ("\nInput:",)

    def generate(self, n: int, split: Split, seed: int) -> list[dict]:
        """Up to n chat examples {"messages": [..., {"role": "assistant", "content": answer}]} of a split."""
        raise NotImplementedError

    def size(self, split: Split) -> int | None:
        """How many examples a split holds; None: as many as asked for (a generator)."""
        return None

    def capped(self, n: int, split: Split) -> int:
        """n, or all the split holds if that is fewer."""
        size = self.size(split)
        return n if size is None else min(n, size)

    def shots(self, k: int, seed: int) -> list[dict]:
        """The k solved train examples a few-shot prompt shows."""
        return self.generate(k, "train", seed)[:k]

    def score(self, prediction: str, reference: str) -> float:
        """How right a prediction is, in [0, 1]."""
        return self.scorer.score(prediction, reference)

    def correct(self, prediction: str, reference: str) -> bool:
        return self.score(prediction, reference) == 1.0

    def accuracy(self, predictions: list[str], references: list[str]) -> float:
        if len(predictions) != len(references) or not references:
            raise ValueError(
                f"need as many predictions as references (>0), got {len(predictions)} and {len(references)}"
            )
        return sum(self.correct(p, r) for p, r in zip(predictions, references, strict=True)) / len(references)

    def chat(self, user_content: str) -> list[dict]:
        """The zero-shot chat prompt: system instruction (if the task has one) + the input."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": user_content}]

    def few_shot_messages(self, k: int, seed: int = 0) -> list[dict]:
        """k train examples as user/assistant turns, to put between the system prompt and the real input."""
        turns = []
        for example in self.shots(k, seed):
            prompt, answer = prompt_and_answer(example)
            user = next(m for m in reversed(prompt) if m["role"] == "user")
            turns += [{"role": "user", "content": user["content"]}, {"role": "assistant", "content": answer}]
        return turns

    def few_shot_chat(self, user_content: str, k: int, seed: int = 0) -> list[dict]:
        """A complete few-shot chat prompt: system, k solved examples, then the input."""
        *system, user = self.chat(user_content)
        return [*system, *self.few_shot_messages(k, seed), user]

    def few_shot_prompt(self, user_content: str, k: int, seed: int = 0) -> str:
        """A plain-text completion prompt for base models without a chat template; answer with `extract_answer`."""
        parts = [self.system_prompt.strip(), ""] if self.system_prompt else []
        turns = self.few_shot_messages(k, seed)
        for user, assistant in zip(turns[0::2], turns[1::2], strict=True):
            parts.append(f"Input: {user['content']}\nOutput: {assistant['content']}\n")
        parts.append(f"Input: {user_content}\nOutput:")
        return "\n".join(parts)

    @staticmethod
    def extract_answer(completion: str) -> str:
        """The answer in a base model's completion of `few_shot_prompt`: the text before a blank line or next input."""
        completion = completion.lstrip()  # "Output:" may be followed by a newline before the answer
        for stop in ("\n\n", "\nInput:"):
            completion = completion.split(stop, 1)[0]
        return completion.strip()


class GeneratedTask(Task):
    """A built-in task with exact ground truth, generated from seeded templates: subclasses implement
    `make_example` and set `pools`."""

    # Entity pools (names, ports, ...); each split draws from its own half, see `pool`.
    pools: ClassVar[dict[str, list[str]]] = {}

    def make_example(self, rng: random.Random, split: Split) -> tuple[str, str]:
        """One (user input, exact canonical answer), drawn with `rng` from the split's entities."""
        raise NotImplementedError

    def pool(self, kind: str, split: Split) -> list[str]:
        return split_pool(self.pools[kind], split)

    def rng(self, split: Split, seed: int) -> random.Random:
        # A string seed is hashed with SHA-512, so it is stable across processes; the split and task name in it
        # make train and eval (and different tasks) independent streams for the same user seed.
        _check_split(split)
        return random.Random(f"{self.name}/{split}/{seed}")

    def generate(self, n: int, split: Split, seed: int) -> list[dict]:
        """n chat examples {"messages": [system, user, assistant]}; the same (n, split, seed) gives the same data."""
        rng = self.rng(split, seed)
        examples = []
        for _ in range(n):
            user, answer = self.make_example(rng, split)
            examples.append({"messages": self.chat(user) + [{"role": "assistant", "content": answer}]})
        return examples
