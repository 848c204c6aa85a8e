"""LoRA fine-tuning of a small causal LM on CPU, readable top to bottom.

    cfg = load_config("train/configs/manifest.yaml", ["max_steps=50"])
    out = train(cfg)   # adapters/manifest/{adapter_config.json, adapter_model.safetensors, lorafleet_train.json}

The steps, in order: load and tokenise the data (loss only on the assistant answer and its end-of-turn token),
load the base in bf16, seed, wrap it with PEFT LoRA (fp32 adapter weights), then loop: length-grouped
micro-batches, loss from logits taken only at the labelled positions, AdamW + warmup/decay + clipping,
eval loss now and then, checkpoints that resume exactly. At the end the adapter is saved in PEFT format,
checked against what vLLM accepts, and a `lorafleet_train.json` records config and metrics.
"""

from __future__ import annotations

import json
import math
import random
import resource
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lorafleet.core.errors import UserError
from train.config import TrainConfig

IGNORE = -100
MEGA_BATCH = 32  # micro-batches per length-sorted group: enough to cut padding, still shuffled across groups
STATE_FILE = "state.pt"
REPORT_FILE = "lorafleet_train.json"
# Fields that may differ between a run and its resumption without changing what is trained.
RESUME_FREE = {"resume", "progress", "threads", "eval_every", "save_every", "keep_checkpoints"}


class TrainError(UserError):
    """Training cannot start or finish; the message says what to fix."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE except on the answer + end-of-turn tokens


@dataclass
class Dataset:
    train: list[Example]
    eval: list[Example]
    report: dict[str, Any]


@dataclass
class State:
    """Everything, besides weights and optimizer, that an exact resume needs."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens: int = 0  # real (non-pad) tokens seen in training steps
    train_seconds: float = 0.0
    # CPU time of all threads in the steps: unlike wall time it barely moves when other processes share the CPU.
    train_cpu_seconds: float = 0.0
    train_loss: list[list[float]] = field(default_factory=list)  # [step, loss]
    eval_loss: list[list[float]] = field(default_factory=list)


# ---------------------------------------------------------------- data


def load_conversations(cfg: TrainConfig) -> tuple[list, list]:
    """Train and eval conversations from a task or JSONL files; DataError on bad input."""
    from train.data import load_jsonl, to_conversation

    if cfg.task:
        from train.tasks import get_task

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
    from train.data import split_prompt

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
            out.append(ex)
    if not out:
        raise TrainError(f"no {what} example fits in max_len={cfg.max_len} tokens: raise max_len")
    return out, counts


def build_dataset(tok, cfg: TrainConfig, log: Callable[[str], None]) -> Dataset:
    train, evals = load_conversations(cfg)
    if tok.chat_template is None:
        raise TrainError(f"base model {cfg.base_model!r} has no chat template: train an instruct model")
    train_ex, train_long = encode_all(tok, train, cfg, "training")
    eval_ex, eval_long = encode_all(tok, evals, cfg, "eval") if evals else ([], {"truncated": 0, "skipped": 0})
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
    }
    return Dataset(train_ex, eval_ex, report)


# ---------------------------------------------------------------- batches


def epoch_batches(lengths: list[int], cfg: TrainConfig, epoch: int) -> list[list[int]]:
    """Micro-batches of example indices for one epoch: a pure function of (seed, epoch), so resume can
    replay it. Shuffled, then sorted by length inside mega-batches so a batch holds similar lengths."""
    rng = np.random.default_rng([cfg.seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
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
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def total_steps(n_batches: int, cfg: TrainConfig) -> int:
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * n_batches / cfg.grad_accum))


# ---------------------------------------------------------------- model


def use_bf16(setting: str) -> bool:
    if setting != "auto":
        return setting == "true"
    # bf16 matmuls are only fast with AVX512-BF16 or AMX; elsewhere they are emulated and slower than fp32.
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of every nn.Linear except the LM head: q/k/v/o/gate/up/down_proj for Llama."""
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    return sorted(names - {"lm_head"})


def top_layers(model: torch.nn.Module, n: int) -> list[int] | None:
    """PEFT's layers_to_transform for the top n decoder layers (None: all). Nothing below them has trainable
    weights, so autograd stops there: the backward pass, twice the forward's cost, shrinks to those layers."""
    total = model.config.num_hidden_layers
    if n == 0 or n == total:
        return None
    if n > total:
        raise TrainError(f"top_layers={n} but {model.config.model_type} has {total} layers: use 1..{total} or 0 (all)")
    return list(range(total - n, total))


