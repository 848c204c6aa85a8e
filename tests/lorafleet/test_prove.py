"""`lorafleet prove`: a tenant file becomes the demo's plan for that tenant's task file, and the report answers the
claims for it (the paired interval, the examples needed, the answers that went wrong)."""

from __future__ import annotations

import json

import pytest
import yaml

from loadtest.config import parse_config as parse_bench
from lorafleet.cli import main
from lorafleet.core.errors import UserError
from lorafleet.demo.prove import curve_sizes, make_plan
from lorafleet.demo.report import diagnostics, examples_needed, gain_interval, wrong_answers
from lorafleet.demo.run import bench_config, serve_config
from serve.gateway.tenants import hash_key


def write_tenant(tmp_path, n_train: int = 40, n_eval: int = 12, **spec) -> object:
    task_dir = tmp_path / "data"
    task_dir.mkdir(exist_ok=True)
    labels = ["yes", "no"]
    for name, n, off in (("train.jsonl", n_train, 0), ("eval.jsonl", n_eval, 10_000)):
        rows = [{"prompt": f"Is {i + off} a multiple of seven? Number n{(i + off) * 7919}", "completion": labels[i % 2]}
                for i in range(n)]  # fmt: skip
        (task_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"name": "sevens", "train": "train.jsonl", "eval": "eval.jsonl",
            "scorer": {"name": "label", "labels": labels}}  # fmt: skip
    (task_dir / "task.yaml").write_text(yaml.safe_dump(task))
    (tmp_path / "tenant.yaml").write_text(yaml.safe_dump({"tenant": "acme", "task": "data/task.yaml", **spec}))
    return tmp_path / "tenant.yaml"


def test_a_tenant_file_becomes_a_plan_over_its_task_file(tmp_path):
    plan = make_plan(write_tenant(tmp_path, n_train=600))
    (tenant,) = plan.tenants
    assert tenant.name == "acme" and tenant.adapter == "sevens" and tenant.task == str(tmp_path / "data/task.yaml")
    assert plan.n_train == 600 and plan.curve_sizes == [50, 100, 250] and not plan.merged  # sizes <= half the data
    served = serve_config(plan)  # validated by serve's own parser
    assert {a.name for a in served.adapters} == {"sevens", "sevens-n50", "sevens-n100", "sevens-n250"}
    (acme,) = served.tenants
    assert acme.api_key_hashes == [hash_key("sk-acme-prove")] and "sevens" in acme.models
    bench = parse_bench(bench_config(plan, "http://127.0.0.1:8080", tmp_path / "out"))
    modes = {(e.target, e.mode) for e in bench.quality.evals}
    assert modes == {("specialists-lora", "zero_shot"), ("small-base", "zero_shot"), ("small-base", "few_shot_chat"),
                     ("generalist", "few_shot_completion")}  # fmt: skip
    assert all(e.task == tenant.task for e in bench.quality.evals)
    assert bench.quality.n == 12  # capped at the eval split


def test_curve_sizes_stay_within_the_data():
    assert curve_sizes(80) == [] and curve_sizes(100) == [50] and curve_sizes(2000) == [50, 100, 250, 500, 1000]


def test_bad_tenant_files_say_what_to_fix(tmp_path):
    with pytest.raises(UserError, match="curve_sizes must be below n_train"):
        make_plan(write_tenant(tmp_path, curve_sizes=[40]))
    path = write_tenant(tmp_path)
    (tmp_path / "data" / "eval.jsonl").write_text("")
    with pytest.raises(UserError, match="task: .*no examples"):
        make_plan(path)
    (tmp_path / "tenant.yaml").write_text(yaml.safe_dump({"tenant": "a b", "task": "x"}))
    with pytest.raises(UserError, match="tenant"):
        make_plan(tmp_path / "tenant.yaml")
    assert main(["prove", str(tmp_path / "missing.yaml")]) == 2


def test_gain_interval_is_paired_over_the_same_items():
    def q(correct):
        return {"items": [{"index": i, "correct": c} for i, c in enumerate(correct)]}

    same = q([True, False] * 20)
    assert gain_interval(same, same) == (0.0, 0.0)  # identical answers: no gain, no doubt
    lo, hi = gain_interval(q([True] * 40), q([True, False] * 20))
    assert 0.3 < lo < 0.5 < hi <= 0.66 and gain_interval(q([True]), q([True, False])) is None


def test_examples_needed_and_a_curve_still_rising():
    flat = [(0, 0.0, 0), (50, 0.5, 1), (100, 0.92, 1), (250, 0.95, 1), (600, 1.0, 1)]
    assert examples_needed(flat).startswith("Examples needed: 100 reach 90 % of the final score (100 % at 600).")
    assert "still rising" not in examples_needed(flat)
    rising = [(0, 0.0, 0), (50, 0.2, 1), (250, 0.4, 1), (600, 0.6, 1)]
    assert "still rising (40 % at 250)" in examples_needed(rising)


def test_wrong_answers_show_how_each_model_fails():
    items = [{"index": 0, "input": "Is 14 a multiple?", "reference": "yes", "prediction": "no", "correct": False,
              "error": None}, {"index": 1, "input": "x", "reference": "no", "prediction": "no", "correct": True,
              "error": None}]  # fmt: skip
    gen = [{"index": 0, "input": "Is 14 a multiple?", "reference": "yes", "prediction": None, "correct": False,
            "error": "HTTP 500"}]  # fmt: skip
    results = {"quality": [
        {"target": "specialists-lora", "task": "t", "mode": "zero_shot", "items": items},
        {"target": "generalist", "task": "t", "mode": "few_shot_completion", "items": gen},
    ]}  # fmt: skip
    headers, rows = wrong_answers(results, {"acme": "t"})
    assert headers == ["tenant/task", "model", "input", "reference", "prediction"]
    assert rows == [["acme/t", "fine-tuned", "Is 14 a multiple?", "yes", "no"],
                    ["acme/t", "generalist", "Is 14 a multiple?", "yes", "error: HTTP 500"]]  # fmt: skip


def test_the_report_names_a_model_collapsed_onto_the_majority_answer():
    def items(preds, refs):
        pairs = zip(preds, refs, strict=True)
        return [{"reference": r, "prediction": p, "correct": p == r, "error": None} for p, r in pairs]

    refs = ['{"verdict": "approve"}'] * 15 + ['{"verdict": "reject"}'] * 5
    results = {"quality": [
        {"target": "specialists-lora", "task": "t", "mode": "zero_shot", "items": items(refs[:1] * 20, refs)},
        {"target": "generalist", "task": "t", "mode": "few_shot_completion", "items": items(refs, refs)},
    ]}  # fmt: skip
    headers, rows = diagnostics(results, {"acme": "t"})
    assert headers[-2:] == ["majority baseline", "warnings"]
    assert rows[0][:4] == ["acme/t", "fine-tuned", "verdict 75 %", "75 %"]
    assert rows[0][4] == "verdict: predicts `approve` for 100% of inputs; 25% of references are `reject`"
    assert rows[1][2:] == ["verdict 100 %", "75 %", "-"]  # the generalist is right every time: no warning
