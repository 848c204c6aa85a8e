"""Training data as token ids: conversations from a task or JSONL, the chat template, labels only on the answer,
length-grouped micro-batches."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from train.config import TrainConfig, TrainError
from train.data import load_jsonl, split_prompt, to_conversation
from train.tasks import get_task

IGNORE = -100
MIN_TRAIN_PER_HELD = 5  # at most a fifth of the training examples is held out for the score
HOLD_OUT_STREAM = 7  # an RNG stream of its own: the held-out set does not move when batching changes
MEGA_BATCH = 32  # micro-batches per length-sorted group: enough to cut padding, still shuffled across groups


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE except on the answer + end-of-turn tokens
    group: str = ""  # the answer's class for `balance` (its field's value, or the whole answer)
    weights: list[float] | None = None  # per-position loss weights (`informative_weight`); None = all 1


@dataclass
class Dataset:
    train: list[Example]
    eval: list[Example]
    report: dict[str, Any]
    validation: list[list[dict]] = field(default_factory=list)  # held-out train conversations for the score
    validation_ex: list[Example] = field(default_factory=list)  # the same, as tokens: their loss beside the score


def hold_out(train: list, cfg: TrainConfig) -> tuple[list, list]:
    """(train, validation): `score_n` train conversations set aside for the score when score_every or auto is on.
    Taken from the train split, never the eval split: the eval split stays the untouched final judge."""
    if not (cfg.score_every or cfg.auto):
        return train, []
    n = min(cfg.score_n, len(train) // MIN_TRAIN_PER_HELD)  # small data keeps most of itself for training
    if n < 1:
        raise TrainError(f"scoring during training holds out 1 of every {MIN_TRAIN_PER_HELD} training examples; "
                         f"{len(train)} is too few: give more data or turn off score_every/auto")  # fmt: skip
    order = np.random.default_rng([cfg.seed, HOLD_OUT_STREAM]).permutation(len(train))
    held = set(order[:n].tolist())
    return [c for i, c in enumerate(train) if i not in held], [train[i] for i in sorted(held)]


def load_conversations(cfg: TrainConfig) -> tuple[list, list]:
    """Train and eval conversations from a task or JSONL files; DataError on bad input."""

    if cfg.task:
        task = get_task(cfg.task)
        train = [to_conversation(r) for r in task.generate(cfg.n, split="train", seed=cfg.seed)]
        evals = [to_conversation(r) for r in task.generate(cfg.eval_n, split="eval", seed=cfg.seed)]
    else:
        train = load_jsonl(cfg.data)
        evals = load_jsonl(cfg.eval_data) if cfg.eval_data else []
        if not cfg.eval_data and cfg.eval_fraction > 0 and len(train) > 1:
            order = np.random.default_rng(cfg.seed).permutation(len(train))
            n_eval = max(1, int(len(train) * cfg.eval_fraction))
            evals = [train[i] for i in order[:n_eval]]
            train = [train[i] for i in sorted(order[n_eval:])]
    if not train:
        raise TrainError("the training set is empty")
    return train, evals


def encode(tok, messages: list[dict], max_len: int, overlong: str) -> tuple[Example | None, str]:
    """Chat-template tokens with labels on the final assistant answer and its end-of-turn token only.

    The prompt and the completion are tokenised apart, exactly as generation will see them: the model gets
    the prompt ids and must produce the completion ids. Returns (example or None, "ok" | "truncated" | "skipped").
    """

    prompt_msgs, answer = split_prompt(messages)
    prompt_text = tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template([*prompt_msgs, {"role": "assistant", "content": answer}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise TrainError("the chat template renders the prompt differently with and without the answer")
    prompt_ids = tok(prompt_text, add_special_tokens=False).input_ids
    completion = tok(full_text[len(prompt_text) :], add_special_tokens=False).input_ids
    completion = _through_end_of_turn(completion, set(tok.all_special_ids), tok.eos_token_id)
    ids, labels = prompt_ids + completion, [IGNORE] * len(prompt_ids) + completion
    if len(ids) <= max_len:
        return Example(ids, labels), "ok"
    if overlong == "skip" or len(prompt_ids) >= max_len:  # a cut inside the prompt leaves nothing to learn
        return None, "skipped"
    return Example(ids[:max_len], labels[:max_len]), "truncated"


def _through_end_of_turn(completion: list[int], special: set[int], eos: int) -> list[int]:
    # Keep the end-of-turn token so the model learns to stop, but not the template's trailing newline.
    for i in range(len(completion) - 1, -1, -1):
        if completion[i] in special:
            return completion[: i + 1]
    return [*completion, eos]


def encode_all(tok, conversations: list, cfg: TrainConfig, what: str) -> tuple[list[Example], dict[str, int]]:
    out, counts = [], {"truncated": 0, "skipped": 0}
    for messages in conversations:
        ex, status = encode(tok, messages, cfg.max_len, cfg.overlong)
        if status != "ok":
            counts[status] += 1
        if ex is not None:
            ex.group = answer_class(split_prompt(messages)[1], cfg.balance) if cfg.balance else ""
            out.append(ex)
    if not out:
        raise TrainError(f"no {what} example fits in max_len={cfg.max_len} tokens: raise max_len")
    return out, counts


def build_dataset(tok, cfg: TrainConfig, log: Callable[[str], None]) -> Dataset:
    train, evals = load_conversations(cfg)
    train, validation = hold_out(train, cfg)
    if tok.chat_template is None:
        raise TrainError(f"base model {cfg.base_model!r} has no chat template: train an instruct model")
    train_ex, train_long = encode_all(tok, train, cfg, "training")
    eval_ex, eval_long = encode_all(tok, evals, cfg, "eval") if evals else ([], {"truncated": 0, "skipped": 0})
    validation_ex = encode_all(tok, validation, cfg, "held-out")[0] if validation else []
    for what, counts in (("train", train_long), ("eval", eval_long)):
        if sum(counts.values()):
            log(
                f"{sum(counts.values())} {what} examples are longer than max_len={cfg.max_len}: "
                f"{counts['truncated']} truncated, {counts['skipped']} skipped"
            )
    lengths = [len(e.input_ids) for e in train_ex]
    report = {
        "train_examples": len(train_ex),
        "eval_examples": len(eval_ex),
        "overlong_train": sum(train_long.values()),
        "overlong_eval": sum(eval_long.values()),
        "overlong_action": cfg.overlong,
        "skipped_train": train_long["skipped"],
        "truncated_train": train_long["truncated"],
        "mean_tokens": round(float(np.mean(lengths)), 1),
        "max_tokens": max(lengths),
        "label_tokens": sum(sum(t != IGNORE for t in e.labels) for e in train_ex),
        "validation_examples": len(validation),
    }
    if cfg.balance:
        report["balance"] = dict(Counter(e.group for e in train_ex).most_common())
    if cfg.informative_weight != 1:
        report["informative_tokens"] = weigh_informative(train_ex, cfg.informative_weight)
    return Dataset(train_ex, eval_ex, report, validation, validation_ex)


def answer_class(answer: str, balance: str) -> str:
    """The class `balance` evens out: the whole (canonical) answer, or one field of a JSON answer."""
    from lorafleet.core.diagnose import fields_of

    fields = fields_of(answer)
    if balance == "answer":
        return "|".join(f"{k}={v}" for k, v in sorted(fields.items()))
    return fields.get(balance, "<missing>")


def class_weights(groups: list[str]) -> list[float] | None:
    """Sampling weights that give every class the same share of an epoch: 1 / (its count)."""
    if not any(groups):
        return None
    counts = Counter(groups)
    return [1.0 / counts[g] for g in groups]


def informative(answers: list[list[int]]) -> list[list[bool]]:
    """For each answer token: do the training answers that share everything before it go on differently?

    Those are the tokens that carry the answer (`{"verdict": "` is the same for all; `approve` or `reject` is
    where they part). Read from a prefix tree of the training answers' token ids, so it needs no schema."""
    nexts: dict[tuple[int, ...], set[int]] = defaultdict(set)
    for a in answers:
        for t in range(len(a)):
            nexts[tuple(a[:t])].add(a[t])
    return [[len(nexts[tuple(a[:t])]) > 1 for t in range(len(a))] for a in answers]


