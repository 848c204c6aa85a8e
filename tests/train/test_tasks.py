from __future__ import annotations

import collections
import json
import re
import statistics

import pytest

from lorafleet.cli import main
from lorafleet.core.tasks import Task
from train.data import load_jsonl
from train.tasks import TASKS, get_task
from train.tasks.drugs import DRUGS, INTERACTIONS, pairs_in
from train.tasks.manifest import PORTS, PRODUCTS, REASONS

NAMES = ["manifest", "contract", "drugs"]


def _users(task: Task, split: str, n: int = 200, seed: int = 0) -> list[str]:
    return [e["messages"][1]["content"] for e in task.generate(n, split, seed)]


def _answers(task: Task, split: str, n: int = 200, seed: int = 0) -> list[str]:
    return [e["messages"][2]["content"] for e in task.generate(n, split, seed)]


def test_registry():
    assert sorted(TASKS) == sorted(NAMES)
    assert get_task("drugs") is TASKS["drugs"]
    with pytest.raises(
        ValueError, match="unknown task 'nope': built-in tasks are manifest, contract, drugs; or give a task file"
    ):
        get_task("nope")


@pytest.mark.parametrize("name", NAMES)
def test_examples_are_system_user_assistant(name):
    task = get_task(name)
    for example in task.generate(30, "train", 0):
        assert [m["role"] for m in example["messages"]] == ["system", "user", "assistant"]
        assert example["messages"][0]["content"] == task.system_prompt
        assert all(m["content"].strip() for m in example["messages"])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("split", ["train", "eval"])
def test_generation_is_deterministic_per_seed(name, split):
    task = get_task(name)
    assert task.generate(25, split, 3) == task.generate(25, split, 3)
    assert task.generate(25, split, 3) != task.generate(25, split, 4)
    assert task.generate(10, split, 3) == task.generate(25, split, 3)[:10]  # a prefix, whatever n


@pytest.mark.parametrize("name", NAMES)
def test_any_n(name):
    task = get_task(name)
    assert task.generate(0, "train", 0) == []
    assert len(task.generate(1, "eval", 0)) == 1
    assert len(task.generate(777, "train", 1)) == 777


def test_unknown_split():
    with pytest.raises(ValueError, match="split must be one of"):
        get_task("contract").generate(3, "test", 0)


@pytest.mark.parametrize("name", NAMES)
def test_entity_pools_split_in_disjoint_halves(name):
    task = get_task(name)
    assert task.pools
    for kind, pool in task.pools.items():
        train, evals = task.pool(kind, "train"), task.pool(kind, "eval")
        assert len(set(pool)) == len(pool), f"{kind} has duplicates"
        assert len(train) >= 4 and len(evals) >= 4, kind
        assert not set(train) & set(evals), kind
        assert sorted(train + evals) == sorted(pool), kind


@pytest.mark.parametrize("name", NAMES)
def test_eval_texts_show_no_train_entity(name):
    task = get_task(name)
    train_texts, eval_texts = "\n".join(_users(task, "train")), "\n".join(_users(task, "eval"))
    for kind in task.pools:
        train_only, eval_only = task.pool(kind, "train"), task.pool(kind, "eval")
        assert [e for e in train_only if e in eval_texts] == [], kind
        assert [e for e in eval_only if e in train_texts] == [], kind
        assert any(e in eval_texts for e in eval_only), f"eval never uses its {kind}"


def _drugs_in(text: str) -> frozenset[str]:
    return frozenset(d for d in DRUGS if d in text.lower())


def test_drugs_splits_share_no_combination():
    task = get_task("drugs")
    train = {_drugs_in(t) for t in _users(task, "train", 400)}
    evals = {_drugs_in(t) for t in _users(task, "eval", 400)}
    assert not train & evals


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("split", ["train", "eval"])
def test_every_reference_scores_one_against_itself(name, split):
    task = get_task(name)
    for answer in _answers(task, split, 100):
        assert task.score(answer, answer) == 1.0
        assert task.correct(answer, answer)


