"""Task files (train.tasks.files) and the data checks (train.tasks.checks): a tenant's own task through the same
interface as the built-in ones, and every kind of bad input refused before anything trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lorafleet.core.scorers import f1, normalize_label, parse_json
from train.data import DataError
from train.tasks import TASKS, get_task
from train.tasks.checks import check_task, lines_of
from train.tasks.files import load_task, write_task_file

LABELS = ["billing", "bug", "feature_request"]


def chat(user: str, answer: str, system: str | None = None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return {"messages": [*msgs, {"role": "assistant", "content": answer}]}


def tickets(n: int, offset: int = 0) -> list[dict]:
    """Distinct tickets: each has its own number and product, so no two inputs are near-identical."""
    words = ["invoice", "crash", "export", "login", "refund", "dark mode", "timeout", "csv", "receipt", "webhook"]
    return [
        chat(
            f"Ticket {i + offset}: {words[i % 10]} problem with product P{(i + offset) * 7919 % 10007} "
            f"reported by user u{i + offset}",
            LABELS[i % 3],
        )  # fmt: skip
        for i in range(n)
    ]


def write_task(tmp_path: Path, train: list, evals: list, **spec) -> Path:
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        (tmp_path / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    body = {"name": "tickets", "train": "train.jsonl", "eval": "eval.jsonl",
            "scorer": {"name": "label", "labels": LABELS}, "system": "Route the ticket."} | spec  # fmt: skip
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(body))
    return tmp_path / "task.yaml"


def test_a_task_file_is_a_task(tmp_path):
    task = load_task(write_task(tmp_path, tickets(40), tickets(10, offset=1000)))
    assert task.name == "tickets" and task.size("train") == 40 and task.size("eval") == 10
    ex = task.generate(10, "eval", 0)
    assert ex[0]["messages"][0] == {"role": "system", "content": "Route the ticket."}  # the file's instruction
    assert task.correct(" Billing.", "billing") and not task.correct("shipping", "billing")
    # k-shot prompts are built from the task's own train split, seeded
    shots = task.few_shot_messages(3, seed=1)
    assert len(shots) == 6 and all(s["content"] in {e["messages"][-1]["content"] for e in tickets(40)} | {
        m["content"] for e in tickets(40) for m in e["messages"]} for s in shots)  # fmt: skip
    assert shots == task.few_shot_messages(3, seed=1) and shots != task.few_shot_messages(3, seed=2)
    prompt = task.few_shot_prompt("Ticket x", 3)
    assert prompt.startswith("Route the ticket.") and prompt.count("Input: ") == 4 and prompt.endswith("Output:")
    # smaller subsets are seeded, in file order, and nested inside larger ones
    small, big = task.generate(10, "train", 0), task.generate(20, "train", 0)
    assert all(e in big for e in small) and len(task.generate(999, "train", 0)) == 40
    assert get_task(str(tmp_path)) is get_task(str(tmp_path / "task.yaml"))  # folder or file, loaded once


@pytest.mark.parametrize("name", sorted(TASKS))
def test_builtin_tasks_exported_as_files_score_the_same(tmp_path, name):
    builtin = TASKS[name]
    loaded = load_task(write_task_file(builtin, tmp_path, 60, 20, seed=0))
    assert loaded.generate(20, "eval", 0) == builtin.generate(20, "eval", 0)
    refs = [e["messages"][-1]["content"] for e in builtin.generate(20, "eval", 0)]
    preds = refs[1:] + refs[:1] + ["nonsense", "[]", '{"verdict": "ok"}']
    for p in preds:
        for r in refs:
            assert loaded.score(p, r) == builtin.score(p, r)


# The built-in tasks' scorers before they became named scorers; the named ones must score exactly like them.
def old_contract(p: str, r: str) -> float:
    return float(normalize_label(p) == normalize_label(r))


def old_drugs(p: str, r: str) -> float:
    def pairs(xs: list) -> set:
        out: set = set()
        for i, pair in enumerate(xs):
            if isinstance(pair, list) and len(pair) == 2 and all(isinstance(d, str) for d in pair):
                out.add(frozenset(d.strip().lower() for d in pair))
            else:
                out.add(("malformed", i))
        return out

    pred = parse_json(p)
    return 0.0 if not isinstance(pred, list) else f1(pairs(pred), pairs(json.loads(r)))


def old_manifest(p: str, r: str) -> float:
    pred, ref = parse_json(p), json.loads(r)
    if not isinstance(pred, dict):
        return 0.0
    v = pred.get("verdict")
    ok = isinstance(v, str) and normalize_label(v) == ref["verdict"]
    reasons = pred.get("reasons")
    if not isinstance(reasons, list) or not all(isinstance(x, str) for x in reasons):
        return 0.5 * ok
    return 0.5 * ok + 0.5 * f1({normalize_label(x) for x in reasons}, set(ref["reasons"]))


PREDICTIONS = {
    "contract": ["termination", " Force Majeure.", "'warranty'", "non-compete", "payment terms", "indemnity", "", "x"],
    "drugs": ['[["simvastatin","clarithromycin"]]', '[["Warfarin", "fluconazole"]]', "[]", "none",
              '```json\n[["sertraline","tramadol"],["linezolid","sertraline"]]\n```', '[["a","b","c"]]',
              '[["sertraline","tramadol"]] and more', '{"pairs": []}'],
    "manifest": ['{"verdict":"ok","reasons":[]}', '{"verdict":"Discrepancy","reasons":["port_mismatch"]}',
                 '{"verdict":"discrepancy","reasons":["Seal Mismatch","weight_mismatch"]}', '{"verdict":"ok"}',
                 '{"reasons":["quantity_mismatch"],"verdict":"discrepancy","note":1}', "ok", "[]",
                 '{"verdict":"discrepancy","reasons":"port_mismatch"}'],
}  # fmt: skip
OLD = {"contract": old_contract, "drugs": old_drugs, "manifest": old_manifest}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_builtin_tasks_score_as_before(name):
    task = TASKS[name]
    refs = [e["messages"][-1]["content"] for e in task.generate(40, "eval", 3)]
    for pred in PREDICTIONS[name] + refs[:10]:
        for ref in refs:
            assert task.score(pred, ref) == pytest.approx(OLD[name](pred, ref)), (pred, ref)


# ---------------------------------------------------------------- bad input


def test_unknown_scorer_lists_the_valid_ones(tmp_path):
    with pytest.raises(Exception, match="valid scorers: exact, label, json, regex, number, f1, rouge_l"):
        load_task(write_task(tmp_path, tickets(20), tickets(5, 100), scorer="bleu"))


def test_a_reference_the_scorer_cannot_read_is_refused_with_file_and_line(tmp_path):
    evals = tickets(5, 100)
    evals[2] = chat("Ticket 3: printer on fire", "escalate")  # not one of the labels
    with pytest.raises(DataError, match=r"1 eval reference\(s\) the 'label' scorer cannot read, e.g. .*eval.jsonl:3"):
        load_task(write_task(tmp_path, tickets(20), evals))
    with pytest.raises(DataError, match=r"5 eval reference\(s\) the 'json' scorer cannot read"):
        load_task(write_task(tmp_path, tickets(20), tickets(5, 100), scorer="json"))


def test_identical_train_and_eval_are_refused_with_the_overlap_count(tmp_path):
    rows = tickets(20)
    with pytest.raises(DataError, match=r"20 of 20 eval inputs are \(nearly\) in the train split \(100.0%"):
        load_task(write_task(tmp_path, rows, rows))
    report = load_task(write_task(tmp_path, rows, rows), allow_overlap=True).report
    assert report.identical == 20 and "allowed by override" in report.warnings[-1]


def test_near_identical_inputs_are_found(tmp_path):
    text = "since the update yesterday the export to csv fails with a timeout after ten seconds on every report we try"
    train = tickets(4) + [chat(text, "bug")] + tickets(25, offset=5)
    near = chat(text.replace("yesterday", "today"), "bug")  # one word of 21 changed: Jaccard 20/22
    evals = tickets(9, offset=500) + [near]
    with pytest.raises(DataError, match=r"1 of 10 eval inputs .*eval.jsonl:10 ~ .*train.jsonl:5"):
        load_task(write_task(tmp_path, train, evals))
    ok = load_task(write_task(tmp_path, train, evals, checks={"max_overlap": 0.1})).report
    assert (ok.identical, ok.near) == (0, 1) and 0.8 < ok.overlap_examples[0]["similarity"] < 1


def test_empty_or_tiny_eval_split_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"eval.jsonl: no examples \(the file is empty"):
        load_task(write_task(tmp_path, tickets(20), []))
    with pytest.raises(DataError, match=r"the eval split has 3 example\(s\): the 3-shot baselines need at least 4"):
        load_task(write_task(tmp_path, tickets(20), tickets(3, 100)))
    assert load_task(write_task(tmp_path, tickets(20), tickets(3, 100), few_shot_k=2)).report.eval_n == 3


def test_every_malformed_line_is_reported_at_once(tmp_path):
    train = tickets(10) + ["{not json", json.dumps({"text": "no keys"}), json.dumps(chat("hi", "bug")), "[1]"]
    with pytest.raises(DataError) as e:
        load_task(write_task(tmp_path, train, tickets(5, 100)))
    msg = str(e.value)
    assert "3 bad line(s)" in msg and "train.jsonl:11: bad JSON" in msg and "train.jsonl:12: missing keys" in msg
    assert "train.jsonl:14: expected a JSON object" in msg


def test_eval_examples_must_be_one_input(tmp_path):
    multi = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "bug"},
                          {"role": "user", "content": "b"}, {"role": "assistant", "content": "bug"}]}  # fmt: skip
    with pytest.raises(DataError, match=r"eval.jsonl:6: an eval example is one input"):
        load_task(write_task(tmp_path, tickets(20), tickets(5, 100) + [multi]))


def test_task_file_fields_are_validated(tmp_path):
    with pytest.raises(Exception, match="few_shot_k"):
        load_task(write_task(tmp_path, tickets(20), tickets(5, 100), few_shot_k=-1))
    with pytest.raises(Exception, match="no_such_key"):
        load_task(write_task(tmp_path, tickets(20), tickets(5, 100), no_such_key=1))


# ---------------------------------------------------------------- the report


def test_report_shows_distribution_majority_baseline_and_size_warning(tmp_path):
    train = tickets(30) + [chat(f"Invoice question number {i} from shop s{i * 31}", "billing") for i in range(30)]
    report = load_task(write_task(tmp_path, train, tickets(9, 100))).report
    assert report.distribution["train"][0] == ("billing", 40) and report.distinct == {"train": 3, "eval": 3}
    # always answering the most common train label gets the share of eval items with that label
    assert report.majority == {"answer": "billing", "accuracy": pytest.approx(3 / 9), "score": pytest.approx(3 / 9)}
    assert any("rule of thumb is about 500" in w for w in report.warnings)
    assert "majority-class baseline (always 'billing')" in report.text()


def test_builtin_contract_overlap_is_reported_not_hidden():
    task = TASKS["contract"]
    report = check_task(task, *lines_of(task, 600, 200))
    assert report.identical + report.near > 0 and report.overlap_share <= task.checks.max_overlap