def weigh_informative(examples: list[Example], weight: float) -> int:
    """Give each example's informative answer tokens `weight` (the rest 1); returns how many there are."""
    positions = [[i for i, t in enumerate(e.labels) if t != IGNORE] for e in examples]
    flags = informative([[e.labels[i] for i in pos] for e, pos in zip(examples, positions, strict=True)])
    for e, pos, marks in zip(examples, positions, flags, strict=True):
        e.weights = [1.0] * len(e.labels)
        for i in (i for i, mark in zip(pos, marks, strict=True) if mark):
            e.weights[i] = weight
    return sum(map(sum, flags))


# ---------------------------------------------------------------- batches


def epoch_batches(
    lengths: list[int], cfg: TrainConfig, epoch: int, weights: list[float] | None = None
) -> list[list[int]]:
    """Micro-batches of example indices for one epoch: a pure function of (seed, epoch), so resume can
    replay it. Shuffled, then sorted by length inside mega-batches so a batch holds similar lengths. With
    `weights` (class_weights), the epoch is as many examples drawn with replacement in proportion to them."""
    rng = np.random.default_rng([cfg.seed, epoch])
    if weights is None:
        order = rng.permutation(len(lengths)).tolist()
    else:
        p = np.asarray(weights) / np.sum(weights)
        order = rng.choice(len(lengths), size=len(lengths), replace=True, p=p).tolist()
    per_batch = cfg.batch_size if not cfg.batch_tokens else max(1, cfg.batch_tokens // int(np.mean(lengths)))
    mega = per_batch * MEGA_BATCH
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        group = sorted(order[start : start + mega], key=lambda i: lengths[i])
        batches += _split(group, lengths, cfg)
    rng.shuffle(batches)
    return batches


def _split(group: list[int], lengths: list[int], cfg: TrainConfig) -> list[list[int]]:
    if not cfg.batch_tokens:
        return [group[i : i + cfg.batch_size] for i in range(0, len(group), cfg.batch_size)]
    batches, cur = [], []
    for i in group:  # sorted ascending, so the newest example is the longest: padded size = count * its length
        if cur and (len(cur) + 1) * lengths[i] > cfg.batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    return batches + ([cur] if cur else [])


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if any(e.weights for e in examples):
        batch["weights"] = torch.ones((len(examples), width))
        for row, e in enumerate(examples):
            if e.weights:
                batch["weights"][row, : len(e.weights)] = torch.tensor(e.weights)
    return batch


def total_steps(n_batches: int, cfg: TrainConfig) -> int:
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * n_batches / cfg.grad_accum))