M_OK = '{"verdict":"ok","reasons":[]}'
M_QS = '{"verdict":"discrepancy","reasons":["quantity_mismatch","seal_mismatch"]}'
D_TWO = '[["clarithromycin","simvastatin"],["amiodarone","warfarin"]]'

# (task, prediction, reference, expected score)
SCORE_CASES = [
    ("manifest", M_QS, M_QS, 1.0),
    ("manifest", '{ "reasons" : [ "seal_mismatch", "quantity_mismatch" ], "verdict" : "discrepancy" }', M_QS, 1.0),
    ("manifest", f"```json\n{M_QS}\n```", M_QS, 1.0),
    ("manifest", f" {M_OK}\n\nThe manifest matches.", M_OK, 1.0),
    ("manifest", '{"verdict":"Discrepancy","reasons":["Seal mismatch","quantity_mismatch"]}', M_QS, 1.0),
    ("manifest", '{"verdict":"discrepancy","reasons":["seal_mismatch"]}', M_QS, 0.5 + 0.5 * 2 / 3),
    ("manifest", '{"verdict":"discrepancy","reasons":["seal_mismatch","port_mismatch"]}', M_QS, 0.75),
    ("manifest", '{"verdict":"discrepancy"}', M_QS, 0.5),
    ("manifest", M_OK, M_QS, 0.0),
    ("manifest", M_QS, M_OK, 0.0),
    ("manifest", '{"verdict":"discrepancy","reasons":["quantity_mismatch"', M_QS, 0.0),
    ("manifest", "discrepancy: quantity_mismatch, seal_mismatch", M_QS, 0.0),
    ("manifest", '["quantity_mismatch","seal_mismatch"]', M_QS, 0.0),
    ("manifest", "", M_OK, 0.0),
    ("contract", "termination", "termination", 1.0),
    ("contract", "  Termination.\n", "termination", 1.0),
    ("contract", "Limitation of Liability", "limitation_of_liability", 1.0),
    ("contract", "`force-majeure`", "force_majeure", 1.0),
    ("contract", '"governing_law"', "governing_law", 1.0),
    ("contract", "warranty", "termination", 0.0),
    ("contract", "termination clause", "termination", 0.0),
    ("contract", "Label: termination", "termination", 0.0),
    ("contract", "", "termination", 0.0),
    ("drugs", D_TWO, D_TWO, 1.0),
    ("drugs", '[ ["warfarin", "amiodarone"], ["Simvastatin", "CLARITHROMYCIN"] ]', D_TWO, 1.0),
    ("drugs", '[["clarithromycin","simvastatin"]]', D_TWO, 2 / 3),
    ("drugs", '[["clarithromycin","simvastatin"],["amiodarone","warfarin"],["aspirin","warfarin"]]', D_TWO, 0.8),
    ("drugs", '[["clarithromycin","simvastatin"],["amiodarone"]]', '[["clarithromycin","simvastatin"]]', 2 / 3),
    ("drugs", "[]", "[]", 1.0),
    ("drugs", "[]", D_TWO, 0.0),
    ("drugs", D_TWO, "[]", 0.0),
    ("drugs", "none", "[]", 0.0),
    ("drugs", '{"pairs": []}', "[]", 0.0),
    ("drugs", '[["clarithromycin","simvastatin"]', '[["clarithromycin","simvastatin"]]', 0.0),
]


@pytest.mark.parametrize("name,prediction,reference,expected", SCORE_CASES)
def test_score(name, prediction, reference, expected):
    task = get_task(name)
    got = task.score(prediction, reference)
    assert got == pytest.approx(expected)
    assert 0.0 <= got <= 1.0
    assert task.correct(prediction, reference) == (expected == 1.0)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_answers_score_below_one(name):
    task = get_task(name)
    answers = _answers(task, "eval", 100)
    for answer, other in zip(answers, answers[1:], strict=False):
        if answer != other:
            assert task.score(other, answer) < 1.0


