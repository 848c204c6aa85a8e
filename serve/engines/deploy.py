"""From a config to things on disk and processes: adapter folders, merged models, engine specs.

Adapter folders must lie inside the adapters root; a path that climbs out (`..`, an absolute path elsewhere,
a symlink, or a file in the folder that links out) is refused before any engine reads it.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
from collections import defaultdict
from pathlib import Path

from lorafleet.core import paths
from lorafleet.core.cpu import fast_bf16
from lorafleet.core.errors import UserError
from serve.config import AdapterConfig, ConfigError, EngineConfig, ServeConfig, merged_group
from serve.engines.engine import EngineSpec
from train.export import merge_adapter, validate_adapter
from train.models import model_path

log = logging.getLogger("lorafleet.serve")
HASH_FILE = "lorafleet_adapter_hash"


class AdapterPathError(UserError, ValueError):
    """An adapter path is outside the adapters root or not a folder."""


def adapters_root(cfg: ServeConfig) -> Path:
    return (Path(cfg.adapters_root).expanduser() if cfg.adapters_root else paths.adapters_dir()).resolve()


def log_dir(cfg: ServeConfig) -> Path:
    return Path(cfg.gateway.log_dir).expanduser() if cfg.gateway.log_dir else paths.runs_dir() / "serve"


def adapter_dir(root: Path, path: str | Path) -> Path:
    """The resolved adapter folder for `path` (relative to `root`, or absolute inside it)."""
    root = root.resolve()
    try:
        resolved = (root / path).resolve()  # an absolute `path` replaces root; resolve() follows every symlink
        if resolved == root or not resolved.is_relative_to(root):
            raise AdapterPathError(f"{path}: adapter folders must be inside the adapters root {root}")
        if not resolved.is_dir():
            raise AdapterPathError(f"{path}: no such adapter folder under {root}")
        for f in resolved.rglob("*"):
            if not f.resolve().is_relative_to(root):
                raise AdapterPathError(f"{path}: {f.name} links outside the adapters root")
    except AdapterPathError:
        raise
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a name too long, a symlink loop
        raise AdapterPathError(f"{str(path)[:200]!r}: not a usable adapter path ({type(e).__name__})") from None
    return resolved


def base_model_path(engine: EngineConfig) -> Path:

    return model_path(engine.model)


def check_adapter(folder: Path, engine: EngineConfig) -> list[str]:
    """What vLLM would refuse about this adapter on this engine (empty: servable)."""

    return validate_adapter(folder, base_model=str(base_model_path(engine)), max_rank=engine.max_lora_rank)


def configured_adapters(cfg: ServeConfig) -> dict[str, Path]:
    """Folders of the configured LoRA adapters, checked; optional ones that are missing are skipped."""
    root, found, problems = adapters_root(cfg), {}, []
    for i, a in enumerate(cfg.adapters):
        if a.mode != "lora":
            continue
        try:
            folder = adapter_dir(root, a.path)
        except AdapterPathError as e:
            if a.optional and not (root / a.path).exists():
                log.warning("adapter %s skipped: %s (train it, e.g. `lorafleet train run ...`)", a.name, e)
                continue
            problems.append(f"adapters[{i}].path: {e}")
            continue
        issues = check_adapter(folder, cfg.engine_for(a.base))
        if issues:
            problems.append(f"adapters[{i}]: {folder} would be refused by vLLM: " + "; ".join(issues))
            continue
        found[a.name] = folder
    if problems:
        raise ConfigError("adapters are not servable:\n  " + "\n  ".join(problems))
    return found


def folder_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def ensure_merged(cfg: ServeConfig, adapter: AdapterConfig) -> Path:
    """models/merged-<adapter>/: base + adapter folded into one model, re-merged only when the adapter changed."""

    source = adapter_dir(adapters_root(cfg), adapter.path)
    out, digest = paths.models_dir() / merged_group(adapter.name), folder_hash(source)
    marker = out / HASH_FILE
    if marker.is_file() and marker.read_text().strip() == digest:
        return out
    log.info("merging adapter %s into its base (cached at %s)", adapter.name, out)
    merge_adapter(source, out)
    marker.write_text(digest + "\n")
    return out


GPU_MEMORY_TOTAL = 0.9  # vLLM's own default for one engine: the share all engines on a GPU may take together
GPU_FLAG = "--gpu-memory-utilization"


def gpu_count() -> int:
    """NVIDIA GPUs on this host (`nvidia-smi -L`); 0 on a CPU host."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def place_on_gpus(specs: list[EngineSpec], shares: list[float | None], gpus: int) -> None:
    """Give each engine process a GPU (round robin, so replicas land on different GPUs) and a memory share.

    vLLM takes 0.9 of a GPU's memory by default, so a second engine on that GPU cannot start: engines without a
    configured share split what the others leave of 0.9 on their GPU."""
    on: dict[int, list[int]] = defaultdict(list)
    for i, spec in enumerate(specs):
        spec.cuda_device = i % gpus
        on[spec.cuda_device].append(i)
        shares[i] = _share_in_args(spec.extra_args) or shares[i]  # a share passed in extra_args counts too
    for device, members in on.items():
        auto = [i for i in members if shares[i] is None]
        left = GPU_MEMORY_TOTAL - sum(shares[i] or 0.0 for i in members)
        if auto and left < 0.05 * len(auto):
            names = ", ".join(specs[i].name for i in members)
            raise ConfigError(
                f"GPU {device} holds {names}: the set gpu_memory_utilization shares leave {max(left, 0):.2f} of "
                f"{GPU_MEMORY_TOTAL} for {len(auto)} more; lower them or set every engine's share"
            )
        for i in members:
            if GPU_FLAG not in specs[i].extra_args:
                specs[i].gpu_memory_utilization = shares[i] if shares[i] is not None else round(left / len(auto), 3)


