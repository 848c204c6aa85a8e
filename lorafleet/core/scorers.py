"""Scorers a tenant picks by name for its own task: `{"name": "json", "lists": "set"}` and the like.

Each scores one prediction against one reference in [0, 1], with partial credit where it makes sense, and says
whether it can read a reference at all (checked before a run, so a `json` scorer over plain-text answers is
refused up front, not scored 0 everywhere). `make_scorer` validates the name and options at the edge and lists
the valid ones on a mistake.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, ClassVar

import regex

from lorafleet.core.errors import UserError

# A tenant's pattern runs on the tenant's texts: the `regex` engine stops a match that runs longer than this (and
# releases the GIL while it runs), so a catastrophic pattern fails its job instead of freezing the process
# (tests/serve/test_attacks.py).
REGEX_TIMEOUT_S = 1.0

NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def normalize_label(text: str) -> str:
    """'  Limitation of Liability.' -> 'limitation_of_liability': case, spacing, quotes and a final period don't count."""
    text = text.strip().strip("`'\"").strip().rstrip(".").strip().lower()
    return re.sub(r"[\s\-]+", "_", text)


def parse_json(text: str) -> Any | None:
    """The JSON value a prediction starts with, or None if it is not valid JSON.

    A ```json fence and text after a complete value are tolerated: chat models add both, and the value itself
    is what we score. A truncated or malformed value is not.
    """
    text = text.strip()
    fence = re.match(r"^```[a-zA-Z]*\s*(.*?)\s*(```|$)", text, re.DOTALL)
    if fence:
        text = fence.group(1)
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return None
    return value


def f1(predicted: set, reference: set) -> float:
    """Set F1; two empty sets agree perfectly."""
    if not predicted and not reference:
        return 1.0
    hits = len(predicted & reference)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(predicted), hits / len(reference)
    return 2 * precision * recall / (precision + recall)


STRINGS = {"exact": lambda s: s, "casefold": lambda s: " ".join(s.split()).lower(), "label": normalize_label}


def _choice(scorer: str, key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ScorerError(f"scorer {scorer!r}: {key} must be one of {', '.join(valid)}; got {value!r}")


class ScorerError(UserError, ValueError):
    """An unknown scorer or option, or a reference the scorer cannot read; the message lists what is valid."""


class Scorer:
    """Subclasses set `name` and `options` (option -> default) and implement `score`."""

    name: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any):
        for key, value in options.items():
            if key not in self.options:
                valid = ", ".join(sorted(self.options)) or "none"
                raise ScorerError(f"scorer {self.name!r} has no option {key!r}; its options: {valid}")
            default = self.options[key]
            if default is not None and not isinstance(value, type(default)):
                raise ScorerError(f"scorer {self.name!r}: {key} must be a {type(default).__name__}, got {value!r}")
        self.opts = {**self.options, **options}

    def score(self, prediction: str, reference: str) -> float:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """The name and the options that differ from their defaults: what a task file would say."""
        return {"name": self.name, **{k: v for k, v in self.opts.items() if v != self.options[k]}}

    def reads(self, reference: str) -> bool:
        """Whether a reference answer is one this scorer can score against."""
        return True


class Exact(Scorer):
    """1 if the texts are equal, spacing (and by default case) aside."""

    name = "exact"
    options = {"case_sensitive": False, "collapse_whitespace": True}

    def norm(self, text: str) -> str:
        text = " ".join(text.split()) if self.opts["collapse_whitespace"] else text.strip()
        return text if self.opts["case_sensitive"] else text.lower()

    def score(self, prediction: str, reference: str) -> float:
        return float(self.norm(prediction) == self.norm(reference))


class Label(Scorer):
    """1 if the predicted label is the reference; a label outside `labels` is wrong (and `unknown` says so)."""

    name = "label"
    options = {"labels": None}

    def __init__(self, **options: Any):
        super().__init__(**options)
        labels = self.opts["labels"]
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise ScorerError("scorer 'label' needs labels: a non-empty list of the valid labels")
        self.labels = {normalize_label(x) for x in labels}

    def unknown(self, prediction: str) -> bool:
        return normalize_label(prediction) not in self.labels

    def score(self, prediction: str, reference: str) -> float:
        return float(not self.unknown(prediction) and normalize_label(prediction) == normalize_label(reference))

    def reads(self, reference: str) -> bool:
        return normalize_label(reference) in self.labels


class Json(Scorer):
    """The first JSON value of the answer: 1 if it equals the reference (key order and spacing aside), else the mean
    credit of the reference's fields (objects). `lists: set` compares lists as sets, with F1 credit for a partly
    right list field; `strings: casefold | label` forgives case and spacing (label: also quotes, a final period)."""

    name = "json"
    options = {"lists": "ordered", "strings": "exact"}

    def __init__(self, **options: Any):
        super().__init__(**options)
        _choice("json", "lists", self.opts["lists"], ("ordered", "set"))
        _choice("json", "strings", self.opts["strings"], tuple(STRINGS))
        self.norm = STRINGS[self.opts["strings"]]

    def canon(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self.canon(v) for k, v in value.items()}
        if isinstance(value, list):
            items = [self.canon(v) for v in value]
            return sorted(items, key=repr) if self.opts["lists"] == "set" else items
        return self.norm(value) if isinstance(value, str) else value

    def parses(self, prediction: str) -> bool:
        return parse_json(prediction) is not None

    def field(self, got: Any, want: Any) -> float:
        if got == want:
            return 1.0
        if self.opts["lists"] == "set" and isinstance(got, list) and isinstance(want, list):
            return f1({repr(v) for v in got}, {repr(v) for v in want})
        return 0.0

    def score(self, prediction: str, reference: str) -> float:
        got, want = parse_json(prediction), parse_json(reference)
        if got is None:
            return 0.0
        got, want = self.canon(got), self.canon(want)
        if got == want:
            return 1.0
        if isinstance(want, dict) and isinstance(got, dict) and want:
            return sum(self.field(got.get(k), v) for k, v in want.items()) / len(want)
        return 0.0

    def reads(self, reference: str) -> bool:
        return parse_json(reference) is not None