def test_accuracy_is_mean_of_correct():
    task = get_task("contract")
    assert task.accuracy(["termination", "Warranty.", "warranty"], ["termination", "warranty", "payment_terms"]) == (
        pytest.approx(2 / 3)
    )
    with pytest.raises(ValueError, match="as many predictions as references"):
        task.accuracy(["a"], ["a", "b"])


def test_contract_covers_at_least_eight_labels():
    labels = collections.Counter(_answers(get_task("contract"), "train", 300))
    assert len(labels) >= 8
    assert min(labels.values()) >= 10  # no label so rare it can't be learned


def _manifest_truth(text: str) -> list[str]:
    """Re-derive the reason codes from the report alone: the evidence each finding names must back its code."""

    def num(s: str) -> int:
        return int(s.replace(",", ""))

    manifest = re.search(r"Manifest: (.*?)\.(\n| \w)", text)[1]
    declared = {p: num(m[1]) for p in PRODUCTS if (m := re.search(rf"of {re.escape(p)} \(([\d,]+) kg\)", manifest))}
    assert declared, text
    reasons = set()
    if len({p for p in PORTS if re.search(rf"\b{p}\b", text)}) == 3:  # loading, discharge and another port
        reasons.add("port_mismatch")
    if len(set(re.findall(r"(?:SL-|ML-|CN|HS-|SEAL )\d{6}", text))) == 2:
        reasons.add("seal_mismatch")
    if {p for p in PRODUCTS if p in text} - set(declared):
        reasons.add("undeclared_item")
    counts = re.findall(r"(\d+) \w+ counted against (\d+) manifested|is (\d+) \w+, manifest (\d+)", text)
    if re.search(r"(short|over) by \d+", text) or any(a != b or c != d for a, b, c, d in counts):
        reasons.add("quantity_mismatch")
    weights = re.findall(r"weighed ([\d,]+) kg against ([\d,]+) kg declared", text)
    if re.search(r"kg (heavier|lighter) than manifested|off by \d+ kg", text) or any(
        num(a) != num(b) for a, b in weights
    ):
        reasons.add("weight_mismatch")
    for product, kg in re.findall(r"(\w[\w' ]+) weighed ([\d,]+) kg as declared", text):  # a format change only
        assert num(kg) == declared[product.strip()], text
    return sorted(reasons)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_manifest_answers_follow_from_the_text(split):
    task = get_task("manifest")
    seen = collections.Counter()
    for example in task.generate(300, split, 0):
        text, answer = example["messages"][1]["content"], json.loads(example["messages"][2]["content"])
        assert answer["reasons"] == _manifest_truth(text), text
        assert answer["verdict"] == ("discrepancy" if answer["reasons"] else "ok")
        assert len(answer["reasons"]) <= 2
        seen.update(answer["reasons"] or ["ok"])
    assert set(seen) == {*REASONS, "ok"}  # every kind occurs, and so do clean manifests


@pytest.mark.parametrize("split", ["train", "eval"])
def test_drugs_answers_follow_from_the_text(split):
    task = get_task("drugs")
    answers = collections.Counter()
    for example in task.generate(300, split, 0):
        text, answer = example["messages"][1]["content"], example["messages"][2]["content"]
        drugs = _drugs_in(text)
        assert 2 <= len(drugs) <= 5, text
        assert json.loads(answer) == pairs_in(sorted(drugs))
        answers[answer == "[]"] += 1
    assert answers[True] > 30 and answers[False] > 150  # both empty and non-empty answers are common


def test_drugs_train_split_shows_every_interaction_often():
    pairs = collections.Counter()
    for answer in _answers(get_task("drugs"), "train", 600):
        pairs.update(tuple(p) for p in json.loads(answer))
    assert {tuple(sorted(p)) for p in INTERACTIONS} == set(pairs)
    assert min(pairs.values()) >= 5


