"""The quality runner: accuracy through the API with the task's scorer, in each prompting mode, joined with cost."""

from __future__ import annotations

import asyncio

import pytest

from loadtest.client import PreflightError
from loadtest.metrics import BenchMetrics
from loadtest.runner import BenchState, finalize, run_bench

from .conftest import answer_three_of_four, fake_get_task, make_config


def run_quality(fake, evals, price=None, n=20, get_task=fake_get_task, load=None):
    target = {"price": price} if price else {}
    cfg = make_config(
        fake.base_url, load, target=target, quality={"n": n, "max_tokens": 16, "concurrency": 3, "evals": evals}
    )
    state = BenchState(cfg)
    asyncio.run(run_bench(cfg, state, BenchMetrics(), progress=False, get_task=get_task))
    finalize(state)
    return state


@pytest.mark.parametrize("mode", ["zero_shot", "few_shot_chat", "few_shot_completion"])
def test_accuracy_is_exact(fake, mode):
    fake.settings.answer = answer_three_of_four
    (q,) = run_quality(fake, [{"target": "t1", "model": "manifest", "task": "echo", "mode": mode, "k": 2}]).quality
    # Items 0..19, wrong for 0, 4, 8, 12, 16.
    assert (q["n"], q["correct"], q["accuracy"], q["score"], q["errors"]) == (20, 15, 0.75, 0.75, 0)
    assert q["model"] == "manifest"
    assert [i["correct"] for i in q["items"]] == [i % 4 != 0 for i in range(20)]


def test_requests_are_greedy_and_shaped_per_mode(fake):
    fake.settings.answer = answer_three_of_four
    evals = [
        {"target": "t1", "task": "echo", "mode": "zero_shot"},
        {"target": "t1", "task": "echo", "mode": "few_shot_chat", "k": 2},
        {"target": "t1", "task": "echo", "mode": "few_shot_completion", "k": 3},
    ]
    run_quality(fake, evals, n=2)
    zero, few, completion = fake.app.bodies[0:2], fake.app.bodies[2:4], fake.app.bodies[4:6]
    assert all(b["temperature"] == 0 and b["max_tokens"] == 16 and not b.get("stream") for b in fake.app.bodies)
    assert [m["role"] for m in zero[0]["messages"]] == ["system", "user"]
    assert [m["role"] for m in few[0]["messages"]] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert few[0]["messages"][1]["content"] == "item 1000"  # the examples come from the task's train split
    assert "messages" not in completion[0] and completion[0]["prompt"].count("Input:") == 4
    assert completion[0]["stop"] == ["\nInput:"] and "stop" not in zero[0]  # no tokens spent on the next example
    assert completion[0]["model"] == "base-model"  # default: the target's model


def test_completion_answer_is_cut_with_extract_answer(fake):
    fake.settings.answer = answer_three_of_four  # a base model keeps writing "\n\nInput: item 5"
    (q,) = run_quality(fake, [{"target": "t1", "task": "echo", "mode": "few_shot_completion"}], n=4).quality
    assert [i["prediction"] for i in q["items"]] == ["wrong", "ANS1", "ANS2", "ANS3"]


def test_cost_per_1k_correct_at_list_price(fake):
    fake.settings.answer = answer_three_of_four
    price = {"usd_per_1m_input": 2.0, "usd_per_1m_output": 10.0}
    state = run_quality(fake, [{"target": "t1", "task": "echo", "mode": "zero_shot"}], price=price)
    (q,) = state.quality
    # The fake counts words: system (4) + "item i" (2) in, one word out.
    assert (q["prompt_tokens"], q["completion_tokens"]) == (20 * 6, 20)
    expected = (120 * 2.0 + 20 * 10.0) / 1e6
    assert q["cost_usd"] == pytest.approx(expected)
    assert q["usd_per_1k_correct"] == pytest.approx(expected / 15 * 1000)


def test_cost_per_1k_correct_self_hosted_needs_a_load_run(fake):
    fake.settings.answer = answer_three_of_four
    evals = [{"target": "t1", "task": "echo"}]
    (q,) = run_quality(fake, evals).quality
    assert q["cost_usd"] is None and q["usd_per_1k_correct"] is None
    state = run_quality(fake, evals, load={"mode": "closed", "concurrency": 2, "num_requests": 10})
    cost = state.targets["t1"]["cost"]
    (q,) = state.quality
    assert q["cost_usd"] == pytest.approx(
        (q["prompt_tokens"] + q["completion_tokens"]) * cost["usd_per_1m_blended"] / 1e6
    )
    assert q["usd_per_1k_correct"] == pytest.approx(q["cost_usd"] / 15 * 1000)


def test_failed_requests_count_as_wrong_and_are_reported(fake):
    fake.settings.answer = lambda body: "ANS" + body["messages"][-1]["content"].split()[-1]  # always right
    fake.settings.fail_every = 5
    (q,) = run_quality(fake, [{"target": "t1", "task": "echo"}]).quality
    assert (q["errors"], q["correct"]) == (4, 16)
    assert all("500" in i["error"] for i in q["items"] if i["error"])


def test_unknown_task_fails_before_any_request(fake):
    with pytest.raises(PreflightError, match=r"quality.evals.0.task: unknown task 'legal'"):
        run_quality(fake, [{"target": "t1", "task": "legal"}])
    assert fake.app.bodies == []


def test_real_builtin_task_through_the_api(fake):
    """The real train.tasks interface: a fake model that answers every eval item with its reference."""
    tasks = pytest.importorskip("train.tasks")
    task = tasks.get_task("manifest")
    answers = {}
    for item in task.generate(6, "eval", 0):
        _, user, assistant = item["messages"]
        answers[user["content"]] = assistant["content"]

    def answer(body):
        if "messages" in body:
            return answers[body["messages"][-1]["content"]]
        user = body["prompt"].rsplit("Input: ", 1)[1].removesuffix("\nOutput:")
        return " " + answers[user] + "\n\nInput: more"

    fake.settings.answer = answer
    evals = [
        {"target": "t1", "model": "manifest", "task": "manifest", "mode": "zero_shot"},
        {"target": "t1", "task": "manifest", "mode": "few_shot_chat", "k": 1},
        {"target": "t1", "task": "manifest", "mode": "few_shot_completion", "k": 1},
    ]
    state = run_quality(fake, evals, n=6, get_task=tasks.get_task)
    assert [q["accuracy"] for q in state.quality] == [1.0, 1.0, 1.0]
