"""The LoRA trainer on the tiny random Llama: learning, masking, exact resume, early input checks, config, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT
from train import dataset, lora, trainer
from train.config import ConfigError, TrainConfig, TrainError, load_config
from train.data import DataError
from train.dataset import IGNORE, encode, epoch_batches
from train.export import validate_adapter
from train.trainer import setup, train

WORDS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "olive", "peach", "plum", "melon", "kiwi", "fig"]


@pytest.fixture(autouse=True)
def _home(monkeypatch):
    # Model ids (tiny-random-llama) resolve under $LORAFLEET_HOME/models whatever the working directory.
    monkeypatch.setenv("LORAFLEET_HOME", str(ROOT))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(i: int) -> dict:
    w = WORDS[i % len(WORDS)]
    return {
        "messages": [
            {"role": "system", "content": "Repeat the word."},
            {"role": "user", "content": f"Say {w} {i}"},
            {"role": "assistant", "content": f"{w} {i}"},
        ]
    }


@pytest.fixture
def data_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(24)])


def tiny(tmp_path: Path, data: Path, /, **kw) -> TrainConfig:
    values = {
        "base_model": "tiny-random-llama",
        "data": str(data),
        "output_dir": str(tmp_path / "out"),
        "batch_size": 4,
        "progress": False,
        "max_steps": 6,
        "lr": 1e-2,
        "seed": 0,
        **kw,
    }
    return load_config(None, values)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ROOT / "models" / "tiny-random-llama")


# ---------------------------------------------------------------- learning


def test_loss_falls_when_overfitting_a_few_examples(tmp_path):
    data = write_jsonl(tmp_path / "four.jsonl", [chat(i) for i in range(4)])
    cfg = tiny(tmp_path, data, eval_fraction=0.0, max_steps=30, warmup=0, schedule="constant", r=16, alpha=32)
    out = train(cfg, log=lambda _: None)
    losses = [loss for _, loss in json.loads((out / "lorafleet_train.json").read_text())["metrics"]["train_loss"]]
    # The random 64-wide model caps how high any logit can go, so "falls" is tenths of a nat, not to zero.
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3, losses


def test_only_lora_weights_change(tmp_path, data_file):
    run = setup(tiny(tmp_path, data_file), log=lambda _: None)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    run.fit()
    after = dict(run.model.named_parameters())
    base = [n for n in before if "lora_" not in n]
    lora_b = [n for n in before if "lora_B" in n]
    assert base and lora_b
    assert all(torch.equal(before[n], after[n]) for n in base), "a base weight moved"
    assert all(not torch.equal(before[n], after[n]) for n in lora_b), "a LoRA B weight did not move"
    assert all(after[n].dtype == torch.float32 for n in lora_b), "LoRA weights must train in fp32"


def test_adapter_and_report_are_written_and_valid(tmp_path, data_file):
    out = train(tiny(tmp_path, data_file, eval_every=3), log=lambda _: None)
    report = json.loads((out / "lorafleet_train.json").read_text())
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert validate_adapter(out, base_model="tiny-random-llama") == []
    assert adapter_cfg["base_model_name_or_path"] == "tiny-random-llama"
    assert set(adapter_cfg["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert report["config"]["r"] == 8 and report["metrics"]["steps"] == 6
    assert [s for s, _ in report["metrics"]["eval_loss"]] == [3, 6]
    assert 0 < report["params"]["share"] < 0.05 and report["metrics"]["tokens_per_s"] > 0
    assert report["metrics"]["peak_rss_mb"] > 0 and report["metrics"]["wall_seconds"] > 0


# ---------------------------------------------------------------- masking


CONVERSATIONS = {
    "system+user": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ],
    "no system": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4, of course."}],
    "multi-turn": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "name a colour"},
        {"role": "assistant", "content": '{"colour": "red"}'},
    ],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_labels_cover_only_the_final_answer_and_end_of_turn(tok, name):
    messages = CONVERSATIONS[name]
    ex, status = encode(tok, messages, max_len=512, overlong="skip")
    labelled = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE]
    assert status == "ok"
    assert tok.decode(labelled) == messages[-1]["content"] + "<|im_end|>"
    assert [lab for lab in ex.labels if lab != IGNORE] == labelled  # labels are the tokens themselves
    first = ex.labels.index(labelled[0])
    assert all(lab == IGNORE for lab in ex.labels[:first])  # the prompt, earlier answers included, is masked


@pytest.mark.parametrize("overlong,kept,message", [("skip", 8, "0 truncated, 2 skipped"),
                                                   ("truncate", 10, "2 truncated, 0 skipped")])  # fmt: skip
def test_overlong_examples_are_counted_not_silently_dropped(tmp_path, overlong, kept, message):
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "done " * 40}]}
    data = write_jsonl(tmp_path / "mixed.jsonl", [chat(i) for i in range(8)] + [long, long])
    logs = []
    run = setup(tiny(tmp_path, data, max_len=40, eval_fraction=0.0, overlong=overlong), log=logs.append)
    assert run.data.report["overlong_train"] == 2
    assert f"2 train examples are longer than max_len=40: {message}" in logs
    assert len(run.data.train) == kept
    assert max(len(e.input_ids) for e in run.data.train) <= 40


def test_a_prompt_longer_than_max_len_is_skipped_even_when_truncating(tmp_path):
    long = {"messages": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "x"}]}
    data = write_jsonl(tmp_path / "mixed.jsonl", [chat(0), long])
    run = setup(tiny(tmp_path, data, max_len=40, eval_fraction=0.0, overlong="truncate"), log=lambda _: None)
    assert (run.data.report["skipped_train"], len(run.data.train)) == (1, 1)


# ---------------------------------------------------------------- batches


def test_batches_cover_every_example_once_and_group_lengths(tmp_path, data_file):
    cfg = tiny(tmp_path, data_file, batch_size=4)
    lengths = [10 + (i * 37) % 200 for i in range(128)]
    batches = epoch_batches(lengths, cfg, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(128))
    assert epoch_batches(lengths, cfg, 0) == batches and epoch_batches(lengths, cfg, 1) != batches

    def padding(bs):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in bs)

    random_batches = [list(range(i, i + 4)) for i in range(0, 128, 4)]
    assert padding(batches) < padding(random_batches) / 4


def test_balance_gives_a_rare_verdict_as_large_a_share_of_each_epoch_as_the_common_one(tmp_path):
    def row(i: int, verdict: str) -> dict:
        answer = json.dumps({"verdict": verdict, "id": i})
        return {"messages": [{"role": "user", "content": f"claim {i}"}, {"role": "assistant", "content": answer}]}

    data = write_jsonl(tmp_path / "skewed.jsonl", [row(i, "reject" if i % 10 == 0 else "approve") for i in range(100)])
    run = setup(tiny(tmp_path, data, balance="verdict", eval_fraction=0.0), log=lambda _: None)
    assert run.data.report["balance"] == {"approve": 90, "reject": 10}
    drawn = [run.data.train[i].group for e in range(3) for b in epoch_batches(run.lengths, run.cfg, e, run.weights)
             for i in b]  # fmt: skip
    assert len(drawn) == 300 and 0.35 < drawn.count("reject") / 300 < 0.65  # 10 % of the data, about half the draws
    plain = setup(tiny(tmp_path, data, eval_fraction=0.0), log=lambda _: None)
    assert plain.weights is None and "balance" not in plain.data.report


def test_informative_tokens_are_where_the_training_answers_part_ways():
    answers = [[1, 2, 3, 9], [1, 2, 4, 9], [1, 5, 9]]  # all start with 1; then 2 or 5; after 1 2, then 3 or 4
    assert dataset.informative(answers) == [[False, True, True, False], [False, True, True, False],
                                            [False, True, False]]  # fmt: skip
    assert dataset.informative([[7, 8], [7, 8]]) == [[False, False], [False, False]]  # one answer: nothing to learn


def test_informative_weight_weighs_the_verdict_not_the_json_around_it(tmp_path, tok):
    def row(i: int, verdict: str) -> dict:
        answer = json.dumps({"verdict": verdict, "flags": []})
        return {"messages": [{"role": "user", "content": f"claim {i}"}, {"role": "assistant", "content": answer}]}

    rows = [row(i, "reject" if i % 3 == 0 else "approve") for i in range(12)]
    data = write_jsonl(tmp_path / "verdicts.jsonl", rows)
    run = setup(tiny(tmp_path, data, bf16="false", eval_fraction=0.0, informative_weight=5.0), log=lambda _: None)
    for ex, r in zip(run.data.train, rows, strict=True):
        heavy = [t for t, w in zip(ex.labels, ex.weights, strict=True) if w == 5.0]
        word, verdict = tok.decode(heavy).strip(' "'), json.loads(r["messages"][1]["content"])["verdict"]
        assert len(heavy) == 1 and word and verdict.startswith(word)  # the verdict's first token, nothing else
    assert run.data.report["informative_tokens"] == 12
    batch = dataset.collate(run.data.train, run.pad_id)
    with torch.no_grad():
        per_token = lora.loss_sum(run.model, {k: v for k, v in batch.items() if k != "weights"})
        weighted = lora.loss_sum(run.model, batch)
        keep = batch["labels"][:, 1:] != dataset.IGNORE
        hidden = run.model.get_base_model()(input_ids=batch["input_ids"]).logits[:, :-1][keep].float()
        each = torch.nn.functional.cross_entropy(hidden, batch["labels"][:, 1:][keep], reduction="none")
    expected = (each * batch["weights"][:, 1:][keep]).sum()
    assert torch.allclose(weighted, expected, rtol=1e-4) and not torch.allclose(weighted, per_token, rtol=1e-3)
    assert lora.label_weight(batch) == float(batch["weights"][:, 1:][keep].sum()) > lora.n_labels(batch)
    assert lora.label_weight(dataset.collate(setup(tiny(tmp_path, data, eval_fraction=0.0), log=lambda _: None)
                                             .data.train, run.pad_id)) == lora.n_labels(batch)  # fmt: skip


def test_token_budget_batches_stay_under_budget(tmp_path, data_file):
    cfg = tiny(tmp_path, data_file, batch_tokens=600, max_len=512)
    lengths = [10 + (i * 37) % 200 for i in range(64)]
    batches = epoch_batches(lengths, cfg, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(64))
    assert all(len(b) * max(lengths[i] for i in b) <= 600 for b in batches)


def test_loss_at_label_positions_equals_the_masked_full_forward(tmp_path):
    rows = [chat(i) for i in range(3)] + [{"prompt": "a much longer prompt " * 5, "completion": "ok"}]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    run = setup(tiny(tmp_path, data, bf16="false", eval_fraction=0.0), log=lambda _: None)
    batch = dataset.collate(run.data.train, run.pad_id)
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    with torch.no_grad():
        sparse = lora.loss_sum(run.model, batch, logits_at_labels=True) / lora.n_labels(batch)
        full = lora.loss_sum(run.model, batch, logits_at_labels=False) / lora.n_labels(batch)
        reference = run.model(**batch).loss  # transformers' own loss, with the attention mask
    assert torch.allclose(sparse, reference, rtol=1e-5) and torch.allclose(full, reference, rtol=1e-5)


def test_a_shared_system_prompt_computed_once_gives_the_same_loss_and_gradients(tmp_path):
    system = "You are a careful assistant for the shipping desk. Repeat the word you are given, exactly once."
    rows = [chat(i) for i in range(4)]
    for i, row in enumerate(rows):
        row["messages"][0]["content"] = system
        row["messages"][1]["content"] += " please" * i  # different lengths: the batch is padded
    data = write_jsonl(tmp_path / "sys.jsonl", rows)
    run = setup(tiny(tmp_path, data, bf16="false", eval_fraction=0.0), log=lambda _: None)
    batch = dataset.collate(run.data.train, run.pad_id)
    prefix = lora.shared_prefix_len(batch)
    assert prefix >= lora.MIN_SHARED_PREFIX  # the shared path really runs
    assert (batch["labels"][:, : prefix + 1] == dataset.IGNORE).all()  # and never swallows a scored token

    def loss_and_grads(share: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        run.model.zero_grad()
        loss = lora.loss_sum(run.model, batch, share_prefix=share)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in run.model.parameters() if p.requires_grad]

    shared, shared_grads = loss_and_grads(True)
    plain, plain_grads = loss_and_grads(False)
    assert torch.allclose(shared, plain, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in plain_grads)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(shared_grads, plain_grads, strict=True))


def test_same_seed_same_lora_init_different_seed_different(tmp_path, data_file):
    def lora_a(seed):
        run = setup(tiny(tmp_path, data_file, seed=seed), log=lambda _: None)
        return next(p.detach().clone() for n, p in run.model.named_parameters() if "lora_A" in n)

    assert torch.equal(lora_a(1), lora_a(1))
    assert not torch.equal(lora_a(1), lora_a(2))


# ---------------------------------------------------------------- exact resume


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({}, id="plain"),
        # 22 train examples / 2 per batch = 11 batches an epoch; 10 steps x 2 micro-batches cross into epoch 2.
        pytest.param({"max_steps": 10, "dropout": 0.1, "grad_accum": 2, "batch_size": 2}, id="epochs+dropout+accum"),
    ],
)
def test_resume_reproduces_an_uninterrupted_run(tmp_path, data_file, extra):
    steps = extra.get("max_steps", 6)
    straight = train(tiny(tmp_path / "a", data_file, **extra), log=lambda _: None)
    cfg = tiny(tmp_path / "b", data_file, save_every=2, **extra)
    train(cfg, log=lambda _: None, stop_after=steps // 2)
    assert not (tmp_path / "b" / "out" / "adapter_model.safetensors").exists()  # stopped before the end
    resumed = train(tiny(tmp_path / "b", data_file, save_every=2, resume=True, **extra), log=lambda _: None)
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"resume max abs weight diff: {diff}")
    assert a.keys() == b.keys() and diff < 1e-6
    assert not (resumed / "checkpoints").exists()  # a finished run leaves only the adapter
    losses = [
        json.loads((d / "lorafleet_train.json").read_text())["metrics"]["train_loss"] for d in (straight, resumed)
    ]
    assert losses[0] == losses[1]


def test_resume_refuses_a_changed_config(tmp_path, data_file):
    train(tiny(tmp_path, data_file, save_every=2), log=lambda _: None, stop_after=2)
    with pytest.raises(TrainError, match="config fields changed.*lr"):
        train(tiny(tmp_path, data_file, save_every=2, resume=True, lr=5e-3), log=lambda _: None)


# ---------------------------------------------------------------- bad input fails before training

BAD_INPUT = [
    # (case, jsonl lines or None for the good file, config overrides, error type, message pattern)
    ("malformed line", [chat(0), "{not json"], {}, DataError, r"train\.jsonl:2: bad JSON"),
    ("empty file", [], {}, DataError, "no examples"),
    (
        "missing assistant",
        [chat(0), {"messages": [{"role": "user", "content": "hi"}]}],
        {},
        DataError,
        r"train\.jsonl:2: .*assistant",
    ),
    ("unknown base model", None, {"base_model": "no-such-model"}, TrainError, "unknown model 'no-such-model'"),
]


@pytest.mark.parametrize("case,lines,overrides,error,pattern", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_fails_before_the_model_loads(
    tmp_path, data_file, monkeypatch, case, lines, overrides, error, pattern
):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(trainer, "build_model", no_model)
    data = data_file if lines is None else write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(error, match=pattern):
        train(tiny(tmp_path, data, **overrides), log=lambda _: None)


BAD_CONFIG = [
    ({"r": 12}, "r=12 cannot be served by vLLM"),
    ({"r": 32}, "r=32 is greater than max_serving_rank=16"),
    ({"max_steps": "three"}, "max_steps: must be an integer, got 'three'"),
    ({"lr": -1}, "lr: must be > 0, got -1"),
    ({"bf16": "maybe"}, "bf16: must be 'auto', 'true' or 'false', got 'maybe'"),
    ({"data": ""}, "exactly one of `task`"),
    ({"task": "contract"}, "exactly one of `task`"),
    ({"no_such_key": 1}, "no_such_key: unknown field; valid keys: name, base_model"),
]


@pytest.mark.parametrize(
    "overrides,pattern", BAD_CONFIG, ids=[",".join(f"{k}={v}" for k, v in o.items()) for o, _ in BAD_CONFIG]
)
def test_bad_config_is_refused_naming_the_field(tmp_path, data_file, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        tiny(tmp_path, data_file, **overrides)


def test_overrides_are_coerced_to_the_field_types(tmp_path):
    cfg = load_config("tiny", ["max_steps=3", "lr=5e-4", "bf16=true", "target_modules=q_proj,v_proj", "progress=no"])
    assert (cfg.max_steps, cfg.lr, cfg.bf16, cfg.target_modules, cfg.progress) == (
        3,
        5e-4,
        "true",
        ["q_proj", "v_proj"],
        False,
    )
    assert cfg.base_model == "tiny-random-llama"  # from the YAML file


def test_top_layers_adapts_only_the_top_layers_and_stays_servable(tmp_path, data_file):
    run = setup(tiny(tmp_path, data_file, top_layers=1), log=lambda _: None)
    top = run.model.get_base_model().config.num_hidden_layers - 1
    trainable = [n for n, p in run.model.named_parameters() if p.requires_grad]
    assert trainable and all(f".layers.{top}." in n for n in trainable), trainable
    out = run.fit()
    assert json.loads((out / "adapter_config.json").read_text())["layers_to_transform"] == [top]
    assert validate_adapter(out, base_model="tiny-random-llama") == []


def test_top_layers_beyond_the_model_is_refused(tmp_path, data_file):
    with pytest.raises(TrainError, match=r"top_layers=99 but llama has \d+ layers"):
        setup(tiny(tmp_path, data_file, top_layers=99), log=lambda _: None)


def test_unservable_target_module_fails_before_training(tmp_path, data_file):
    with pytest.raises(TrainError, match=r"target_modules \['lm_head'\] cannot be served by vLLM"):
        setup(tiny(tmp_path, data_file, target_modules="q_proj,lm_head"), log=lambda _: None)


# ---------------------------------------------------------------- CLI


def test_cli_run_tiny_writes_adapter_and_report(tmp_path, capsys):
    from lorafleet.cli import main

    out = tmp_path / "adapter"
    rc = main(["train", "run", "tiny.yaml", "max_steps=3", f"output_dir={out}", "progress=false"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    report = json.loads((out / "lorafleet_train.json").read_text())
    assert report["metrics"]["steps"] == 3 and report["config"]["task"] == "contract"
    assert f"adapter: {out}" in capsys.readouterr().out


def test_cli_run_reports_a_bad_override_without_traceback(tmp_path, capsys):
    from lorafleet.cli import main

    assert main(["train", "run", "tiny.yaml", "r=12"]) == 2
    assert "r=12 cannot be served by vLLM" in capsys.readouterr().err


# ---------------------------------------------------------------- real model


@pytest.mark.slow
def test_short_real_smollm2_run_produces_a_servable_adapter(tmp_path):
    overrides = {
        "n": 80,
        "eval_n": 8,
        "max_steps": 20,
        "batch_size": 4,
        "eval_every": 0,
        "save_every": 0,
        "output_dir": str(tmp_path / "contract"),
        "progress": False,
    }
    out = train(load_config("contract", overrides), log=lambda _: None)
    assert validate_adapter(out, base_model="smollm2-135m-instruct", max_rank=16) == []
    report = json.loads((out / "lorafleet_train.json").read_text())
    losses = [loss for _, loss in report["metrics"]["train_loss"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 / 2  # a real model picks up the label format in 20 steps
