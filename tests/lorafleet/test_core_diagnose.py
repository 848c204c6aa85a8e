"""lorafleet/core/diagnose.py: per-field accuracy and confusion, the majority baseline, and the collapse warning."""

from __future__ import annotations

import json

import pytest

from lorafleet.core.diagnose import MAX_CLASSES, diagnose, fields_of


def verdict(v: str, flags: list[str]) -> str:
    return json.dumps({"verdict": v, "flags": flags})


APPROVE, LATE = verdict("approve", []), verdict("reject", ["late"])


def test_a_run_collapsed_onto_the_majority_verdict_is_named_in_plain_words():
    refs = [APPROVE] * 74 + [LATE] * 26
    d = diagnose([APPROVE] * 100, refs)
    assert d.majority_share == 0.74 and d.majority_answer == APPROVE
    assert f"predicts `{APPROVE}` for 100% of inputs; 26% of references are `{LATE}`" in d.warnings
    assert "verdict: predicts `approve` for 100% of inputs; 26% of references are `reject`" in d.warnings
    field = {f.name: f for f in d.fields}["verdict"]
    assert field.accuracy == 0.74 and field.confusion == {"approve": {"approve": 74}, "reject": {"approve": 26}}
    assert "WARNING: verdict: predicts `approve`" in d.text()


def test_a_model_that_predicts_both_classes_gets_no_warning_and_per_item_recall():
    refs = [APPROVE] * 74 + [LATE] * 26
    preds = [APPROVE] * 70 + [LATE] * 4 + [LATE] * 20 + [APPROVE] * 6
    d = diagnose(preds, refs)
    assert d.warnings == []
    flags = {f.name: f for f in d.fields}["flags"]
    assert flags.items["late"] == {
        "support": 26,
        "recall": pytest.approx(20 / 26),
        "precision": pytest.approx(20 / 24),
    }
    assert {f.name: f.accuracy for f in d.fields} == {"verdict": 0.9, "flags": 0.9}


def test_a_plain_label_task_collapses_without_a_field_prefix():
    d = diagnose(["billing"] * 20, ["billing"] * 14 + ["bug_report"] * 6)
    assert d.warnings == ["predicts `billing` for 100% of inputs; 30% of references are `bug_report`"]


def test_no_warning_when_the_references_are_themselves_one_answer_or_too_few():
    assert diagnose(["a"] * 20, ["a"] * 20).warnings == []
    assert diagnose(["a"] * 5, ["a"] * 3 + ["b"] * 2).warnings == []  # 5 answers say nothing


def test_text_answers_to_a_json_task_count_as_wrong_in_every_field():
    d = diagnose(["sure, approved!"] * 10, [APPROVE] * 5 + [LATE] * 5)
    assert {f.name: f.accuracy for f in d.fields} == {"verdict": 0.0, "flags": 0.0}
    assert {f.name: f.top_prediction for f in d.fields} == {"verdict": "<not JSON>", "flags": "<not JSON>"}


def test_list_fields_compare_as_sets_and_text_answers_ignore_case_and_spacing():
    assert fields_of('{"flags": ["b", "a"]}') == fields_of('{"flags": ["a", "b"]}')
    assert fields_of("  Billing ") == fields_of("billing")


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="as many predictions"):
        diagnose(["a"], ["a", "b"])


def test_answers_that_are_lists_of_lists_or_objects_are_diagnosed_not_crashed_on():
    """`make demo`'s report died on `unhashable type: 'list'`: a whole answer that is a JSON list of lists."""
    refs = [json.dumps([["aspirin", "100 mg"], ["ibuprofen", f"{i} mg"]]) for i in range(12)]
    preds = [json.dumps([["aspirin", "100 mg"]])] * 12
    d = diagnose(preds, refs)
    items = d.fields[0].items
    assert items[json.dumps(["aspirin", "100 mg"])]["recall"] == 1.0
    assert items[json.dumps(["ibuprofen", "3 mg"])] == {"support": 1, "recall": 0.0, "precision": 0.0}
    objects = [json.dumps([{"drug": "aspirin"}])] * 12
    assert diagnose(objects, objects).fields[0].accuracy == 1.0


def test_a_list_field_with_many_distinct_sets_still_warns_when_it_collapses():
    """n=200 of examples/expenses: 13+ distinct flag sets; a model answering `[]` every time went unnamed."""
    flags = ["a", "b", "c", "d", "e", "f"]  # 15 pairs and `[]`: more than MAX_CLASSES
    refs = [verdict("approve", [])] * 70 + [verdict("reject", [x, y]) for x in flags for y in flags if x < y] * 2
    d = diagnose([verdict("approve", [])] * 100, refs)
    assert len(set(refs)) > MAX_CLASSES
    assert any(w.startswith("flags: predicts `[]` for 100% of inputs") for w in d.warnings)
    assert not any("never predicts" in w for w in d.warnings)  # the field's collapse already says it
    assert d.collapsed


def test_a_common_item_the_model_never_predicts_is_named_when_the_others_are_right():
    refs = [verdict("reject", ["over_limit"])] * 21 + [verdict("reject", ["late"])] * 30 + [APPROVE] * 44
    refs += [verdict("reject", ["alcohol"])] * 5  # 5 %: too rare to name
    preds = [APPROVE] * 21 + [verdict("reject", ["late"])] * 30 + [APPROVE] * 49
    d = diagnose(preds, refs)
    assert d.warnings == ["flags: never predicts `over_limit`; 21% of references have it"]
    assert not d.collapsed  # named, but not a collapse: the trainer's patience counts as usual
    once = preds[:20] + [verdict("reject", ["over_limit"])] + preds[21:]  # predicted once: learned a little
    assert diagnose(once, refs).warnings == []
