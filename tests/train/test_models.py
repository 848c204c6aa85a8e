"""Model import: known ids, checks, atomic writes, and the errors a user sees."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from lorafleet.cli import main
from train import models


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))
    return tmp_path


def _leftovers(home):
    d = home / "models"
    return sorted(p.name for p in d.iterdir() if p.name != ".cache") if d.exists() else []


def test_pull_unknown_id_lists_known_ids(home, capsys):
    assert main(["models", "pull", "nosuch"]) == 2
    err = capsys.readouterr().err
    for model_id in models.SPECS:
        assert model_id in err
    assert _leftovers(home) == []


@pytest.mark.slow
def test_truncated_gguf_gives_clear_error_and_leaves_nothing(home, monkeypatch, tmp_path_factory):
    src = models._smollm2_gguf()
    bad = tmp_path_factory.mktemp("gguf") / src.name
    with open(src, "rb") as f:
        bad.write_bytes(f.read(5_000_000))  # header and part of the tensor data only
    spec = dataclasses.replace(models.SPECS["smollm2-135m-instruct"], build=lambda out: models.convert_gguf(bad, out))
    monkeypatch.setitem(models.SPECS, "smollm2-135m-instruct", spec)
    with pytest.raises(models.ModelError, match="cannot read GGUF file"):
        models.pull("smollm2-135m-instruct")
    assert _leftovers(home) == []


def test_failed_check_deletes_result(home, monkeypatch, tiny_model_path):
    # A build that "succeeds" but produces a model failing the perplexity bound must leave nothing.
    def build(out):
        shutil.copytree(tiny_model_path, out, dirs_exist_ok=True)
        (out / models.META_FILE).unlink()

    spec = dataclasses.replace(models.SPECS["tiny-random-llama"], max_ppl=100.0, build=build)
    monkeypatch.setitem(models.SPECS, "tiny-random-llama", spec)
    with pytest.raises(models.ModelError, match="perplexity"):
        models.pull("tiny-random-llama")
    assert _leftovers(home) == []


def test_interrupted_pull_leaves_no_half_model(home, monkeypatch):
    def build(out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    spec = dataclasses.replace(models.SPECS["tiny-random-llama"], build=build)
    monkeypatch.setitem(models.SPECS, "tiny-random-llama", spec)
    with pytest.raises(KeyboardInterrupt):
        models.pull("tiny-random-llama")
    assert _leftovers(home) == []


def test_imported_models_pass_their_checks(smollm2_path):
    meta = json.loads((smollm2_path / models.META_FILE).read_text())
    assert meta["perplexity"] < models.SPECS["smollm2-135m-instruct"].max_ppl
    assert "Paris" in meta["answer"]
    assert 130e6 < meta["params"] < 140e6


def test_gemma_tokenizer_adds_bos():
    from transformers import AutoTokenizer

    path = models.model_path("gemma-3-270m")
    meta = json.loads((path / models.META_FILE).read_text())
    tok = AutoTokenizer.from_pretrained(path)
    assert tok("Hello").input_ids[0] == tok.bos_token_id
    assert meta["perplexity"] < 40  # ~380 without BOS


def test_model_path_accepts_local_folder_and_rejects_junk(tiny_model_path, tmp_path):
    assert models.model_path(str(tiny_model_path)) == tiny_model_path.resolve()
    with pytest.raises(models.ModelError, match="known ids"):
        models.model_path(str(tmp_path))


def test_list_shows_imported(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "yes" in out


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no_config", "no config.json"),
        ("bad_json", "not valid JSON"),
        ("no_weights", "no weights"),
        ("no_tokenizer", "no tokenizer"),
        ("no_arch", "no 'architectures'"),
        ("unsupported_arch", "not supported by this vLLM"),
    ],
)
def test_vllm_loadable_check_names_the_reason(tiny_model_path, tmp_path, breakage, message):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_path, folder)
    cfg = json.loads((folder / "config.json").read_text())
    if breakage == "no_config":
        (folder / "config.json").unlink()
    elif breakage == "bad_json":
        (folder / "config.json").write_text("{not json")
    elif breakage == "no_weights":
        (folder / "model.safetensors").unlink()
    elif breakage == "no_tokenizer":
        (folder / "tokenizer.json").unlink()
    elif breakage == "no_arch":
        cfg.pop("architectures")
        (folder / "config.json").write_text(json.dumps(cfg))
    elif breakage == "unsupported_arch":
        cfg["architectures"] = ["NoSuchModelForCausalLM"]
        (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(models.ModelError, match=message):
        models.check_vllm_loadable(folder)


def test_vllm_loadable_accepts_imported_model(tiny_model_path):
    models.check_vllm_loadable(tiny_model_path)  # raises on failure
    assert (tiny_model_path / "model.safetensors").is_file()
