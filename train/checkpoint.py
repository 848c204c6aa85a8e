"""Checkpoints that resume exactly: weights, optimizer, scheduler, RNG states and the loop's position."""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.config import RUN_ONLY_FIELDS, TrainConfig, TrainError

STATE_FILE = "state.pt"


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
    score: list[list[float]] = field(default_factory=list)  # [step, exact, mean score, loss] on the held-out sample
    best_step: int = 0  # the step whose weights the scorer liked best (0: none scored yet)
    best_predictions: list[str] = field(default_factory=list)
    since_best: int = 0  # score checks since the best one
    score_seconds: float = 0.0  # time spent answering the held-out sample


def checkpoints(out_dir: Path) -> list[Path]:
    return sorted((out_dir / "checkpoints").glob("step-*[0-9]"))


def rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_states(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


def save_checkpoint(
    out_dir: Path, model, opt, sched, state: State, cfg: TrainConfig, best: dict | None = None
) -> Path:
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
        "best": best,  # the best-scoring LoRA weights so far (score_every), kept across a resume
    }
    torch.save(blob, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # a crash mid-save leaves the previous checkpoint as the newest whole one
    for old in checkpoints(out_dir)[: -cfg.keep_checkpoints]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, model, opt, sched, cfg: TrainConfig) -> tuple[State, dict | None]:
    """The loop's state and the best-scoring weights saved with it (None without score_every)."""
    blob = torch.load(path / STATE_FILE, weights_only=False)
    changed = [k for k, v in blob["config"].items() if k not in RUN_ONLY_FIELDS and cfg.to_dict().get(k) != v]
    if changed:
        raise TrainError(f"cannot resume from {path}: config fields changed since it was saved: {', '.join(changed)}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in blob["lora"].items():
            params[name].copy_(value)
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    set_rng_states(blob["rng"])
    return State(**blob["state"]), blob.get("best")
