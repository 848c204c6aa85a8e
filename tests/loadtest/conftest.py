"""Fixtures for the harness tests: a FAKE OpenAI streaming server (no model) and a fake task."""

from __future__ import annotations

import re
from typing import Any

import pytest

from loadtest.config import BenchConfig, parse_config
from loadtest.fake_openai import FakeServer, FakeSettings

MODELS = ["base-model", "manifest", "contract", "drugs"]


@pytest.fixture
def fake():
    """A fresh fake server per test; tests change `fake.settings` to shape its behaviour."""
    with FakeServer(FakeSettings(models=list(MODELS))) as srv:
        yield srv


def make_config(base_url: str, load: dict[str, Any] | None = None, **extra: Any) -> BenchConfig:
    target = {"name": "t1", "base_url": base_url, "model": "base-model", "price": {"usd_per_hour": 1.0}}
    target.update(extra.pop("target", {}))
    data: dict[str, Any] = {"targets": [target, *extra.pop("extra_targets", [])], **extra}
    if load is not None:
        data["load"] = {"warmup_requests": 0, "max_tokens": 8, **load}
    return parse_config(data)


class FakeTask:
    """Stands in for a train.tasks task: the answer to 'item i' is 'ANS<i>'."""

    name = "echo"
    system_prompt = "Answer with the code."
    few_shot_stop = ("\nInput:",)

    def generate(self, n: int, split: str, seed: int) -> list[dict]:
        base = 1000 if split == "train" else 0
        return [
            {
                "messages": [
                    {"role": "system", "content": self.system_prompt},
                    {"role": "user", "content": f"item {base + i}"},
                    {"role": "assistant", "content": f"ANS{base + i}"},
                ]
            }
            for i in range(n)
        ]

    def score(self, prediction: str, reference: str) -> float:
        return 1.0 if prediction.strip() == reference else 0.0

    def correct(self, prediction: str, reference: str) -> bool:
        return self.score(prediction, reference) == 1.0

    def few_shot_messages(self, k: int, seed: int = 0) -> list[dict]:
        return [m for ex in self.generate(k, "train", seed) for m in ex["messages"][1:]]

    def few_shot_prompt(self, user_content: str, k: int, seed: int = 0) -> str:
        shots = "".join(f"Input: item {1000 + i}\nOutput: ANS{1000 + i}\n\n" for i in range(k))
        return f"{self.system_prompt}\n\n{shots}Input: {user_content}\nOutput:"

    @staticmethod
    def extract_answer(text: str) -> str:
        return text.strip().split("\n\n")[0].strip()


def fake_get_task(name: str) -> FakeTask:
    if name != "echo":
        raise ValueError(f"unknown task {name!r}: known tasks are echo")
    return FakeTask()


def answer_three_of_four(body: dict[str, Any]) -> str:
    """The fake model's answer: right for items whose number is not a multiple of 4; a base model rambles on."""
    text = body["messages"][-1]["content"] if "messages" in body else body["prompt"].rsplit("Input:", 1)[1]
    found = re.search(r"item (\d+)", text)
    if found is None:  # a load-test prompt, not an eval item
        return "some filler words"
    i = int(found.group(1))
    answer = f"ANS{i}" if i % 4 else "wrong"
    return answer + ("\n\nInput: item 5" if "prompt" in body else "")
