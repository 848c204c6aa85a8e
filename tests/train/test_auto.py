"""Training judged by the task's own score (train.validate) and `auto` (train.auto), on the tiny random Llama.

The tiny model answers nothing right, so the early-stopping and best-checkpoint tests script the scores (a fake
scorer sequence) and check what the trainer does with them; the budget tests run on a virtual clock (every step
costs 10 s, every score 5 s), so they hold on any machine, however fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT
from tests.train.test_trainer import chat, tiny, write_jsonl
from train import auto, trainer
from train.config import ConfigError
from train.dataset import hold_out, load_conversations
from train.export import validate_adapter
from train.trainer import REPORT_FILE, train
from train.validate import Score, Validator

STEP_S, SCORE_S = 10.0, 5.0


@pytest.fixture(autouse=True)
def _home(monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(ROOT))


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(40)])


def lora_now(model) -> dict[str, torch.Tensor]:
    # PEFT saves "...q_proj.lora_A.weight" for the parameter "...q_proj.lora_A.default.weight"
    return {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def scripted(monkeypatch, exacts: list[float], collapsed: set[int] = frozenset()) -> list[dict[str, torch.Tensor]]:
    """Validator answers with the next scripted score and remembers the weights it was shown; at the checks in
    `collapsed` (1-based) every answer is the first reference, else each answer is its own reference."""
    seen: list[dict[str, torch.Tensor]] = []

    def fake(self, model, amp) -> Score:
        seen.append(lora_now(model))
        e = exacts[len(seen) - 1]
        answers = [self.references[0]] * len(self.references) if len(seen) in collapsed else list(self.references)
        return Score(e, e, 0.0, answers)

    monkeypatch.setattr(Validator, "__call__", fake)
    return seen


def saved(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(out / "adapter_model.safetensors").items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- best checkpoint and early stopping


def test_early_stopping_keeps_the_best_scoring_weights(tmp_path, data, monkeypatch):
    seen = scripted(monkeypatch, [0.1, 0.5, 0.3, 0.4, 0.9, 0.9])
    out = train(tiny(tmp_path, data, max_steps=6, score_every=1, score_n=4, patience=2), log=lambda _: None)
    report = json.loads((out / REPORT_FILE).read_text())
    sc = report["score"]
    # steps 3 and 4 did not beat step 2: patience 2 ends the run there, before the 0.9 it never saw
    assert [r[0] for r in sc["curve"]] == [1, 2, 3, 4] and report["metrics"]["steps"] == 4
    assert sc["best_step"] == 2 and sc["best_exact"] == 0.5 and sc["stopped"] == "patience"
    assert same(saved(out), {k: v for k, v in seen[1].items() if k in saved(out)})
    assert not same(saved(out), {k: v for k, v in seen[3].items() if k in saved(out)})  # not the last weights


def test_without_patience_the_run_ends_but_the_best_is_still_kept(tmp_path, data, monkeypatch):
    seen = scripted(monkeypatch, [0.1, 0.8, 0.2, 0.2, 0.2, 0.2])
    out = train(tiny(tmp_path, data, max_steps=6, score_every=1, score_n=4), log=lambda _: None)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["metrics"]["steps"] == 6 and report["score"]["best_step"] == 2
    assert same(saved(out), {k: v for k, v in seen[1].items() if k in saved(out)})


def test_the_best_weights_survive_a_resume(tmp_path, data, monkeypatch):
    seen = scripted(monkeypatch, [0.1, 0.9, 0.2, 0.3, 0.3, 0.3])
    cfg = tiny(tmp_path, data, max_steps=6, score_every=1, score_n=4)
    train(cfg, log=lambda _: None, stop_after=3)  # interrupted after a checkpoint
    out = train(cfg.model_copy(update={"resume": True}), log=lambda _: None)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["score"]["best_step"] == 2 and [r[0] for r in report["score"]["curve"]] == [1, 2, 3, 4, 5, 6]
    assert same(saved(out), {k: v for k, v in seen[1].items() if k in saved(out)})


def test_patience_waits_while_the_best_so_far_is_a_collapse_onto_one_answer(tmp_path, monkeypatch):
    rows = [{"messages": [{"role": "user", "content": f"claim {i}"}, {"role": "assistant", "content": "yes" if i % 2
             else "no"}]} for i in range(50)]  # fmt: skip
    data = write_jsonl(tmp_path / "yes_no.jsonl", rows)
    # checks 1-4: the best is check 1, which answers one label for all; the dips after it do not spend patience
    # (a model leaving the majority answer often scores lower first). Check 5 beats it; 6 and 7 do not: stop.
    scripted(monkeypatch, [0.5, 0.3, 0.2, 0.4, 0.8, 0.7, 0.7, 0.9], collapsed={1})
    cfg = tiny(tmp_path, data, max_steps=8, score_every=1, score_n=10, patience=2, eval_fraction=0.0)
    report = json.loads((train(cfg, log=lambda _: None) / REPORT_FILE).read_text())
    assert report["score"]["best_step"] == 5 and report["metrics"]["steps"] == 7
    assert report["score"]["stopped"] == "patience"


def test_a_score_still_rising_at_the_end_says_train_longer(tmp_path, data, monkeypatch):
    scripted(monkeypatch, [0.1, 0.2, 0.4])
    logs: list[str] = []
    out = train(tiny(tmp_path, data, max_steps=3, score_every=1, score_n=4), log=logs.append)
    warnings = json.loads((out / REPORT_FILE).read_text())["score"]["warnings"]
    assert any("still rising when training ended" in w and "more epochs" in w for w in warnings)
    assert any(line.startswith("WARNING: the held-out score was still rising") for line in logs)


# ---------------------------------------------------------------- the held-out sample and the config


def test_the_held_out_sample_is_never_trained_on_and_the_same_every_time(tmp_path, data):
    cfg = tiny(tmp_path, data, score_every=2, score_n=6, eval_fraction=0.0)
    convs, _ = load_conversations(cfg)
    kept, held = hold_out(convs, cfg)
    assert len(held) == 6 and len(kept) == 34
    assert not {json.dumps(c) for c in held} & {json.dumps(c) for c in kept}
    assert hold_out(convs, cfg) == (kept, held)
    assert hold_out(convs, tiny(tmp_path, data, eval_fraction=0.0)) == (convs, [])  # off: nothing held out
    few = tiny(tmp_path, data, score_every=2, score_n=40, eval_fraction=0.0)
    assert len(hold_out(convs, few)[1]) == 8  # small data keeps four fifths for training


@pytest.mark.parametrize(
    "over, message",
    [({"patience": 2}, "set score_every"), ({"score_every": 1, "scorer": "nope"}, "unknown scorer 'nope'")],
)
def test_settings_that_cannot_work_are_refused_before_training(tmp_path, data, over, message):
    with pytest.raises(ConfigError, match=message):
        tiny(tmp_path, data, **over)


# ---------------------------------------------------------------- auto: the search and its budget


class VirtualClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def virtual(monkeypatch) -> VirtualClock:
    clock = VirtualClock()
    monkeypatch.setattr(trainer, "clock", clock)
    monkeypatch.setattr(auto, "clock", clock)
    step, score = trainer.Run.step, Validator.__call__

    def timed_step(self, state):
        clock.t += STEP_S
        return step(self, state)

    def timed_score(self, model, amp):
        clock.t += SCORE_S
        return score(self, model, amp)

    monkeypatch.setattr(trainer.Run, "step", timed_step)
    monkeypatch.setattr(Validator, "__call__", timed_score)
    return clock


def auto_cfg(tmp_path, data, **kw):
    # 40 lines: 36 train after the eval share, 4 held out for the score, 32 trained on: 8 steps an epoch
    kw = {"auto_search": "lr,layers", "top_layers": 1, **kw}
    return tiny(tmp_path, data, auto=True, score_n=4, max_steps=0, epochs=1, r=16, alpha=32, **kw)


def test_the_default_search_is_the_recipe_and_twice_its_rate(tmp_path, data):
    names = [name for name, _ in auto.candidates(auto_cfg(tmp_path, data, auto_search=["lr"]))]
    assert names == ["recipe", "lr x2"]
    assert auto.candidates(auto_cfg(tmp_path, data, auto_search=[])) == [("recipe", {})]
    assert [n for n, _ in auto.candidates(auto_cfg(tmp_path, data, top_layers=0))] == ["recipe", "lr x2"]


def test_auto_runs_through_its_own_entry_point_only(tmp_path, data):
    with pytest.raises(trainer.TrainError, match="train.auto.run"):
        train(auto_cfg(tmp_path, data), log=lambda _: None)


def test_auto_keeps_within_a_budget_of_three_plain_runs(tmp_path, data, virtual):
    out = auto.run(auto_cfg(tmp_path, data), log=lambda _: None)
    table = json.loads((out / REPORT_FILE).read_text())["auto"]
    # a plain run: 9 steps (36 examples, nothing held out) at the first candidate's 10 s a step = 90 s; 3x = 270 s
    assert table["budget_s"] == 270.0 and table["spent_s"] <= table["budget_s"]
    assert table["epochs_planned"] == 1.0  # 3 plain epochs, less two more trials and the margin
    assert [r["name"] for r in table["candidates"]] == ["recipe", "lr x2", "r=8 all layers"]
    assert sum(bool(r.get("chosen")) for r in table["candidates"]) == 1


def test_candidates_tied_on_the_score_are_told_apart_by_their_held_out_loss(tmp_path, data, monkeypatch):
    scripted(monkeypatch, [0.5] * 20)  # every check of every candidate scores the same
    losses = iter([0.9, 0.4, 0.7])  # one trial check each: the second candidate's loss is the lowest
    monkeypatch.setattr(trainer, "evaluate_loss", lambda *a, **k: next(losses, 0.1))
    out = auto.run(auto_cfg(tmp_path, data, auto_budget_s=3600), log=lambda _: None)
    report = json.loads((out / REPORT_FILE).read_text())
    rows = report["auto"]["candidates"]
    assert [r["loss"] for r in rows] == [0.9, 0.4, 0.7]
    assert [r["name"] for r in rows if r.get("chosen")] == ["lr x2"]
    assert report["config"]["lr"] == 2 * auto_cfg(tmp_path, data).lr
    assert all(len(row) == 4 for row in report["score"]["curve"])  # [step, exact, mean score, loss]


def test_auto_keeps_no_checkpoint_before_the_recipes_own_epochs(tmp_path, data, monkeypatch):
    # The recipe trains 1 epoch (8 steps); auto plans 6, scored every 4 steps. The trial's check (step 4) scores
    # best of all, then nothing beats the first check past the floor (step 8) for 3 checks: patience stops at 20.
    # Without the floor, step 4 would be kept and patience would stop the run at step 16.
    seen = scripted(monkeypatch, [0.9, 0.2, 0.1, 0.2, 0.1, 0.9, 0.9])
    out = auto.run(auto_cfg(tmp_path, data, auto_search=[], auto_budget_s=3600), log=lambda _: None)
    sc = json.loads((out / REPORT_FILE).read_text())["score"]
    assert [r[0] for r in sc["curve"]] == [4, 8, 12, 16, 20] and sc["stopped"] == "patience"
    assert sc["best_step"] == 8 and sc["best_exact"] == 0.2
    assert same(saved(out), {k: v for k, v in seen[1].items() if k in saved(out)})


def test_auto_stops_when_a_budget_in_seconds_is_spent(tmp_path, data, virtual):
    out = auto.run(auto_cfg(tmp_path, data, auto_budget_s=120), log=lambda _: None)
    report = json.loads((out / REPORT_FILE).read_text())
    table = report["auto"]
    assert table["spent_s"] <= 120
    # each trial costs 45 s (4 steps and a score): the third would pass 120 s, so it is not started
    assert table["candidates"][2] == {"name": "r=8 all layers", "r": 8, "alpha": 16, "top_layers": 0,
                                      "skipped": "budget"}  # fmt: skip
    assert report["score"]["stopped"] == "budget" and report["metrics"]["steps"] < 48


def test_a_real_auto_run_on_small_data_gives_a_servable_adapter_and_its_table(tmp_path, data):
    logs: list[str] = []
    # The budget on real time is the virtual-clock tests' subject; here it is ample, so every candidate runs.
    out = auto.run(auto_cfg(tmp_path, data, auto_budget_s=3600), log=logs.append)
    report = json.loads((out / REPORT_FILE).read_text())
    assert validate_adapter(out, base_model="tiny-random-llama") == []
    assert not (out / ".auto").exists() and report["config"]["output_dir"] == str(out)
    rows = report["auto"]["candidates"]
    assert len(rows) == 3 and all("exact" in r and r["steps"] == 4 for r in rows)
    kept = next(r for r in rows if r.get("chosen"))
    assert report["score"]["curve"][0][0] == 4 and report["score"]["n"] == 4
    assert report["data"]["validation_examples"] == 4
    assert any(line.startswith(f"auto: chose {kept['name']}") for line in logs)
    assert "auto: " in auto.format_table(report["auto"]) and "<- kept" in auto.format_table(report["auto"])
