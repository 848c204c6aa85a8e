"""`TrainConfig`: every knob of a LoRA run, typed, with a default and a help string, checked at the edge.

A run is a YAML file plus `key=value` overrides (`lorafleet train run tiny.yaml max_steps=3`); each value is
coerced to its field's type and every problem names the field and says what to fix.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorafleet.core.errors import ConfigError  # noqa: F401  (re-exported: callers catch it from here)
from lorafleet.core.vllm import LORA_RANKS

CONFIGS_DIR = Path(__file__).parent / "configs"


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    # what to train
    name: str = _f("", "run name; default: the task name or the data file's stem")
    base_model: str = _f("smollm2-135m-instruct", "lorafleet model id or a local HF folder")
    task: str = _f("", "built-in task (train.tasks) that generates the data; or give `data`")
    n: int = _f(500, "number of training examples generated from `task`")
    data: str = _f("", "train JSONL (chat messages or prompt/completion); or give `task`")
    eval_data: str = _f("", "eval JSONL; default: the task's eval split, or `eval_fraction` of `data`")
    eval_n: int = _f(100, "number of eval examples generated from the task's eval split")
    eval_fraction: float = _f(0.1, "share of `data` held out for eval loss when no `eval_data` is given")
    output_dir: str = _f("", "where the adapter goes; default adapters/<name>")
    seed: int = _f(0, "seeds data order, task generation and LoRA init")
    # the adapter
    r: int = _f(8, f"LoRA rank; vLLM serves {LORA_RANKS} up to `max_serving_rank`")
    alpha: int = _f(16, "LoRA alpha; the update is scaled by alpha / r (alpha = 2r is common)")
    dropout: float = _f(0.0, "dropout on the LoRA input")
    target_modules: list[str] = _f([], "module names to adapt; empty = every nn.Linear except lm_head")
    top_layers: int = _f(
        0, "adapt only the top N decoder layers (0 = all): backward stops below them, ~1.5x faster at N/2"
    )
    max_serving_rank: int = _f(16, "the --max-lora-rank of the vLLM server that will serve this adapter")
    # optimisation
    lr: float = _f(2e-4, "peak learning rate (LoRA wants ~10x the full fine-tuning rate)")
    weight_decay: float = _f(0.0, "AdamW weight decay on the LoRA weights")
    epochs: float = _f(1.0, "passes over the training data (ignored when max_steps > 0)")
    max_steps: int = _f(0, "optimizer steps; 0 = derive from epochs")
    batch_size: int = _f(8, "examples per micro-batch (when batch_tokens is 0)")
    batch_tokens: int = _f(0, "if > 0: micro-batches hold up to this many padded tokens instead of batch_size")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    warmup: float = _f(0.1, "linear warmup: a share of the steps if < 1, else a step count")
    schedule: str = _f("cosine", "decay after warmup: cosine | linear | constant")
    max_grad_norm: float = _f(1.0, "gradient clipping norm; 0 = off")
    max_len: int = _f(512, "longest example in tokens; longer ones are handled per `overlong` and counted")
    overlong: str = _f("skip", "examples longer than max_len: skip | truncate (both are reported)")
    # speed
    bf16: str = _f("auto", "base weights in bf16 + autocast: auto (if the CPU has AVX512-BF16/AMX) | true | false")
    logits_at_labels: bool = _f(True, "apply the LM head only where the loss is taken (big vocab => big saving)")
    share_prefix: bool = _f(True, "run the prompt prefix all rows of a batch share (the system prompt) once per batch")
    threads: int = _f(0, "torch threads; 0 = torch's default")
    # bookkeeping
    eval_every: int = _f(0, "eval loss every N steps; 0 = only at the end")
    save_every: int = _f(0, "checkpoint every N steps (for resume); 0 = no checkpoints")
    keep_checkpoints: int = _f(2, "how many of the newest checkpoints to keep")
    resume: bool = _f(False, "continue from the newest checkpoint in output_dir/checkpoints")
    progress: bool = _f(True, "show a tqdm progress bar")

    def __post_init__(self) -> None:
        _check_types(self)
        self._check_source()
        self._check_adapter()
        self._check_optim()

    def _check_source(self) -> None:
        if bool(self.task) == bool(self.data):
            raise ConfigError("give exactly one of `task` (a built-in task) or `data` (a JSONL path)")
        _positive(self, "n", "eval_n", "max_len")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        _choice(self, "overlong", ("skip", "truncate"))

    def _check_adapter(self) -> None:
        if self.r not in LORA_RANKS:
            raise ConfigError(f"r={self.r} cannot be served by vLLM: use one of {', '.join(map(str, LORA_RANKS))}")
        if self.max_serving_rank not in LORA_RANKS:
            raise ConfigError(f"max_serving_rank must be one of {', '.join(map(str, LORA_RANKS))}")
        if self.r > self.max_serving_rank:
            raise ConfigError(
                f"r={self.r} is greater than max_serving_rank={self.max_serving_rank}: vLLM would refuse the adapter; "
                "lower r or raise max_serving_rank (and the server's --max-lora-rank)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        _positive(self, "alpha")
        _non_negative(self, "top_layers")

    def _check_optim(self) -> None:
        _positive(self, "lr", "epochs", "batch_size", "grad_accum", "keep_checkpoints")
        _non_negative(self, "max_steps", "batch_tokens", "warmup", "max_grad_norm", "eval_every", "save_every")
        _non_negative(self, "threads", "weight_decay")
        _choice(self, "schedule", ("cosine", "linear", "constant"))
        _choice(self, "bf16", ("auto", "true", "false"))
        if self.batch_tokens and self.batch_tokens < self.max_len:
            raise ConfigError(f"batch_tokens={self.batch_tokens} must be >= max_len={self.max_len} or 0")

    @property
    def run_name(self) -> str:
        return self.name or self.task or Path(self.data).stem

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(cfg, name)}")


def _non_negative(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")


def _choice(cfg: TrainConfig, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(cfg, name) not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")


def field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _check_types(cfg: TrainConfig) -> None:
    for name, typ in field_types().items():
        setattr(cfg, name, coerce(name, getattr(cfg, name), typ))


def coerce(name: str, value: Any, typ: Any) -> Any:
    """`value` (from YAML or a `key=value` string) as `typ`, or ConfigError naming the field."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
    elif typ is int and not isinstance(value, bool):
        if isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif typ is str:
        # YAML reads `bf16: true` as a bool; the field takes the words.
        return str(value).lower() if isinstance(value, bool) else ("" if value is None else str(value))
    elif typing.get_origin(typ) is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    raise ConfigError(f"{name} must be {getattr(typ, '__name__', typ)}, got {value!r}")


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        out[key.strip()] = value
    return out


def resolve_config_path(path: str | Path) -> Path:
    """A path as given, else a file in train/configs/ (`tiny`, `tiny.yaml`)."""
    p = Path(path)
    for cand in (p, CONFIGS_DIR / p.name, CONFIGS_DIR / f"{p.name}.yaml"):
        if cand.is_file():
            return cand
    known = ", ".join(sorted(c.name for c in CONFIGS_DIR.glob("*.yaml")))
    raise ConfigError(f"config file {path} not found (built-in configs: {known})")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None) -> TrainConfig:
    """A YAML file (optional) with overrides applied on top; unknown keys are refused with the valid ones listed."""
    values: dict[str, Any] = {}
    if path is not None:
        file = resolve_config_path(path)
        try:
            values = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{file}: not valid YAML: {e}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{file}: expected a mapping of field: value")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    values.update(overrides or {})
    unknown = sorted(set(values) - set(field_types()))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(field_types())}")
    return TrainConfig(**values)


def describe() -> str:
    """One line per field: name, type, default, help (for `--help`)."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {f.name}={default!r}: {f.metadata['help']}")
    return "\n".join(lines)
