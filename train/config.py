"""`TrainConfig`: every knob of a LoRA run, typed, with a default and a help string, checked at the edge.

A run is a YAML file plus `key=value` overrides (`lorafleet train run tiny.yaml max_steps=3 lr=2e-3`), read by the
one override syntax of lorafleet.core.config; `key=null` means the field's default. Every problem names the field
and says what it accepts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from lorafleet.core.config import Strict, apply_overrides, load_yaml
from lorafleet.core.errors import ConfigError, UserError  # noqa: F401  (re-exported: callers catch it from here)
from lorafleet.core.vllm import LORA_RANKS

CONFIGS_DIR = Path(__file__).parent / "configs"

# Marks a field that changes how a run is watched or resumed, not the adapter it produces (see RUN_ONLY_FIELDS).
_RUN_ONLY: dict[str, Any] = {"run_only": True}


class TrainConfig(Strict):
    # Assignments (train.evaluate.curve_config sets max_steps) are checked like loaded values.
    model_config = ConfigDict(validate_assignment=True)

    # what to train
    name: str = Field("", description="run name; default: the task name or the data file's stem")
    base_model: str = Field("smollm2-135m-instruct", description="lorafleet model id or a local HF folder")
    task: str = Field("", description="built-in task name or task file (train.tasks) with the data; or give `data`")
    n: int = Field(500, gt=0, description="training examples taken from `task` (a task file: at most its train split)")
    data: str = Field("", description="train JSONL (chat messages or prompt/completion); or give `task`")
    eval_data: str = Field("", description="eval JSONL; default: the task's eval split, or `eval_fraction` of `data`")
    eval_n: int = Field(100, gt=0, description="eval examples taken from the task's eval split (for the eval loss)")
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of `data` held out for eval loss when no `eval_data` is given"
    )
    output_dir: str = Field("", description="where the adapter goes; default adapters/<name>")
    seed: int = Field(0, description="seeds data order, task generation and LoRA init")
    # the adapter
    r: int = Field(8, description=f"LoRA rank; vLLM serves {LORA_RANKS} up to `max_serving_rank`")
    alpha: int = Field(16, gt=0, description="LoRA alpha; the update is scaled by alpha / r (alpha = 2r is common)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] = Field(
        default_factory=list, description="module names to adapt; empty = every nn.Linear except lm_head"
    )
    top_layers: int = Field(
        0,
        ge=0,
        description="adapt only the top N decoder layers (0 = all): backward stops below them, ~1.5x faster at N/2",
    )
    max_serving_rank: int = Field(
        16, description="the --max-lora-rank of the vLLM server that will serve this adapter"
    )
    # optimisation
    lr: float = Field(2e-4, gt=0, description="peak learning rate (LoRA wants ~10x the full fine-tuning rate)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the LoRA weights")
    epochs: float = Field(1.0, gt=0, description="passes over the training data (ignored when max_steps > 0)")
    max_steps: int = Field(0, ge=0, description="optimizer steps; 0 = derive from epochs")
    batch_size: int = Field(8, gt=0, description="examples per micro-batch (when batch_tokens is 0)")
    batch_tokens: int = Field(
        0, ge=0, description="if > 0: micro-batches hold up to this many padded tokens instead of batch_size"
    )
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    warmup: float = Field(0.1, ge=0, description="linear warmup: a share of the steps if < 1, else a step count")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="decay after warmup: cosine | linear | constant"
    )
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm; 0 = off")
    max_len: int = Field(
        512, gt=0, description="longest example in tokens; longer ones are handled per `overlong` and counted"
    )
    overlong: Literal["skip", "truncate"] = Field(
        "skip", description="examples longer than max_len: skip | truncate (both are reported)"
    )
    # judged by the task's own score (train.validate)
    score_every: int = Field(
        0,
        ge=0,
        description="every N steps answer `score_n` held-out train examples greedily and score them with the task's "
        "scorer; the best-scoring checkpoint becomes the adapter; 0 = off (auto sets it)",
    )
    score_n: int = Field(
        40, gt=0, description="train examples held out for the score (never trained on) when score_every or auto is on"
    )
    patience: int = Field(0, ge=0, description="stop after this many score checks without a better score; 0 = never")
    scorer: str | dict[str, Any] = Field(
        "exact", description="scorer of `data` runs (a name or {name: ..., options}); a task brings its own"
    )
    auto: bool = Field(
        False,
        description="search lr and rank/layers on short runs judged by the score, pick epochs from the data size, "
        "train the best with early stopping (train.auto)",
    )
    auto_search: list[Literal["lr", "layers"]] = Field(
        default_factory=lambda: ["lr"],
        description="what auto tries besides the recipe: lr (2x), layers (half rank on all layers: its trial costs "
        "1.5x, and on examples/expenses it scored as the others did)",
    )
    auto_budget: float = Field(3.0, gt=0, description="auto's time budget in plain runs of this config (3 = 3x)")
    auto_budget_s: float = Field(0.0, ge=0, description="auto's time budget in seconds; 0 = use auto_budget")
    balance: str = Field(
        "",
        description="class-balanced sampling (a remedy for skewed answers, off by default): '' = off, 'answer' = "
        "whole answers, or a JSON answer field (e.g. verdict); each class then fills the same share of an epoch",
    )
    informative_weight: float = Field(
        1.0,
        ge=1.0,
        description="loss weight of the answer tokens where the training answers part ways (a JSON answer's values; "
        "the tokens in between follow from what came before): a remedy for answers that are mostly boilerplate, "
        "off (1) by default",
    )
    # speed
    bf16: Literal["auto", "true", "false"] = Field(
        "auto", description="base weights in bf16 + autocast: auto (if the CPU has AVX512-BF16/AMX) | true | false"
    )
    logits_at_labels: bool = Field(
        True, description="apply the LM head only where the loss is taken (big vocab => big saving)"
    )
    share_prefix: bool = Field(
        True, description="run the prompt prefix all rows of a batch share (the system prompt) once per batch"
    )
    threads: int = Field(0, ge=0, description="torch threads; 0 = torch's default", json_schema_extra=_RUN_ONLY)
    # bookkeeping
    eval_every: int = Field(
        0, ge=0, description="eval loss every N steps; 0 = only at the end", json_schema_extra=_RUN_ONLY
    )
    save_every: int = Field(
        0, ge=0, description="checkpoint every N steps (for resume); 0 = no checkpoints", json_schema_extra=_RUN_ONLY
    )
    keep_checkpoints: int = Field(
        2, gt=0, description="how many of the newest checkpoints to keep", json_schema_extra=_RUN_ONLY
    )
    resume: bool = Field(
        False, description="continue from the newest checkpoint in output_dir/checkpoints", json_schema_extra=_RUN_ONLY
    )
    progress: bool = Field(True, description="show a tqdm progress bar", json_schema_extra=_RUN_ONLY)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, values: Any) -> Any:
        # `data:` left empty in YAML, or `top_layers=null` on the command line: use the field's default.
        if isinstance(values, dict):
            return {k: v for k, v in values.items() if v is not None}
        return values

    @field_validator("bf16", mode="before")
    @classmethod
    def _bool_words(cls, v: Any) -> Any:
        # YAML reads `bf16: true` as a bool; the field takes the words.
        return str(v).lower() if isinstance(v, bool) else v

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, v: Any) -> Any:
        from lorafleet.core.scorers import make_scorer

        make_scorer(v)  # an unknown name or option fails here, listing the valid ones, not after training
        return v

    @field_validator("target_modules", "auto_search", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        # `target_modules=q_proj,v_proj` on the command line is one string.
        return [m.strip() for m in v.split(",") if m.strip()] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_source(self) -> TrainConfig:
        if bool(self.task) == bool(self.data):
            raise ValueError("give exactly one of `task` (a built-in task or a task file) or `data` (a JSONL path)")
        return self

    @model_validator(mode="after")
    def _servable(self) -> TrainConfig:
        # Checked together: whether vLLM will load the adapter depends on r and the server's max rank.
        ranks = ", ".join(map(str, LORA_RANKS))
        if self.r not in LORA_RANKS:
            raise ValueError(f"r={self.r} cannot be served by vLLM: use one of {ranks}")
        if self.max_serving_rank not in LORA_RANKS:
            raise ValueError(f"max_serving_rank={self.max_serving_rank} must be one of {ranks}")
        if self.r > self.max_serving_rank:
            raise ValueError(
                f"r={self.r} is greater than max_serving_rank={self.max_serving_rank}: vLLM would refuse the adapter; "
                "lower r or raise max_serving_rank (and the server's --max-lora-rank)"
            )
        return self

    @model_validator(mode="after")
    def _patience_needs_score(self) -> TrainConfig:
        if self.patience and not (self.score_every or self.auto):
            raise ValueError(f"patience={self.patience} counts score checks: set score_every (or auto=true) too")
        return self

    @model_validator(mode="after")
    def _token_budget(self) -> TrainConfig:
        if self.batch_tokens and self.batch_tokens < self.max_len:
            raise ValueError(f"batch_tokens={self.batch_tokens} must be >= max_len={self.max_len} or 0")
        return self

    @property
    def run_name(self) -> str:
        if self.name or not self.task:
            return self.name or Path(self.data).stem
        from train.tasks import get_task  # a task file names its task; train.tasks does not import this module

        return get_task(self.task).name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


# Fields that never change the trained adapter: they never force a retrain (lorafleet.demo) and may differ
# between a run and its resumption (train.trainer). The one list; each field above is marked where it is defined.
RUN_ONLY_FIELDS = frozenset(name for name, f in TrainConfig.model_fields.items() if f.json_schema_extra == _RUN_ONLY)


def resolve_config_path(path: str | Path) -> Path:
    """A path as given, else a file in train/configs/ (`tiny`, `tiny.yaml`)."""
    p = Path(path)
    for cand in (p, CONFIGS_DIR / p.name, CONFIGS_DIR / f"{p.name}.yaml"):
        if cand.is_file():
            return cand
    known = ", ".join(sorted(c.name for c in CONFIGS_DIR.glob("*.yaml")))
    raise ConfigError(f"config file {path} not found (built-in configs: {known})")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None) -> TrainConfig:
    """A YAML file (optional) with overrides applied on top: `key=value` strings or a mapping {key: value}."""
    values: dict[str, Any] = {}
    source = "train config"
    if path is not None:
        file = resolve_config_path(path)
        values = load_yaml(file) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{file}: expected a mapping of field: value")
        source = f"train config {file}"
    return TrainConfig.parse(apply_overrides(values, overrides), source)


def describe() -> str:
    """One line per field: name, default, help (for `--help`)."""
    lines = []
    for name, f in TrainConfig.model_fields.items():
        lines.append(f"  {name}={f.get_default(call_default_factory=True)!r}: {f.description}")
    return "\n".join(lines)


class TrainError(UserError):
    """Training cannot start or finish; the message says what to fix."""