class Regex(Scorer):
    """Extract a group with `pattern` from both texts, then compare exactly (case aside unless asked)."""

    name = "regex"
    options = {"pattern": None, "group": 1, "case_sensitive": False}

    def __init__(self, **options: Any):
        super().__init__(**options)
        if not isinstance(self.opts["pattern"] or "", str):
            raise ScorerError(f"scorer 'regex': pattern must be a string, got {type(self.opts['pattern']).__name__}")
        try:
            self.rx = regex.compile(self.opts["pattern"] or "", 0 if self.opts["case_sensitive"] else regex.IGNORECASE)
        except (regex.error, RecursionError, OverflowError) as e:
            raise ScorerError(f"scorer 'regex': pattern does not compile: {str(e)[:200]}") from None
        if not self.opts["pattern"] or self.rx.groups < self.opts["group"]:
            raise ScorerError(f"scorer 'regex' needs a pattern with at least {self.opts['group']} group(s)")

    def extract(self, text: str) -> str | None:
        try:
            m = self.rx.search(text, timeout=REGEX_TIMEOUT_S)
        except TimeoutError:
            raise ScorerError(f"scorer 'regex': pattern {self.opts['pattern'][:200]!r} ran over {REGEX_TIMEOUT_S:g} s on "
                              "one answer (nested repeats backtrack without end); simplify it") from None  # fmt: skip
        if m is None:
            return None
        found = m.group(self.opts["group"])
        return found if self.opts["case_sensitive"] else found.lower()

    def score(self, prediction: str, reference: str) -> float:
        got = self.extract(prediction)
        return float(got is not None and got == self.extract(reference))

    def reads(self, reference: str) -> bool:
        return self.extract(reference) is not None


class Number(Scorer):
    """The first number of each text, equal within `abs_tol` or `rel_tol` (thousands separators allowed)."""

    name = "number"
    options = {"abs_tol": 0.0, "rel_tol": 0.0}

    def __init__(self, **options: Any):
        options = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in options.items()}
        super().__init__(**options)

    @staticmethod
    def first(text: str) -> float | None:
        m = NUMBER.search(text)
        try:
            return float(m.group().replace(",", "")) if m else None
        except ValueError:
            return None

    def score(self, prediction: str, reference: str) -> float:
        got, want = self.first(prediction), self.first(reference)
        if got is None or want is None:
            return 0.0
        return float(math.isclose(got, want, rel_tol=self.opts["rel_tol"], abs_tol=self.opts["abs_tol"]))

    def reads(self, reference: str) -> bool:
        return self.first(reference) is not None


class ItemF1(Scorer):
    """F1 over the items of list answers: a JSON list, or the text split at `separator` (`format: json` scores an
    answer that is not a JSON list 0). `inner: set` ignores the order inside list items (pairs, triples)."""

    name = "f1"
    options = {"separator": ",", "case_sensitive": False, "format": "auto", "inner": "ordered"}

    def __init__(self, **options: Any):
        super().__init__(**options)
        _choice("f1", "format", self.opts["format"], ("auto", "json"))
        _choice("f1", "inner", self.opts["inner"], ("ordered", "set"))

    def text(self, value: Any) -> str:
        out = " ".join(str(value).split())
        return out if self.opts["case_sensitive"] else out.lower()

    def item(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            parts = tuple(self.item(v) for v in value)
            return tuple(sorted(parts, key=repr)) if self.opts["inner"] == "set" else parts
        return json.dumps(value, sort_keys=True)

    def items(self, text: str) -> set | None:
        """The answer's items; None when `format: json` and the answer is not a JSON list."""
        value = parse_json(text)
        if isinstance(value, list):
            return {self.item(v) for v in value} - {""}
        if self.opts["format"] == "json":
            return None
        return {self.text(p) for p in text.split(self.opts["separator"])} - {""}

    def score(self, prediction: str, reference: str) -> float:
        got, want = self.items(prediction), self.items(reference)
        return 0.0 if got is None or want is None else f1(got, want)

    def reads(self, reference: str) -> bool:
        return self.items(reference) is not None


class RougeL(Scorer):
    """ROUGE-L F-measure over lower-cased word tokens: the longest common subsequence (free-text answers)."""

    name = "rouge_l"

    @staticmethod
    def tokens(text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())

    def score(self, prediction: str, reference: str) -> float:
        p, r = self.tokens(prediction), self.tokens(reference)
        if not p or not r:
            return float(p == r)
        prev = [0] * (len(r) + 1)
        for a in p:  # LCS by dynamic programming, one row at a time
            row = [0]
            for j, b in enumerate(r):
                row.append(prev[j] + 1 if a == b else max(prev[j + 1], row[j]))
            prev = row
        lcs = prev[-1]
        if lcs == 0:
            return 0.0
        precision, recall = lcs / len(p), lcs / len(r)
        return 2 * precision * recall / (precision + recall)


SCORERS: dict[str, type[Scorer]] = {s.name: s for s in (Exact, Label, Json, Regex, Number, ItemF1, RougeL)}


def make_scorer(spec: str | dict) -> Scorer:
    """A scorer from its name, or from {"name": ..., **options}."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str) or name not in SCORERS:
        raise ScorerError(f"unknown scorer {name!r}; valid scorers: {', '.join(SCORERS)}")
    return SCORERS[name](**spec)