def _share_in_args(args: list[str]) -> float | None:
    if GPU_FLAG in args and args.index(GPU_FLAG) + 1 < len(args):
        try:
            return float(args[args.index(GPU_FLAG) + 1])
        except ValueError:
            return None
    return None


def engine_dtype(e: EngineConfig, gpus: int) -> str:
    """bf16 where it is fast (GPUs, CPUs with AVX512-BF16 or AMX), else fp32: see lorafleet.core.cpu."""
    if e.dtype != "auto":
        return e.dtype
    return "bfloat16" if gpus or fast_bf16() else "float32"


def engine_specs(cfg: ServeConfig, gpus: int | None = None) -> dict[str, EngineSpec]:
    """Specs of the engine processes lorafleet runs itself, by replica name (merged adapters included).

    `gpus`: the host's GPU count (default: ask nvidia-smi); 0 runs every engine on the CPU."""
    specs: dict[str, EngineSpec] = {}
    shares: list[float | None] = []
    gpus = gpu_count() if gpus is None else gpus
    for e in cfg.engines:
        if not e.managed:
            continue
        for i, name in enumerate(e.replica_names()):
            specs[name] = EngineSpec(
                name=name,
                model=base_model_path(e),
                port=e.port + i,
                host=e.host,
                served_name=e.public_name,
                enable_lora=e.enable_lora,
                compile_lora=e.compile_lora,
                max_lora_rank=e.max_lora_rank,
                max_loras=e.max_loras,
                max_cpu_loras=e.max_cpu_loras,
                max_model_len=e.max_model_len,
                kv_cache_gib=e.kv_cache_gib,
                dtype=engine_dtype(e, gpus),
                extra_args=list(e.extra_args),
                cpu_bind=e.cpu_bind[i] if e.cpu_bind else None,
            )
            shares.append(e.gpu_memory_utilization)
    for a in cfg.adapters:
        if a.mode == "merged" and a.port is not None:
            base, model = cfg.engine_for(a.base), ensure_merged(cfg, a)
            for i, name in enumerate(a.replica_names()):
                specs[name] = _merged_spec(a, base, model, name, a.port + i, gpus)
                shares.append(base.gpu_memory_utilization)
    if gpus:
        place_on_gpus(list(specs.values()), shares, gpus)
    return specs


def _merged_spec(a: AdapterConfig, base: EngineConfig, model: Path, name: str, port: int, gpus: int) -> EngineSpec:
    return EngineSpec(
        name=name,
        model=model,
        port=port,
        served_name=a.name,
        enable_lora=False,
        max_model_len=base.max_model_len,
        kv_cache_gib=base.kv_cache_gib,
        dtype=engine_dtype(base, gpus),
        extra_args=list(base.extra_args),
    )