def build_model(cfg: TrainConfig, base_path: Path, bf16: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from train.export import supported_modules

    dtype = torch.bfloat16 if bf16 else torch.float32
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    targets = cfg.target_modules or linear_module_names(base)
    arch = (base.config.architectures or [type(base).__name__])[0]
    bad = sorted(set(targets) - supported_modules(arch))
    if bad:
        raise TrainError(
            f"target_modules {bad} cannot be served by vLLM for {arch}: use {sorted(supported_modules(arch))}"
        )
    # Seed right before the adapter exists: LoRA A is drawn at creation (unsloth#617).
    seed_everything(cfg.seed)
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        layers_to_transform=top_layers(base, cfg.top_layers),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 master weights for the adapter; autocast runs the matmuls in bf16
    return model


def param_counts(model) -> dict[str, Any]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "share": round(trainable / total, 5)}


def build_optimizer(model, cfg: TrainConfig, steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    warm = int(cfg.warmup) if cfg.warmup >= 1 else int(cfg.warmup * steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, steps - warm)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0 - min(1.0, progress) if cfg.schedule == "linear" else 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ---------------------------------------------------------------- loss


# Architectures whose decoder is checked to give the same loss with a shared-prefix KV cache (tests/train).
PREFIX_SHARING_MODELS = {"llama", "mistral", "qwen2", "qwen3"}
MIN_SHARED_PREFIX = 16  # below this the extra decoder call costs more than it saves


def shared_prefix_len(batch: dict[str, torch.Tensor]) -> int:
    """How many leading tokens every row shares and none of them is scored on (the system prompt, usually).

    Tasks repeat one instruction in every example (35-50 % of the tokens of the built-in tasks). Position p's
    hidden state predicts token p+1, so the prefix stops one token before the first labelled token of any row.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    if ids.shape[0] < 2:
        return 0
    common = int((ids == ids[:1]).all(dim=0).int().cumprod(0).sum())
    labelled = (labels != IGNORE).any(dim=0).nonzero()
    first_label = int(labelled[0]) if len(labelled) else ids.shape[1]
    n = min(common, first_label - 1)
    return n if n >= MIN_SHARED_PREFIX else 0


def _decoder_hidden(lm, input_ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """The decoder's last hidden states for positions prefix.. of each row.

    With a shared prefix, it runs once (batch of 1) into a KV cache that is repeated across the batch; the rows
    then attend to it exactly as to their own copy. Gradients flow back through the repeated cache, so the
    prefix's LoRA weights get the sum of every row's gradient, as without sharing.
    """
    decoder = lm.get_decoder()
    if not prefix:
        return decoder(input_ids=input_ids, use_cache=False).last_hidden_state
    cache = decoder(input_ids=input_ids[:1, :prefix], use_cache=True).past_key_values
    cache.batch_repeat_interleave(input_ids.shape[0])
    return decoder(input_ids=input_ids[:, prefix:], past_key_values=cache, use_cache=True).last_hidden_state


def loss_sum(
    model, batch: dict[str, torch.Tensor], logits_at_labels: bool = True, share_prefix: bool = True
) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions.

    With `logits_at_labels` the decoder runs alone and the LM head is applied only to the hidden states whose
    next token is labelled: the answer is a few dozen tokens of a several-hundred-token example, and the head
    (49k x 576 for SmolLM2) is about a fifth of the forward FLOPs plus a large fp32 softmax. With `share_prefix`
    (on architectures in PREFIX_SHARING_MODELS) the prefix all rows share is computed once per batch.

    No attention mask is passed: padding is on the right and attention is causal, so no real token can see a
    pad, and pad positions are never labelled. Without a mask SDPA takes its faster causal kernel.
    """
    lm = model.get_base_model()
    targets = batch["labels"][:, 1:]
    if logits_at_labels:
        shareable = share_prefix and getattr(lm.config, "model_type", None) in PREFIX_SHARING_MODELS
        prefix = shared_prefix_len(batch) if shareable else 0
        hidden = _decoder_hidden(lm, batch["input_ids"], prefix)
        targets = targets[:, prefix:]
        keep = targets != IGNORE
        logits = lm.get_output_embeddings()(hidden[:, :-1][keep])
        cap = getattr(lm.config, "final_logit_softcapping", None)
        if cap:  # Gemma-2 style models squash logits; keep the loss identical to the full forward
            logits = torch.tanh(logits / cap) * cap
    else:
        keep = targets != IGNORE
        logits = lm(input_ids=batch["input_ids"], use_cache=False).logits[:, :-1][keep]
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def n_labels(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], cfg: TrainConfig, pad_id: int, amp) -> float:
    """Mean per-token loss on the eval set (answer tokens only, as in training)."""
    if not examples:
        return float("nan")
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, count, size = 0.0, 0, cfg.batch_size * 2
    for start in range(0, len(order), size):
        batch = collate([examples[i] for i in order[start : start + size]], pad_id)
        with amp():
            total += float(loss_sum(model, batch, cfg.logits_at_labels, cfg.share_prefix))
        count += n_labels(batch)
    model.train()
    return total / max(1, count)


