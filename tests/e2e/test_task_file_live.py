"""A tenant's own task file scored end to end: `lorafleet bench run` with `task: <task.yaml>` through the real gateway
over real vLLM (CPU), the adapter and the base model zero- and k-shot, every answer scored by the file's scorer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from lorafleet.core.scorers import make_scorer
from tests.conftest import LIVE_ADAPTERS, ROOT, live_bench_config

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

LABELS = ["billing", "bug", "other"]
TICKETS = [
    ("I was charged twice for my subscription, order 4411.", "billing"),
    ("The export button crashes the app on Firefox.", "bug"),
    ("Where can I find your office address?", "other"),
    ("Invoice 93 shows the wrong amount.", "billing"),
    ("Error E502 when I open the calendar tab.", "bug"),
    ("Do you have a newsletter?", "other"),
    ("My card was debited after I cancelled.", "billing"),
    ("The dashboard stays blank since the update.", "bug"),
]


def write_task(tmp_path) -> str:
    def rows(items):
        return "".join(json.dumps({"prompt": t, "completion": a}) + "\n" for t, a in items)

    (tmp_path / "train.jsonl").write_text(
        rows(TICKETS[:4] + [("The app crashes at login.", "bug"), ("Is there a student plan?", "other")])
    )
    (tmp_path / "eval.jsonl").write_text(rows(TICKETS[4:] + [("Refund for order 77 never arrived.", "billing")]))
    spec = {"name": "tickets", "train": "train.jsonl", "eval": "eval.jsonl",
            "scorer": {"name": "label", "labels": LABELS}, "few_shot_k": 2,
            "system": "Route the ticket: reply billing, bug or other."}  # fmt: skip
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(spec))
    return str(tmp_path / "task.yaml")


def test_a_task_file_is_scored_through_the_gateway(live_gateway, tmp_path):
    task = write_task(tmp_path)
    cfg = live_bench_config(live_gateway.url, tmp_path / "out")
    del cfg["load"]  # quality only
    adapter = LIVE_ADAPTERS["acme"]
    cfg["quality"] = {"n": 50, "max_tokens": 8, "concurrency": 4, "evals": [
        {"target": "live-mix", "model": adapter, "task": task, "mode": "zero_shot"},
        {"target": "live-base", "task": task, "mode": "zero_shot"},
        {"target": "live-base", "task": task, "mode": "few_shot_chat", "k": 2},
    ]}  # fmt: skip
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "lorafleet.cli", "bench", "run", str(tmp_path / "bench.yaml")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    quality = json.loads((tmp_path / "out" / "results.json").read_text())["quality"]
    scorer = make_scorer({"name": "label", "labels": LABELS})
    inputs = [t for t, _ in TICKETS[4:]] + ["Refund for order 77 never arrived."]
    for q in quality:
        assert q["n"] == 5 and q["errors"] == 0  # n capped at what the eval split holds
        assert [r["input"] for r in q["items"]] == inputs
        assert [r["reference"] for r in q["items"]] == ["bug", "other", "billing", "bug", "billing"]
        for r in q["items"]:
            assert r["prediction"] is not None and r["completion_tokens"] > 0
            assert r["score"] == scorer.score(r["prediction"], r["reference"])  # the file's scorer decided
        assert q["accuracy"] == sum(r["correct"] for r in q["items"]) / 5
    zero, few = quality[1], quality[2]
    # the k-shot prompt carries two solved train tickets: many more prompt tokens per item than zero-shot
    assert few["prompt_tokens"] > zero["prompt_tokens"] + 5 * 20
