"""lorafleet/core/scorers.py: a case table per scorer (partial credit, unreadable answers) and the errors."""

from __future__ import annotations

import pytest

from lorafleet.core.scorers import SCORERS, ScorerError, make_scorer

CASES = [
    # (scorer spec, prediction, reference, score)
    ("exact", "  Rotterdam ", "rotterdam", 1.0),
    ("exact", "Rotter dam", "Rotterdam", 0.0),
    ({"name": "exact", "case_sensitive": True}, "rotterdam", "Rotterdam", 0.0),
    ("exact", "New   York", "new york", 1.0),
    ({"name": "label", "labels": ["indemnity", "termination"]}, "Termination.", "termination", 1.0),
    ({"name": "label", "labels": ["indemnity", "termination"]}, "indemnity", "termination", 0.0),
    ({"name": "label", "labels": ["indemnity", "termination"]}, "force majeure", "force_majeure", 0.0),
    ("json", '{"b": 2, "a": 1}', '{"a":1,"b":2}', 1.0),
    ("json", '```json\n{"a": 1, "b": 3}\n```', '{"a": 1, "b": 2}', 0.5),
    ("json", '{"a": 1, "b": 2, "extra": 0}', '{"a": 1, "b": 2}', 1.0),  # every reference field right
    ("json", '{"a": 1', '{"a": 1}', 0.0),  # truncated: unparseable
    ("json", '{"items": [2, 1]}', '{"items": [1, 2]}', 0.0),
    ({"name": "json", "lists": "set"}, '{"items": [2, 1]}', '{"items": [1, 2]}', 1.0),
    ("json", "[1, 2]", '{"a": 1}', 0.0),
    ({"name": "regex", "pattern": r"total: (\d+)"}, "Total: 42 bags", "total: 42", 1.0),
    ({"name": "regex", "pattern": r"total: (\d+)"}, "no total here", "total: 42", 0.0),
    ("number", "It weighs 1,450 kg", "1450", 1.0),
    ("number", "1449", "1450", 0.0),
    ({"name": "number", "abs_tol": 1}, "1449", "1450", 1.0),
    ({"name": "number", "rel_tol": 0.01}, "3.14", "3.1416", 1.0),
    ("number", "none", "3", 0.0),
    ("f1", "aspirin, warfarin", "warfarin, aspirin", 1.0),
    ("f1", "aspirin, ibuprofen", "aspirin, warfarin", 0.5),
    ("f1", '["Aspirin", "warfarin", "x"]', "aspirin,warfarin", 0.8),
    ("f1", "", "", 1.0),
    ("rouge_l", "the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("rouge_l", "the cat sat", "the cat sat on the mat", pytest.approx(2 * 1.0 * 0.5 / 1.5)),
    ("rouge_l", "dogs bark", "the cat sat", 0.0),
]


@pytest.mark.parametrize("spec,prediction,reference,want", CASES)
def test_scorer_case_table(spec, prediction, reference, want):
    assert make_scorer(spec).score(prediction, reference) == want


def test_every_scorer_has_cases():
    named = {c[0] if isinstance(c[0], str) else c[0]["name"] for c in CASES}
    assert named == set(SCORERS)


def test_unknown_labels_and_unparseable_json_are_reported_apart():
    label = make_scorer({"name": "label", "labels": ["a", "b"]})
    assert label.unknown("c") and not label.unknown(" A. ")
    j = make_scorer("json")
    assert not j.parses("not json") and j.parses('{"a": 1} trailing words')


@pytest.mark.parametrize(
    "spec,reference,reads",
    [
        ("json", "plain text", False),
        ("json", '{"a": 1}', True),
        ({"name": "label", "labels": ["a"]}, "b", False),
        ("number", "n/a", False),
        ({"name": "regex", "pattern": r"id=(\d+)"}, "id=7", True),
        ("rouge_l", "anything", True),
    ],
)
def test_a_reference_the_scorer_cannot_read_is_detected(spec, reference, reads):
    assert make_scorer(spec).reads(reference) is reads


@pytest.mark.parametrize(
    "spec,message",
    [
        ("bleu", "unknown scorer 'bleu'; valid scorers: exact, label, json, regex, number, f1, rouge_l"),
        ({"name": "exact", "casefold": True}, "has no option 'casefold'; its options: case_sensitive, collapse"),
        ({"name": "json", "lists": "bag"}, "lists must be one of ordered, set; got 'bag'"),
        ({"name": "label"}, "needs labels"),
        ({"name": "regex", "pattern": "no group"}, "at least 1 group"),
        ({"name": "regex", "pattern": "(unclosed"}, "does not compile"),
        ({"name": "number", "abs_tol": "one"}, "abs_tol must be a float"),
    ],
)
def test_bad_specs_say_what_is_valid(spec, message):
    with pytest.raises(ScorerError, match=None) as e:
        make_scorer(spec)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "spec,prediction,reference,score",
    [
        # json, strings forgiven: case and spacing (casefold), also quotes and a final period (label)
        ({"name": "json", "strings": "casefold"}, '{"a": "Big  Cat"}', '{"a": "big cat"}', 1.0),
        ({"name": "json"}, '{"a": "Big Cat"}', '{"a": "big cat"}', 0.0),
        ({"name": "json", "strings": "label"}, '{"v": "Discrepancy."}', '{"v": "discrepancy"}', 1.0),
        # json, lists as sets: a partly right list field gets its F1 as credit
        ({"name": "json", "lists": "set"}, '{"v": "x", "r": ["a"]}', '{"v": "x", "r": ["a", "b"]}', (1 + 2 / 3) / 2),
        ({"name": "json", "lists": "ordered"}, '{"v": "x", "r": ["a"]}', '{"v": "x", "r": ["a", "b"]}', 0.5),
        # f1 over JSON lists: inner lists as sets, and format json scores a non-list answer 0
        ({"name": "f1", "inner": "set"}, '[["b", "a"]]', '[["a", "b"]]', 1.0),
        ({"name": "f1"}, '[["b", "a"]]', '[["a", "b"]]', 0.0),
        ({"name": "f1", "format": "json"}, "a, b", '["a", "b"]', 0.0),
        ({"name": "f1"}, "a, b", '["a", "b"]', 1.0),
        ({"name": "f1", "format": "json"}, "[]", "[]", 1.0),
    ],
)
def test_string_and_list_options(spec, prediction, reference, score):
    assert make_scorer(spec).score(prediction, reference) == pytest.approx(score)


def test_spec_round_trips_the_options_that_differ():
    s = make_scorer({"name": "json", "lists": "set"})
    assert s.spec() == {"name": "json", "lists": "set"} and make_scorer(s.spec()).opts == s.opts
    assert make_scorer("f1").reads("not a list")  # format auto reads a plain-text list
    assert make_scorer({"name": "f1", "format": "json"}).reads("a, b") is False