# ---------------------------------------------------------------- checkpoints


def checkpoints(out_dir: Path) -> list[Path]:
    return sorted((out_dir / "checkpoints").glob("step-*[0-9]"))


def rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_states(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


def save_checkpoint(out_dir: Path, model, opt, sched, state: State, cfg: TrainConfig) -> Path:
    final = out_dir / "checkpoints" / f"step-{state.step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    blob = {
        "lora": lora,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": rng_states(),
        "state": asdict(state),
        "config": cfg.to_dict(),
    }
    torch.save(blob, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # a crash mid-save leaves the previous checkpoint as the newest whole one
    for old in checkpoints(out_dir)[: -cfg.keep_checkpoints]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, model, opt, sched, cfg: TrainConfig) -> State:
    blob = torch.load(path / STATE_FILE, weights_only=False)
    changed = [k for k, v in blob["config"].items() if k not in RESUME_FREE and cfg.to_dict().get(k) != v]
    if changed:
        raise TrainError(f"cannot resume from {path}: config fields changed since it was saved: {', '.join(changed)}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in blob["lora"].items():
            params[name].copy_(value)
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    set_rng_states(blob["rng"])
    return State(**blob["state"])


# ---------------------------------------------------------------- the run


def resolve_base(cfg: TrainConfig) -> tuple[Path, str]:
    """(folder, what to record as base_model_name_or_path): the lorafleet id if one was given, else the path."""
    from train.models import SPECS, ModelError, model_path

    try:
        path = model_path(cfg.base_model)
    except ModelError as e:
        raise TrainError(f"base_model: {e}") from e
    if not (path / "config.json").is_file():
        raise TrainError(f"base_model {cfg.base_model!r} is not imported yet: run `lorafleet models pull`")
    return path, cfg.base_model if cfg.base_model in SPECS else str(path)


def output_dir(cfg: TrainConfig) -> Path:
    from lorafleet.core.paths import adapters_dir

    return Path(cfg.output_dir) if cfg.output_dir else adapters_dir() / cfg.run_name


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train(cfg: TrainConfig, log: Callable[[str], None] = print, stop_after: int | None = None) -> Path:
    """Train one adapter; returns its folder. `stop_after` ends the run after that many steps with a checkpoint,
    as if interrupted: `resume=true` then continues it to the same weights as an uninterrupted run."""
    return setup(cfg, log).fit(stop_after)


def setup(cfg: TrainConfig, log: Callable[[str], None] = print) -> Run:
    """Everything before the first step. Every input check happens before the model is loaded."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base_path, base_ref = resolve_base(cfg)
    tok = AutoTokenizer.from_pretrained(base_path)
    data = build_dataset(tok, cfg, log)
    bf16 = use_bf16(cfg.bf16)
    model = build_model(cfg, base_path, bf16)
    run = Run(cfg, model, data, tok, base_path, base_ref, bf16, log)
    run.setup_seconds = time.perf_counter() - t0
    return run


class Run:
    """One training run: the model, its optimizer and data, and the loop over optimizer steps."""

    def __init__(self, cfg: TrainConfig, model, data: Dataset, tok, base_path: Path, base_ref: str, bf16: bool, log):
        self.cfg, self.model, self.data, self.log = cfg, model, data, log
        self.base_path, self.base_ref, self.bf16 = base_path, base_ref, bf16
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.out = output_dir(cfg)
        self.lengths = [len(e.input_ids) for e in data.train]
        self.steps = total_steps(len(epoch_batches(self.lengths, cfg, 0)), cfg)
        self.opt, self.sched = build_optimizer(model, cfg, self.steps)
        self.amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
        self.setup_seconds = 0.0
        self._epoch, self._batches = -1, []

    def fit(self, stop_after: int | None = None) -> Path:
        """Train to the last step (or `stop_after` more steps), then save and check the adapter."""
        t0 = time.perf_counter()
        state = self.start_state()
        self.log(
            f"training {self.cfg.run_name}: {self.data.report['train_examples']} examples, {self.steps} steps, "
            f"bf16={self.bf16}, {param_counts(self.model)['trainable']:,} trainable params -> {self.out}"
        )
        if self.loop(state, stop_after):
            return self.out
        return self.finish(state, wall=self.setup_seconds + time.perf_counter() - t0)

    def start_state(self) -> State:
        found = checkpoints(self.out)
        if self.cfg.resume and found:
            self.log(f"resuming from {found[-1]}")
            return load_checkpoint(found[-1], self.model, self.opt, self.sched, self.cfg)
        if self.cfg.resume:
            self.log(f"resume: no checkpoint under {self.out / 'checkpoints'}; starting from step 0")
        shutil.rmtree(self.out / "checkpoints", ignore_errors=True)  # an older run's checkpoints must not be resumed
        return State()

    def next_batch(self, state: State) -> list[int]:
        if self._epoch != state.epoch:
            self._epoch, self._batches = state.epoch, epoch_batches(self.lengths, self.cfg, state.epoch)
        if state.batch_in_epoch >= len(self._batches):
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            return self.next_batch(state)
        state.batch_in_epoch += 1
        return self._batches[state.batch_in_epoch - 1]

    def step(self, state: State) -> tuple[float, int]:
        """One optimizer step over grad_accum micro-batches; the loss is the mean over all their label tokens."""
        batches = [
            collate([self.data.train[i] for i in self.next_batch(state)], self.pad_id)
            for _ in range(self.cfg.grad_accum)
        ]
        labelled = sum(n_labels(b) for b in batches)
        total = 0.0
        for batch in batches:
            with self.amp():
                loss = loss_sum(self.model, batch, self.cfg.logits_at_labels, self.cfg.share_prefix) / max(1, labelled)
            loss.backward()
            total += float(loss.detach())
        if self.cfg.max_grad_norm:
            params = [p for p in self.model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return total, sum(int(b["attention_mask"].sum()) for b in batches)

    def loop(self, state: State, stop_after: int | None) -> bool:
        """Step until the last step; True if stopped early by `stop_after` (a checkpoint is saved)."""
        from tqdm import tqdm

        self.model.train()
        bar = tqdm(
            total=self.steps, initial=state.step, disable=not self.cfg.progress, unit="step", dynamic_ncols=True
        )
        start = state.step
        try:
            while state.step < self.steps:
                if stop_after is not None and state.step - start >= stop_after:
                    self.save(state)
                    return True
                t0, c0 = time.perf_counter(), time.process_time()
                loss, tokens = self.step(state)
                state.step, state.tokens = state.step + 1, state.tokens + tokens
                state.train_seconds += time.perf_counter() - t0
                state.train_cpu_seconds += time.process_time() - c0
                state.train_loss.append([state.step, round(loss, 5)])
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{state.tokens / state.train_seconds:.0f}")
                self.eval_and_save(state, bar)
        except KeyboardInterrupt:
            if self.cfg.save_every:
                self.save(state)  # Ctrl-C loses at most the current step
            raise
        finally:
            bar.close()
        return False

    def eval_and_save(self, state: State, bar) -> None:
        cfg, last = self.cfg, state.step == self.steps
        if last or (cfg.eval_every and state.step % cfg.eval_every == 0):
            loss = evaluate_loss(self.model, self.data.eval, cfg, self.pad_id, self.amp)
            if not math.isnan(loss):
                state.eval_loss.append([state.step, round(loss, 5)])
                (bar.write if cfg.progress else self.log)(f"step {state.step}: eval loss {loss:.4f}")
        if cfg.save_every and state.step % cfg.save_every == 0 and not last:
            self.save(state)

    def save(self, state: State) -> None:
        save_checkpoint(self.out, self.model, self.opt, self.sched, state, self.cfg)

    def finish(self, state: State, wall: float) -> Path:
        """Save the adapter in PEFT format, check that vLLM would take it, and write the run report."""
        from train.export import check_adapter

        self.out.mkdir(parents=True, exist_ok=True)
        self.model.peft_config["default"].base_model_name_or_path = self.base_ref
        # Never save embeddings: we do not train them, and "auto" would look the base id up on the HF hub.
        self.model.save_pretrained(self.out, save_embedding_layers=False)
        check_adapter(self.out, base_model=str(self.base_path), max_rank=self.cfg.max_serving_rank)
        report = {
            "config": self.cfg.to_dict(),
            "base_model": self.base_ref,
            "base_model_path": str(self.base_path),
            "bf16": self.bf16,
            "params": param_counts(self.model),
            "data": self.data.report,
            "metrics": {**_metrics(state), "wall_seconds": round(wall, 1)},
            "versions": _versions(),
        }
        (self.out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        shutil.rmtree(self.out / "checkpoints", ignore_errors=True)  # the run is complete: nothing left to resume
        return self.out


def _metrics(state: State) -> dict[str, Any]:
    return {
        "steps": state.step,
        "final_train_loss": state.train_loss[-1][1] if state.train_loss else None,
        "final_eval_loss": state.eval_loss[-1][1] if state.eval_loss else None,
        "train_loss": state.train_loss,
        "eval_loss": state.eval_loss,
        "tokens": state.tokens,
        "tokens_per_s": round(state.tokens / state.train_seconds, 1) if state.train_seconds else None,
        "train_seconds": round(state.train_seconds, 2),
        "tokens_per_cpu_s": round(state.tokens / state.train_cpu_seconds, 1) if state.train_cpu_seconds else None,
        "train_cpu_seconds": round(state.train_cpu_seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
