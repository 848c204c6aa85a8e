"""What every built-in tenant task provides: seeded generation with exact answers, a scorer, few-shot prompts."""

from __future__ import annotations

import json
import random
import re
from typing import Any, ClassVar, Literal

Split = Literal["train", "eval"]
SPLITS = ("train", "eval")


def split_pool(pool: list[str], split: Split) -> list[str]:
    """The half of an entity pool a split may use; the halves are disjoint so eval never shows a train entity."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return pool[0::2] if split == "train" else pool[1::2]


def normalize_label(text: str) -> str:
    """'  Limitation of Liability.' -> 'limitation_of_liability': case, spacing, quotes and a final period don't count."""
    text = text.strip().strip("`'\"").strip().rstrip(".").strip().lower()
    return re.sub(r"[\s\-]+", "_", text)


def parse_json(text: str) -> Any | None:
    """The JSON value a prediction starts with, or None if it is not valid JSON.

    A ```json fence and text after a complete value are tolerated: chat models add both, and the value itself
    is what we score. A truncated or malformed value is not.
    """
    text = text.strip()
    fence = re.match(r"^```[a-zA-Z]*\s*(.*?)\s*(```|$)", text, re.DOTALL)
    if fence:
        text = fence.group(1)
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return None
    return value


def f1(predicted: set, reference: set) -> float:
    """Set F1; two empty sets agree perfectly."""
    if not predicted and not reference:
        return 1.0
    hits = len(predicted & reference)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(predicted), hits / len(reference)
    return 2 * precision * recall / (precision + recall)


class Task:
    """A tenant task: subclasses set the class attributes and implement `make_example` and `score`."""

    name: ClassVar[str]
    description: ClassVar[str]
    system_prompt: ClassVar[str]
    # Entity pools (names, ports, ...); each split draws from its own half, see `pool`.
    pools: ClassVar[dict[str, list[str]]] = {}
    # Where a base model's completion of `few_shot_prompt` stops being the answer: it goes on to invent the next
    # example. Sent as `stop`, so the server does not generate the rest (extract_answer cuts the same place).
    few_shot_stop: ClassVar[tuple[str, ...]] = ("\nInput:",)

    def make_example(self, rng: random.Random, split: Split) -> tuple[str, str]:
        """One (user input, exact canonical answer), drawn with `rng` from the split's entities."""
        raise NotImplementedError

    def score(self, prediction: str, reference: str) -> float:
        """How right a prediction is, in [0, 1]."""
        raise NotImplementedError

    def pool(self, kind: str, split: Split) -> list[str]:
        return split_pool(self.pools[kind], split)

    def rng(self, split: Split, seed: int) -> random.Random:
        # A string seed is hashed with SHA-512, so it is stable across processes; the split and task name in it
        # make train and eval (and different tasks) independent streams for the same user seed.
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return random.Random(f"{self.name}/{split}/{seed}")

    def generate(self, n: int, split: Split, seed: int) -> list[dict]:
        """n chat examples {"messages": [system, user, assistant]}; the same (n, split, seed) gives the same data."""
        rng = self.rng(split, seed)
        examples = []
        for _ in range(n):
            user, answer = self.make_example(rng, split)
            examples.append({"messages": self.chat(user) + [{"role": "assistant", "content": answer}]})
        return examples

    def chat(self, user_content: str) -> list[dict]:
        """The zero-shot chat prompt: system instruction + the input."""
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user_content}]

    def correct(self, prediction: str, reference: str) -> bool:
        return self.score(prediction, reference) == 1.0

    def accuracy(self, predictions: list[str], references: list[str]) -> float:
        if len(predictions) != len(references) or not references:
            raise ValueError(
                f"need as many predictions as references (>0), got {len(predictions)} and {len(references)}"
            )
        return sum(self.correct(p, r) for p, r in zip(predictions, references, strict=True)) / len(references)

    def few_shot_messages(self, k: int, seed: int = 0) -> list[dict]:
        """k train examples as user/assistant turns, to put between the system prompt and the real input."""
        turns = []
        for example in self.generate(k, "train", seed):
            turns += example["messages"][1:]
        return turns

    def few_shot_chat(self, user_content: str, k: int, seed: int = 0) -> list[dict]:
        """A complete few-shot chat prompt: system, k solved examples, then the input."""
        system, user = self.chat(user_content)
        return [system, *self.few_shot_messages(k, seed), user]

    def few_shot_prompt(self, user_content: str, k: int, seed: int = 0) -> str:
        """A plain-text completion prompt for base models without a chat template; answer with `extract_answer`."""
        parts = [self.system_prompt.strip(), ""]
        for example in self.generate(k, "train", seed):
            _, user, assistant = example["messages"]
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
