from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from loadtest.config import Prompts, Target
from loadtest.traffic import ModelPicker, arrival_times, prompt_pool

from .conftest import fake_get_task

N = 20_000


def gaps(rate: float, burstiness: float, seed: int = 0) -> np.ndarray:
    times = np.fromiter(itertools.islice(arrival_times(rate, burstiness, seed), N), dtype=float)
    return np.diff(times, prepend=0.0)


@pytest.mark.parametrize("rate", [0.5, 4.0, 200.0])
def test_poisson_mean_gap_is_one_over_rate(rate):
    g = gaps(rate, 1.0)
    assert g.mean() == pytest.approx(1 / rate, rel=0.03)
    # Exponential gaps: coefficient of variation 1.
    assert g.std() / g.mean() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("burstiness, cv", [(0.25, 2.0), (1.0, 1.0), (4.0, 0.5)])
def test_gamma_burstiness_sets_the_cv_not_the_mean(burstiness, cv):
    g = gaps(10.0, burstiness)
    assert g.mean() == pytest.approx(0.1, rel=0.05)
    assert g.std() / g.mean() == pytest.approx(cv, rel=0.08)


def test_arrivals_are_seeded():
    first = list(itertools.islice(arrival_times(5, 1, seed=3), 50))
    assert first == list(itertools.islice(arrival_times(5, 1, seed=3), 50))
    assert first != list(itertools.islice(arrival_times(5, 1, seed=4), 50))
    assert all(b > a for a, b in itertools.pairwise(first))


def test_weighted_mix_proportions():
    weights = {"manifest": 0.7, "contract": 0.2, "drugs": 0.1}
    picker = ModelPicker(weights, seed=0)
    counts = Counter(picker.pick() for _ in range(N))
    for model, w in weights.items():
        assert counts[model] / N == pytest.approx(w, abs=0.015)


def test_mix_weights_need_not_sum_to_one_and_are_reproducible():
    seqs = [[p.pick() for _ in range(2000)] for p in (ModelPicker({"x": 3, "y": 1}, seed=7) for _ in range(2))]
    assert seqs[0] == seqs[1]
    assert seqs[0] != [ModelPicker({"x": 3, "y": 1}, seed=8).pick() for _ in range(2000)]
    assert seqs[0].count("x") / 2000 == pytest.approx(0.75, abs=0.04)


def _target(api: str) -> Target:
    return Target(name="t", base_url="http://x/v1", model="m", api=api, price={"usd_per_hour": 1})


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_synthetic_prompts_have_the_requested_length(api):
    pool = prompt_pool(_target(api), "m", Prompts(input_tokens=50, pool_size=8), seed=0)
    assert len(pool) == 8 and len({str(p) for p in pool}) == 8
    text = pool[0][0]["content"] if api == "chat" else pool[0]
    assert len(text.split()) == 50


def test_task_prompts_chat_and_completion():
    prompts = Prompts(source="task", task="echo", pool_size=3, completion_few_shot_k=2)
    chat = prompt_pool(_target("chat"), "m", prompts, seed=0, get_task=fake_get_task)
    assert chat[1] == [
        {"role": "system", "content": "Answer with the code."},
        {"role": "user", "content": "item 1"},
    ]
    completion = prompt_pool(_target("completions"), "m", prompts, seed=0, get_task=fake_get_task)
    assert completion[1].endswith("Input: item 1\nOutput:") and completion[1].count("Input:") == 3


def test_task_map_picks_per_model_with_default():
    prompts = Prompts(source="task", task={"manifest": "manifest", "*": "drugs"})
    assert prompts.task_for("manifest") == "manifest"
    assert prompts.task_for("other") == "drugs"
    assert Prompts().task_for("manifest") is None
