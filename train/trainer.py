"""LoRA fine-tuning of a small causal LM on CPU, readable top to bottom.

    cfg = load_config("train/configs/manifest.yaml", ["max_steps=50"])
    out = train(cfg)   # adapters/manifest/{adapter_config.json, adapter_model.safetensors, lorafleet_train.json}

The steps, in order: load and tokenise the data (loss only on the assistant answer and its end-of-turn token),
load the base in bf16, seed, wrap it with PEFT LoRA (fp32 adapter weights), then loop: length-grouped
micro-batches, loss from logits taken only at the labelled positions, AdamW + warmup/decay + clipping,
eval loss now and then, checkpoints that resume exactly. At the end the adapter is saved in PEFT format,
checked against what vLLM accepts, and a `lorafleet_train.json` records config and metrics.

This file is the run; its parts live beside it: dataset.py (tokens, labels, batches), lora.py (model, optimizer,
loss), checkpoint.py (exact resume).
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from lorafleet.core.paths import adapters_dir
from train.checkpoint import State, checkpoints, load_checkpoint, save_checkpoint
from train.config import TrainConfig, TrainError
from train.dataset import Dataset, build_dataset, class_weights, collate, epoch_batches, total_steps
from train.export import check_adapter
from train.lora import (
    build_model,
    build_optimizer,
    evaluate_loss,
    label_weight,
    loss_sum,
    param_counts,
    use_bf16,
)
from train.models import SPECS, ModelError, model_path
from train.validate import Validator

REPORT_FILE = "lorafleet_train.json"
clock = time.monotonic  # the one clock deadlines are read on (tests replace it with a virtual one)


def resolve_base(cfg: TrainConfig) -> tuple[Path, str]:
    """(folder, what to record as base_model_name_or_path): the lorafleet id if one was given, else the path."""

    try:
        path = model_path(cfg.base_model)
    except ModelError as e:
        raise TrainError(f"base_model: {e}") from e
    if not (path / "config.json").is_file():
        raise TrainError(f"base_model {cfg.base_model!r} is not imported yet: run `lorafleet models pull`")
    return path, cfg.base_model if cfg.base_model in SPECS else str(path)


def output_dir(cfg: TrainConfig) -> Path:

    return Path(cfg.output_dir) if cfg.output_dir else adapters_dir() / cfg.run_name


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train(
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
    on_step: Callable[[dict], None] | None = None,
    epoch_dir: Callable[[int], Path] | None = None,
) -> Path:
    """Train one adapter; returns its folder. `stop_after` ends the run after that many steps with a checkpoint,
    as if interrupted: `resume=true` then continues it to the same weights as an uninterrupted run. `on_step` gets
    {step, steps, loss, tokens, tokens_per_s} after every optimizer step (the fine-tuning worker's events).
    With `epoch_dir(step)`, the adapter as it stands at the end of each epoch but the last is saved there too
    (servable PEFT folders, like OpenAI's per-epoch checkpoints), and that step's `on_step` has its `checkpoint`."""
    if cfg.auto:
        raise TrainError("auto=true is a search over several runs: call train.auto.run, which also runs plain configs")
    run = setup(cfg, log)
    run.on_step, run.epoch_dir = on_step, epoch_dir
    return run.fit(stop_after)


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
        self.weights = class_weights([e.group for e in data.train])  # None unless `balance` is set
        n_batches = len(epoch_batches(self.lengths, cfg, 0, self.weights))
        self.steps = total_steps(n_batches, cfg)
        self.steps_per_epoch = max(1, math.ceil(n_batches / cfg.grad_accum))
        self.opt, self.sched = build_optimizer(model, cfg, self.steps)
        self.amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
        self.setup_seconds = 0.0
        self.validator = _validator(cfg, tok, data)
        self.best: dict | None = None  # the best-scoring LoRA weights so far
        self.deadline: float | None = None  # clock() by which the run must end (train.auto's budget)
        # Steps before this are scored and logged but never kept over a later score, nor count against patience
        # (train.auto: never less training than the recipe it starts from).
        self.keep_from = 0
        self.stopped = ""  # why the run ended before its last step: "patience" | "budget"
        self.state: State | None = None  # the loop's state once fit() has run
        self.finished = False  # the adapter is saved (fit() ran to the end, not to `stop_after`)
        self._loop_t0, self._loop_step0 = 0.0, 0  # when and at which step this process's loop began
        self.on_step: Callable[[dict], None] | None = None
        self.epoch_dir: Callable[[int], Path] | None = None
        self._epoch, self._batches = -1, []

    def fit(self, stop_after: int | None = None) -> Path:
        """Train to the last step (or `stop_after` more steps), then save and check the adapter."""
        t0 = time.perf_counter()
        state = self.state = self.start_state()
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
            state, self.best = load_checkpoint(found[-1], self.model, self.opt, self.sched, self.cfg)
            return state
        if self.cfg.resume:
            self.log(f"resume: no checkpoint under {self.out / 'checkpoints'}; starting from step 0")
        shutil.rmtree(self.out / "checkpoints", ignore_errors=True)  # an older run's checkpoints must not be resumed
        return State()

    def next_batch(self, state: State) -> list[int]:
        if self._epoch != state.epoch:
            self._epoch, self._batches = state.epoch, epoch_batches(self.lengths, self.cfg, state.epoch, self.weights)
        if state.batch_in_epoch >= len(self._batches):
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            return self.next_batch(state)
        state.batch_in_epoch += 1
        return self._batches[state.batch_in_epoch - 1]

    def step(self, state: State) -> tuple[float, int]:
        """One optimizer step over grad_accum micro-batches; the loss is the (weighted) mean over their label tokens."""
        batches = [
            collate([self.data.train[i] for i in self.next_batch(state)], self.pad_id)
            for _ in range(self.cfg.grad_accum)
        ]
        labelled = sum(label_weight(b) for b in batches)
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
        start, self._loop_t0, self._loop_step0 = state.step, clock(), state.step
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
                if self.on_step is not None:
                    self.on_step({"step": state.step, "steps": self.steps, "loss": round(loss, 5),
                                  "tokens": state.tokens, "tokens_per_s": round(state.tokens / state.train_seconds, 1),
                                  **self.epoch_checkpoint(state)})  # fmt: skip
                self.eval_and_save(state, bar)
                if self.stop_early(state, bar):
                    break
        except KeyboardInterrupt:
            if self.cfg.save_every:
                self.save(state)  # Ctrl-C loses at most the current step
            raise
        finally:
            bar.close()
        return False

    def eval_and_save(self, state: State, bar) -> None:
        cfg, last = self.cfg, state.step == self.steps
        if self.validator is not None and (last or (cfg.score_every and state.step % cfg.score_every == 0)):
            self.validate(state, bar)
        if last or (cfg.eval_every and state.step % cfg.eval_every == 0):
            loss = evaluate_loss(self.model, self.data.eval, cfg, self.pad_id, self.amp)
            if not math.isnan(loss):
                state.eval_loss.append([state.step, round(loss, 5)])
                (bar.write if cfg.progress else self.log)(f"step {state.step}: eval loss {loss:.4f}")
        if cfg.save_every and state.step % cfg.save_every == 0 and not last:
            self.save(state)

    def validate(self, state: State, bar) -> None:
        """Score the weights as they stand; keep them if the scorer likes them best so far."""
        t0 = clock()
        s = self.validator(self.model, self.amp)
        # The held-out answers' loss, logged beside the score: it moves while exact match sits on a plateau, and
        # train.auto breaks ties between candidates with it. It never picks the checkpoint within a run.
        loss = evaluate_loss(self.model, self.data.validation_ex, self.cfg, self.pad_id, self.amp)
        state.score_seconds += clock() - t0
        row = [state.step, round(s.exact, 4), round(s.mean_score, 4), round(loss, 5)]
        state.score.append(row)
        best = next((r for r in state.score if r[0] == state.best_step), None)
        if best is None or self._rank(row) > self._rank(best):
            state.best_step, state.best_predictions, state.since_best = state.step, s.predictions, 0
            self.best = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        elif state.step >= self.keep_from and not self.validator.diagnose(state.best_predictions).collapsed:
            state.since_best += 1
        # else: the best so far answers (nearly) one thing for every input. A model leaving the majority answer
        # often scores lower first (measured on examples/expenses: 62.5 % collapsed, then 42.5 %, 52.5 %), so
        # patience waits until something better than a collapse was seen.
        mark = " (best)" if state.best_step == state.step else f" (best: step {state.best_step})"
        (bar.write if self.cfg.progress else self.log)(
            f"step {state.step}: score exact {s.exact:.1%}, mean {s.mean_score:.3f}, loss {loss:.4f} on "
            f"{len(s.predictions)} held-out ({clock() - t0:.0f} s){mark}"
        )

    def _rank(self, row: list) -> tuple:
        """Past the `keep_from` floor first, then exact, then mean score; a tie keeps the earlier (shorter) one."""
        return (row[0] >= self.keep_from, row[1], row[2])

    def stop_early(self, state: State, bar) -> bool:
        """Patience spent, or the next step (and its score) would pass the deadline: end here, scored."""
        if state.step >= self.steps:
            return False
        if self.cfg.patience and state.since_best >= self.cfg.patience:
            self.stopped = "patience"
        elif self.deadline is not None:
            per_step = (clock() - self._loop_t0) / max(1, state.step - self._loop_step0)
            last_score = state.score_seconds / len(state.score) if state.score else 0.0
            if clock() + per_step + last_score > self.deadline:
                self.stopped = "budget"
        if not self.stopped:
            return False
        if self.validator is not None and (not state.score or state.score[-1][0] != state.step):
            self.validate(state, bar)
        self.log(
            f"stopping at step {state.step} of {self.steps}: "
            + (f"no better score in {self.cfg.patience} checks" if self.stopped == "patience" else "time budget spent")
        )
        return True

    def save(self, state: State) -> None:
        save_checkpoint(self.out, self.model, self.opt, self.sched, state, self.cfg, self.best)

    def epoch_checkpoint(self, state: State) -> dict:
        """At an epoch's end (but the last step's, which is the adapter itself): save a servable copy."""
        if self.epoch_dir is None or state.step % self.steps_per_epoch or state.step == self.steps:
            return {}
        path = self.epoch_dir(state.step)
        self.save_adapter(path)
        return {"checkpoint": str(path)}

    def save_adapter(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.model.peft_config["default"].base_model_name_or_path = self.base_ref
        # Never save embeddings: we do not train them, and "auto" would look the base id up on the HF hub.
        self.model.save_pretrained(path, save_embedding_layers=False)

    def finish(self, state: State, wall: float) -> Path:
        """Save the adapter in PEFT format, check that vLLM would take it, and write the run report."""

        if self.best is not None:  # the adapter is the best-scoring weights, not merely the last ones
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in self.best.items():
                    params[name].copy_(value)
        self.save_adapter(self.out)
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
        if self.validator is not None:
            report["score"] = self.score_report(state)
            for line in report["score"]["warnings"]:
                self.log(f"WARNING: {line}")
        (self.out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        self.finished = True
        shutil.rmtree(self.out / "checkpoints", ignore_errors=True)  # the run is complete: nothing left to resume
        return self.out

    def score_report(self, state: State) -> dict[str, Any]:
        """The held-out score's curve, the step kept, and what a tenant can act on (diagnosis, hints)."""
        best = next(r for r in state.score if r[0] == state.best_step)
        diagnosis = self.validator.diagnose(state.best_predictions)
        warnings = list(diagnosis.warnings)
        if len(state.score) >= 2 and state.best_step == state.score[-1][0] and best[1:3] > state.score[0][1:3]:
            warnings.append(f"the held-out score was still rising when training ended (exact {state.score[0][1]:.0%} "
                            f"at step {state.score[0][0]} -> {best[1]:.0%} at step {best[0]}): more epochs may "
                            "help, or auto=true")  # fmt: skip
        return {"n": len(self.validator.references), "every": self.cfg.score_every, "curve": state.score,
                "best_step": state.best_step, "best_exact": best[1], "best_mean_score": best[2],
                "stopped": self.stopped or None, "seconds": round(state.score_seconds, 1),
                "diagnosis": diagnosis.to_dict(), "warnings": warnings}  # fmt: skip


def _validator(cfg: TrainConfig, tok, data: Dataset) -> Validator | None:
    """The held-out sample scored with the task's scorer (or `scorer` for `data` runs); None when off."""
    if not data.validation:
        return None
    from lorafleet.core.scorers import make_scorer
    from train.tasks import get_task

    score = get_task(cfg.task).score if cfg.task else make_scorer(cfg.scorer).score
    return Validator(tok, data.validation, score)


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
