"""What a tenant can act on beside one accuracy figure: per-field accuracy and confusion, the majority baseline,
and a plain warning when a model's predictions collapse onto one answer.

    d = diagnose(predictions, references)
    d.warnings   # ["verdict: predicts `approve` for 100 % of inputs; 26 % of references are `reject`"]
    print(d.text())

A JSON answer is split into its top-level fields (a list field counts as a set, and each of its items gets recall
and precision); any other answer is one field, `answer`. A field is categorical, and gets a confusion table, when its
references take at most MAX_CLASSES values. Every field gets the collapse check, and a list field's common items a
check that the model predicts them at all ("flags: never predicts `over_limit`; 21% of references have it").
The same code serves the training report (train.trainer) and the proof report (lorafleet.demo), so both say the
same thing about the same predictions.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lorafleet.core.scorers import parse_json

MAX_CLASSES = 12  # more distinct reference values than this: a free-text field, no confusion table
COLLAPSE_SHARE = 0.95  # one prediction value this common, where the references are not: collapsed
MIN_N = 10  # below this many answers a share says nothing
ITEM_SHARE = 0.1  # a list item in this share of the references, never predicted: the model has not learned it
NOT_JSON = "<not JSON>"
MISSING = "<missing>"


def fields_of(answer: str) -> dict[str, str]:
    """An answer's comparable parts: {field: canonical value}. Lists become sorted JSON lists (sets)."""
    value = parse_json(answer)
    if not isinstance(value, dict):
        return {"answer": " ".join(answer.split()).lower()}
    out = {}
    for key, v in value.items():
        if isinstance(v, list):
            v = sorted(json.dumps(x, sort_keys=True) if not isinstance(x, str) else x for x in v)
        out[str(key)] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return out


def _items(value: str) -> set[str]:
    """The items of a JSON-list answer or field, as strings: items that are lists or objects (a whole answer such as
    `[["aspirin", "100 mg"]]`) as canonical JSON, so that they can be counted."""
    parsed = parse_json(value) if value.startswith("[") else None
    if not isinstance(parsed, list):
        return set()
    return {x if isinstance(x, str) else json.dumps(x, sort_keys=True) for x in parsed}


@dataclass
class FieldReport:
    name: str
    accuracy: float
    majority: str  # the most common reference value
    majority_share: float
    top_prediction: str
    top_prediction_share: float
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)  # reference -> prediction -> count
    items: dict[str, dict[str, float]] = field(default_factory=dict)  # list fields: item -> support/recall/precision