@pytest.mark.parametrize("name", NAMES)
def test_few_shot_messages(name):
    task = get_task(name)
    turns = task.few_shot_messages(3, seed=1)
    assert [m["role"] for m in turns] == ["user", "assistant"] * 3
    assert turns == task.few_shot_messages(3, seed=1)
    chat = task.few_shot_chat("INPUT", 2)
    assert chat[0] == {"role": "system", "content": task.system_prompt}
    assert chat[-1] == {"role": "user", "content": "INPUT"}
    assert len(chat) == 2 + 2 * 2
    assert task.few_shot_messages(0, seed=1) == []


@pytest.mark.parametrize("name", NAMES)
def test_few_shot_prompt_round_trips_its_answers(name):
    task = get_task(name)
    prompt = task.few_shot_prompt("THE INPUT", k=3)
    shots = task.generate(3, "train", 0)
    assert prompt.startswith(task.system_prompt + "\n\nInput: ")
    assert prompt.endswith("\n\nInput: THE INPUT\nOutput:")
    assert prompt.count("\nOutput:") == 4
    # What follows each "Output:" in the prompt is what a base model would continue with: it must extract back.
    for shot, tail in zip(shots, prompt.split("\nOutput:")[1:-1], strict=True):
        assert task.extract_answer(tail) == shot["messages"][2]["content"]


@pytest.mark.parametrize(
    "completion,expected",
    [
        (" termination\n\nInput: next clause", "termination"),
        (' {"verdict":"ok","reasons":[]}\nInput: more', '{"verdict":"ok","reasons":[]}'),
        ("\n[]\n\n", "[]"),
        ("warranty", "warranty"),
        ("  ", ""),
    ],
)
def test_extract_answer(completion, expected):
    assert Task.extract_answer(completion) == expected


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path))


@pytest.mark.slow  # importing transformers takes seconds
@pytest.mark.parametrize("name", NAMES)
def test_examples_fit_the_token_budget(smollm2_tokenizer, name):
    tok = smollm2_tokenizer
    examples = get_task(name).generate(100, "train", 0)
    full = [len(tok(tok.apply_chat_template(e["messages"], tokenize=False))["input_ids"]) for e in examples]
    answers = [len(tok(e["messages"][2]["content"])["input_ids"]) for e in examples]
    assert statistics.median(full) < 400
    assert max(answers) < 48


def test_cli_data_writes_three_files(tmp_path, capsys):
    out = tmp_path / "data"
    assert (
        main(["train", "data", "--task", "contract", "--n", "12", "--eval-n", "5", "--seed", "2", "--out", str(out)])
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "task.yaml", "train.jsonl"]
    task = get_task("contract")
    assert load_jsonl(out / "train.jsonl") == [e["messages"] for e in task.generate(12, "train", 2)]
    assert load_jsonl(out / "eval.jsonl") == [e["messages"] for e in task.generate(5, "eval", 2)]
    # The folder is a task file: the same examples, scorer and instruction as the built-in task.
    loaded = get_task(str(out))
    assert loaded.name == "contract" and loaded.generate(5, "eval", 0) == task.generate(5, "eval", 2)
    assert loaded.scorer.spec() == task.scorer.spec() and loaded.system_prompt == task.system_prompt
    printed = capsys.readouterr().out.strip().splitlines()
    assert "12 train + 5 eval" in printed[0] and printed[1].startswith(f"task file: {out / 'task.yaml'}")


@pytest.mark.parametrize(
    "args,error",
    [
        (["--task", "sentiment"], "unknown task 'sentiment': built-in tasks are manifest, contract, drugs"),
        (["--task", "drugs", "--n", "0"], "--n must be at least 1"),
        (["--task", "drugs", "--eval-n", "-1"], "--eval-n must be at least 1"),
    ],
)
def test_cli_data_errors(tmp_path, capsys, args, error):
    assert main(["train", "data", *args, "--out", str(tmp_path / "d")]) == 2
    assert error in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
