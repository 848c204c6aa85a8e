"""Checks on a task's data before anything trains: what would make its scores meaningless, said up front.

- train/eval overlap: identical or near-identical inputs (word-set Jaccard), counted, shown, refused above the
  task's `max_overlap` unless overridden: a model that saw the eval inputs proves nothing;
- the answer distribution of both splits and the majority-class baseline (the most common train answer given to
  every eval input), so a trivial baseline is visible beside the model's score;
- too few examples (the article's ~500 as a warning), an eval split too small for its k-shot baselines, and eval
  references the task's scorer cannot read (`file:line`).
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from train.data import DataError

MAX_PAIRS = 20_000_000  # beyond this many train x eval pairs only exact (normalised) duplicates are looked for
SHOWN = 5  # examples of a problem shown in a report


@dataclass
class Line:
    """One example and where it came from, so every later complaint can say `file:line`."""

    where: str
    messages: list[dict]

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"]

    @property
    def user(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


@dataclass
class DataReport:
    task: str
    train_n: int
    eval_n: int
    identical: int = 0  # eval inputs found verbatim in train
    near: int = 0  # eval inputs nearly identical to a train input (and not verbatim)
    overlap_examples: list[dict] = field(default_factory=list)
    distribution: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    distinct: dict[str, int] = field(default_factory=dict)
    majority: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def overlap_share(self) -> float:
        return (self.identical + self.near) / self.eval_n if self.eval_n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"overlap_share": self.overlap_share}

    def text(self) -> str:
        """The report as a user reads it in a terminal."""
        out = [f"task {self.task}: {self.train_n} train, {self.eval_n} eval examples"]
        out.append(f"  overlap: {self.identical} eval inputs identical to a train input, {self.near} near-identical "
                   f"({self.overlap_share:.1%} of eval)")  # fmt: skip
        out += [f"    {e['eval']} ~ {e['train']} ({e['similarity']:.2f}): {e['text'][:80]!r}" for e in
                self.overlap_examples]  # fmt: skip
        for split in ("train", "eval"):
            top = ", ".join(f"{a[:40]!r} {c}" for a, c in self.distribution.get(split, []))
            out.append(f"  {split} answers: {self.distinct.get(split, 0)} distinct; most common: {top}")
        if self.majority:
            out.append(f"  majority-class baseline (always {self.majority['answer'][:40]!r}): accuracy "
                       f"{self.majority['accuracy']:.1%}, mean score {self.majority['score']:.3f}")  # fmt: skip
        out += [f"  warning: {w}" for w in self.warnings] + [f"  error: {e}" for e in self.errors]
        return "\n".join(out)


def words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"\w+", text.lower()))


def overlap(train: list[Line], evals: list[Line], threshold: float) -> tuple[int, int, list[dict]]:
    """(identical, near-identical, a few examples) among the eval inputs, against every train input."""
    verbatim = {line.user: line.where for line in train}
    normal = {" ".join(sorted(words(line.user))): line.where for line in train}
    by_size = sorted(((len(w), w, line.where) for line in train if (w := words(line.user))), key=lambda t: t[0])
    sizes = [s for s, _, _ in by_size]
    compare = len(train) * len(evals) <= MAX_PAIRS
    identical, near, shown = 0, 0, []
    for line in evals:
        w = words(line.user)
        if line.user in verbatim:
            identical += 1
            match, sim = verbatim[line.user], 1.0
        elif (key := " ".join(sorted(w))) in normal:
            near += 1
            match, sim = normal[key], 1.0
        elif compare and w and (found := _most_similar(w, by_size, sizes, threshold)):
            near += 1
            sim, match = found
        else:
            continue
        if len(shown) < SHOWN:
            shown.append({"eval": line.where, "train": match, "similarity": round(sim, 3), "text": line.user})
    return identical, near, shown


def _most_similar(w: frozenset, by_size: list, sizes: list[int], threshold: float) -> tuple[float, str] | None:
    # Jaccard >= t needs t * |A| <= |B| <= |A| / t: only train inputs of such sizes can match.
    lo = bisect.bisect_left(sizes, threshold * len(w))
    hi = bisect.bisect_right(sizes, len(w) / threshold)
    best = None
    for _, other, where in by_size[lo:hi]:
        sim = len(w & other) / len(w | other)
        if sim >= threshold and (best is None or sim > best[0]):
            best = (sim, where)
    return best


def lines_of(task, n: int, eval_n: int, seed: int = 0) -> tuple[list[Line], list[Line]]:
    """The examples of any task as checkable lines (a built-in task's are named `task:split[i]`)."""
    return tuple(
        [Line(f"{task.name}:{split}[{i}]", ex["messages"]) for i, ex in enumerate(task.generate(size, split, seed))]
        for split, size in (("train", n), ("eval", eval_n))
    )


def check_task(task, train: list[Line], evals: list[Line], allow_overlap: bool = False) -> DataReport:
    """Check a task's train and eval examples; raises DataError listing every error, else returns the report."""
    checks, k = task.checks, task.few_shot_k
    report = DataReport(task.name, len(train), len(evals))
    report.identical, report.near, report.overlap_examples = overlap(train, evals, checks.near_similarity)
    _distribution(task, report, train, evals)
    if len(train) < checks.min_train:
        report.warnings.append(f"{len(train)} train examples: the article's rule of thumb is about {checks.min_train}"
                               " or more; expect a weaker specialist")  # fmt: skip
    if len(evals) < 30:
        report.warnings.append(f"only {len(evals)} eval examples: the accuracy interval will be wide")
    if len(evals) < k + 1:
        report.errors.append(f"the eval split has {len(evals)} example(s): the {k}-shot baselines need at least "
                             f"{k + 1} (lower few_shot_k or add eval examples)")  # fmt: skip
    if len(train) < k:
        report.errors.append(f"the train split has {len(train)} example(s): {k}-shot prompts need {k}")
    unreadable = [line.where for line in evals if not task.scorer.reads(line.answer)]
    if unreadable:
        report.errors.append(f"{len(unreadable)} eval reference(s) the {task.scorer.name!r} scorer cannot read, e.g. "
                             + ", ".join(unreadable[:SHOWN]))  # fmt: skip
    bad_train = [line.where for line in train if not task.scorer.reads(line.answer)]
    if bad_train:
        report.warnings.append(f"{len(bad_train)} train answer(s) the {task.scorer.name!r} scorer cannot read, e.g. "
                               + ", ".join(bad_train[:SHOWN]))  # fmt: skip
    if report.overlap_share > checks.max_overlap:
        what = (f"{report.identical + report.near} of {len(evals)} eval inputs are (nearly) in the train split "
                f"({report.overlap_share:.1%}, allowed {checks.max_overlap:.1%}), e.g. "
                + ", ".join(f"{e['eval']} ~ {e['train']}" for e in report.overlap_examples[:3]))  # fmt: skip
        if allow_overlap:
            report.warnings.append(what + " (allowed by override)")
        else:
            report.errors.append(what + "; remove them, raise checks.max_overlap, or pass --allow-overlap")
    if report.errors:
        raise DataError(
            f"task {task.name} ({getattr(task, 'path', 'built in')}) cannot be used:\n  " + "\n  ".join(report.errors)
        )
    return report


def _distribution(task, report: DataReport, train: list[Line], evals: list[Line]) -> None:
    counts = {"train": Counter(x.answer.strip() for x in train), "eval": Counter(x.answer.strip() for x in evals)}
    for split, c in counts.items():
        report.distribution[split] = c.most_common(SHOWN)
        report.distinct[split] = len(c)
    if not train or not evals:
        return
    answer = counts["train"].most_common(1)[0][0]
    scores = [task.scorer.score(answer, line.answer) for line in evals]
    report.majority = {"answer": answer, "accuracy": sum(s == 1.0 for s in scores) / len(scores),
                       "score": sum(scores) / len(scores)}  # fmt: skip