@dataclass
class Diagnosis:
    n: int
    majority_answer: str
    majority_share: float  # the majority baseline: always answering the most common reference
    fields: list[FieldReport]
    warnings: list[str]  # collapses first, then common list items never predicted
    collapsed: bool = False  # the whole answer or a field answers (nearly) one thing for every input

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def text(self) -> str:
        lines = [f"majority baseline {self.majority_share:.1%} on {self.n} (always {_short(self.majority_answer)})"]
        for f in self.fields:
            lines.append(f"  {f.name}: accuracy {f.accuracy:.1%} (majority `{_short(f.majority)}` "
                         f"{f.majority_share:.1%})")  # fmt: skip
            for ref, preds in f.confusion.items():
                row = ", ".join(f"{_short(p)} {c}" for p, c in sorted(preds.items(), key=lambda kv: -kv[1]))
                lines.append(f"    reference {_short(ref)} -> {row}")
            for item, s in f.items.items():
                lines.append(f"    {item}: {s['support']:.0f} refs, recall {s['recall']:.0%}, "
                             f"precision {s['precision']:.0%}")  # fmt: skip
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def diagnose(predictions: list[str], references: list[str]) -> Diagnosis:
    """Per-field accuracy, confusion, majority baseline and collapse warnings of predictions against references."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"need as many predictions as references (>0), got {len(predictions)}, {len(references)}")
    ref_fields = [fields_of(r) for r in references]
    pred_fields = [_prediction_fields(p, r) for p, r in zip(predictions, ref_fields, strict=True)]
    names = list(dict.fromkeys(k for f in ref_fields for k in f))
    reports, collapses, missed = [], [], []
    for name in names:
        preds, refs = [p.get(name, MISSING) for p in pred_fields], [r.get(name, MISSING) for r in ref_fields]
        reports.append(_field(name, preds, refs))
        if w := _collapse(name, preds, refs):
            collapses.append(w)
        else:  # a collapsed field's missing items go without saying
            missed += _never_predicted(reports[-1], preds, len(refs))
    whole_refs = [json.dumps(r, sort_keys=True) for r in ref_fields]
    whole_preds = [json.dumps(p, sort_keys=True) for p in pred_fields]
    answer, share = Counter(references).most_common(1)[0]
    raw = dict(zip(whole_refs, references, strict=True)) | dict(zip(whole_preds, predictions, strict=True))
    if len(names) > 1 and (w := _collapse("", whole_preds, whole_refs, raw)):
        collapses.insert(0, w)
    return Diagnosis(len(references), answer, share / len(references), reports, collapses + missed, bool(collapses))


def _prediction_fields(prediction: str, reference: dict[str, str]) -> dict[str, str]:
    got = fields_of(prediction)
    if "answer" not in reference and "answer" in got and parse_json(prediction) is None:
        return {k: NOT_JSON for k in reference}  # a JSON task answered with text: every field is wrong
    return got


def _field(name: str, preds: list[str], refs: list[str]) -> FieldReport:
    n = len(refs)
    majority, m_count = Counter(refs).most_common(1)[0]
    top, t_count = Counter(preds).most_common(1)[0]
    report = FieldReport(name, sum(p == r for p, r in zip(preds, refs, strict=True)) / n, majority, m_count / n,
                         top, t_count / n)  # fmt: skip
    if len(set(refs)) <= MAX_CLASSES:
        for p, r in zip(preds, refs, strict=True):
            row = report.confusion.setdefault(r, {})
            row[p] = row.get(p, 0) + 1
    ref_items, pred_items = [_items(r) for r in refs], [_items(p) for p in preds]
    for item in sorted(set().union(*ref_items)):
        support = sum(item in r for r in ref_items)
        hits = sum(item in r and item in p for r, p in zip(ref_items, pred_items, strict=True))
        predicted = sum(item in p for p in pred_items)
        report.items[item] = {"support": support, "recall": hits / support,
                              "precision": hits / predicted if predicted else 0.0}  # fmt: skip
    return report


def _collapse(name: str, preds: list[str], refs: list[str], display: dict[str, str] | None = None) -> str | None:
    """ "predicts `X` for 100 % of inputs; 26 % of references are `Y`" when one prediction dominates and the
    references do not; None otherwise."""
    n = len(refs)
    if n < MIN_N:
        return None
    top, count = Counter(preds).most_common(1)[0]
    if count / n < COLLAPSE_SHARE or refs.count(top) / n >= COLLAPSE_SHARE:
        return None
    others = Counter(r for r in refs if r != top)
    other, o_count = others.most_common(1)[0]
    show = display or {}
    where = f"{name}: " if name not in ("", "answer") else ""
    return (f"{where}predicts `{_short(show.get(top, top), 60)}` for {count / n:.0%} of inputs; {o_count / n:.0%} "
            f"of references are `{_short(show.get(other, other), 60)}`")  # fmt: skip


def _never_predicted(field: FieldReport, preds: list[str], n: int) -> list[str]:
    """The common items of a list field that the model never predicts: a collapse inside the set that the field's
    own check misses while the other items are right (on examples/expenses, over_limit: 0 of 42 references)."""
    if n < MIN_N:
        return []
    predicted = set().union(*(_items(p) for p in preds))
    where = f"{field.name}: " if field.name != "answer" else ""
    return [f"{where}never predicts `{_short(item, 60)}`; {s['support'] / n:.0%} of references have it"
            for item, s in field.items.items() if s["support"] / n >= ITEM_SHARE and item not in predicted]  # fmt: skip
