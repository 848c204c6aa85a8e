"""Is an adapter servable by vLLM, and fold it into its base for full-speed serving.

`validate_adapter` repeats, without starting vLLM, the checks vLLM makes when it loads a LoRA adapter
(vllm/lora/peft_helper.py `validate_legal`, vllm/lora/lora_model.py `from_local_checkpoint`) plus shape checks
against the base model, and returns every problem at once. The trainer calls it before it reports success.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from lorafleet.core.errors import UserError
from lorafleet.core.vllm import BASE_CHANGING_INITS, LORA_RANKS, supported_modules
from train.models import ModelError, model_path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MERGE_FILE = "lorafleet_merge.json"
MAX_LISTED = 6
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<ab>lora_A|lora_B)\.weight$")


class AdapterError(UserError):
    """The adapter would be refused by vLLM or does not fit its base; the message lists every problem."""


def _read_config(adapter: Path, problems: list[str]) -> dict | None:
    file = adapter / CONFIG_FILE
    if not file.is_file():
        problems.append(f"{CONFIG_FILE} is missing from {adapter}")
        return None
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{CONFIG_FILE} is not valid JSON: {e}")
        return None
    if not isinstance(cfg, dict):
        problems.append(f"{CONFIG_FILE} must hold a JSON object")
        return None
    return cfg


def _config_problems(cfg: dict, max_rank: int) -> list[str]:
    out = []
    if cfg.get("peft_type") != "LORA":
        out.append(f"peft_type is {cfg.get('peft_type')!r}; vLLM serves only LORA adapters")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            out.append(f"{CONFIG_FILE} lacks the required field {key!r}")
    ranks = [cfg.get("r"), *(cfg.get("rank_pattern") or {}).values()]
    for r in ranks:
        if r not in LORA_RANKS:
            out.append(f"rank r={r!r} is not one vLLM serves: use one of {', '.join(map(str, LORA_RANKS))}")
        elif r > max_rank:
            out.append(f"rank r={r} is greater than the server's max LoRA rank {max_rank}")
    if cfg.get("modules_to_save"):
        out.append(f"modules_to_save={cfg['modules_to_save']}: vLLM only supports modules_to_save being None")
    if cfg.get("use_dora"):
        out.append("use_dora is true: vLLM does not support DoRA (merge it, or train plain LoRA)")
    if cfg.get("bias", "none") != "none":
        out.append(f"bias={cfg['bias']!r}: vLLM supports only bias='none'")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().split("_")[0] in BASE_CHANGING_INITS:
        out.append(f"init_lora_weights={init!r} changes the base weights; vLLM refuses it")
    for key in ("layer_replication", "alora_invocation_tokens", "use_qalora", "lora_bias"):
        if cfg.get(key):
            out.append(f"{key} is set: vLLM does not support it")
    return out


def _base_path(recorded: str | None, given: str | None, problems: list[str]) -> Path | None:
    """The base folder to check shapes against, and whether the recorded base matches the given one."""

    if not recorded:
        problems.append("base_model_name_or_path is not recorded in adapter_config.json")
    paths = {}
    for what, ref in (("recorded", recorded), ("given", given)):
        if ref:
            try:
                paths[what] = model_path(ref)
            except ModelError as e:
                if what == "given":
                    problems.append(f"base model: {e}")
    if "recorded" in paths and "given" in paths and paths["recorded"].resolve() != paths["given"].resolve():
        problems.append(f"adapter was trained on {recorded!r}, not on the given base {given!r}")
    if given and "given" not in paths:
        return None
    found = paths.get("given") or paths.get("recorded")
    return found if found and (found / "config.json").is_file() else None


def _base_shapes(base: Path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """(architecture, {weight name: shape}) read from the safetensors headers: no weights are loaded."""
    from safetensors import safe_open

    arch = (json.loads((base / "config.json").read_text()).get("architectures") or ["?"])[0]
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(base.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return arch, shapes


def _tensor_problems(adapter: Path, r: int | None, arch: str | None, base_shapes: dict | None) -> list[str]:
    from safetensors import safe_open

    file = adapter / WEIGHTS_FILE
    if not file.is_file():
        return [f"{WEIGHTS_FILE} is missing from {adapter} (vLLM: doesn't contain tensors)"]
    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        return [f"{WEIGHTS_FILE} cannot be read: {e}"]
    if not shapes:
        return [f"{WEIGHTS_FILE} holds no tensors"]
    out: list[str] = []
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in sorted(shapes.items()):
        m = LORA_KEY.match(key)
        if not m:
            out.append(f"tensor {key!r} is not a LoRA A/B weight; vLLM refuses extra tensors")
            continue
        pairs.setdefault(m["module"], {})[m["ab"]] = shape
    allowed = supported_modules(arch or "")
    bad = sorted({mod.rsplit(".", 1)[-1] for mod in pairs} - allowed)
    if bad:
        out.append(
            f"target modules {bad} are not supported by vLLM for {arch or 'this model'}: "
            f"expected target modules in {sorted(allowed)}"
        )
    pair_problems = [p for module, ab in sorted(pairs.items()) for p in _pair_problems(module, ab, r, base_shapes)]
    if len(pair_problems) > MAX_LISTED:  # a wrong base repeats the same mismatch in every layer
        pair_problems = [*pair_problems[:MAX_LISTED], f"... and {len(pair_problems) - MAX_LISTED} more like these"]
    return out + pair_problems


def _pair_problems(module: str, ab: dict, r: int | None, base_shapes: dict | None) -> list[str]:
    if set(ab) != {"lora_A", "lora_B"}:
        return [f"{module}: has {sorted(ab)} but needs both lora_A and lora_B"]
    a, b = ab["lora_A"], ab["lora_B"]
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        return [f"{module}: lora_A {list(a)} and lora_B {list(b)} do not form a low-rank pair"]
    if r is not None and a[0] != r:
        return [f"{module}: rank {a[0]} in the weights but r={r} in {CONFIG_FILE}"]
    if base_shapes is None:
        return []
    weight = base_shapes.get(f"{module}.weight")
    if weight is None:
        return [f"{module}: no such linear layer in the base model"]
    if (b[0], a[1]) != tuple(weight):
        return [f"{module}: adapter maps {a[1]} -> {b[0]} but the base layer is {weight[1]} -> {weight[0]}"]
    return []


def validate_adapter(adapter_dir: str | Path, base_model: str | None = None, max_rank: int = 16) -> list[str]:
    """Every reason vLLM would refuse this adapter (or it would not fit `base_model`); empty means servable.

    Args:
        adapter_dir: folder with adapter_config.json and adapter_model.safetensors.
        base_model: lorafleet id or folder it will be served on; default: the one recorded in the adapter.
        max_rank: the server's --max-lora-rank.
    """
    adapter = Path(adapter_dir)
    if not adapter.is_dir():
        return [f"{adapter} is not a folder"]
    problems: list[str] = []
    cfg = _read_config(adapter, problems)
    arch, base_shapes, r = None, None, None
    if cfg is not None:
        problems += _config_problems(cfg, max_rank)
        r = cfg.get("r") if isinstance(cfg.get("r"), int) else None
        base = _base_path(cfg.get("base_model_name_or_path"), base_model, problems)
        if base is not None:
            arch, base_shapes = _base_shapes(base)
    problems += _tensor_problems(adapter, r, arch, base_shapes)
    return problems


def check_adapter(adapter_dir: str | Path, base_model: str | None = None, max_rank: int = 16) -> None:
    """Raise AdapterError listing every problem `validate_adapter` finds."""
    problems = validate_adapter(adapter_dir, base_model=base_model, max_rank=max_rank)
    if problems:
        raise AdapterError(f"adapter {adapter_dir} would be refused:\n  - " + "\n  - ".join(problems))


def recorded_base(adapter_dir: str | Path) -> Path:
    """The base model folder an adapter records (its lorafleet id or absolute path)."""

    cfg = json.loads((Path(adapter_dir) / CONFIG_FILE).read_text())
    return model_path(cfg["base_model_name_or_path"])


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Write base + adapter as one standalone HF model folder (with tokenizer and chat template).

    The merge runs in fp32 (bf16 additions lose the small LoRA update, peft#1977) and the result is cast to
    `dtype`. The folder appears whole or not at all.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_adapter(adapter_dir, max_rank=512)  # serving rank limits do not apply to a merged model
    base = recorded_base(adapter_dir)
    out = Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged = merged.to(getattr(torch, dtype))
    merged.config.dtype = getattr(torch, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        meta = {"adapter": str(Path(adapter_dir).resolve()), "base": str(base), "dtype": dtype}
        (tmp / MERGE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def random_adapter(
    base: str | Path, out: str | Path, seed: int = 0, r: int = 8, std: float = 0.02, layers: list[int] | None = None
) -> Path:
    """A LoRA adapter of `base` with random non-zero A and B, N(0, std), on every linear layer vLLM adapts.

    What benches and tests serve when what the adapter learned does not matter: std 0.02 changes the model
    clearly yet keeps its outputs sane; larger values make its answers differ from the base's for sure.
    `layers` limits it to those decoder layers (PEFT layers_to_transform). The same arguments give the same
    weights.
    """
    # Here, not at the top: validate_adapter (which the gateway imports) needs neither torch nor PEFT.
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    arch = (model.config.architectures or [""])[0]
    targets = sorted(supported_modules(arch))  # LLAMA_STYLE for every architecture lorafleet serves
    lora = LoraConfig(r=r, lora_alpha=16, target_modules=targets, layers_to_transform=layers, init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, std)
    peft_model.save_pretrained(out)
    return Path(out)
