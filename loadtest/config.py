"""The bench config: one YAML file, validated on load. Every error names the field and says what to fix.

`loadtest/examples/bench.yaml` is the commented reference for every field below.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lorafleet.core.config import (
    KnownPrice,
    Price,  # noqa: F401  (re-exported: loadtest.cost prices with it)
    Strict,
    apply_overrides,
    load_yaml,
)
from lorafleet.core.errors import ConfigError  # noqa: F401  (re-exported: callers catch it from here)

REFERENCE = "loadtest/examples/bench.yaml"


class Target(Strict):
    name: str = Field(description="label in reports and Prometheus series")
    base_url: str = Field(description="OpenAI API root, e.g. http://127.0.0.1:8080/v1")
    model: str = Field(description="model or adapter name sent when no adapter mix is given")
    api_key: str | None = None
    api_key_env: str | None = Field(None, description="read the API key from this environment variable")
    api: Literal["chat", "completions"] = "chat"
    adapters: dict[str, float] = Field(default_factory=dict, description="model name -> traffic weight")
    model_keys: dict[str, str] = Field(
        default_factory=dict, description="model -> API key, for gateways where each tenant key reaches its adapter"
    )
    price: KnownPrice = Field(description="usd_per_hour (self-hosted), or usd_per_1m_input and usd_per_1m_output")

    @field_validator("name")
    @classmethod
    def _label_safe(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError("use letters, digits, '_', '.', '-' only (it becomes a Prometheus label and a file name)")
        return v

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"expected an http(s) URL such as http://127.0.0.1:8080/v1, got {v!r}")
        return v.rstrip("/")

    @field_validator("adapters")
    @classmethod
    def _positive_weights(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, w in v.items() if not w > 0]
        if bad:
            raise ValueError(f"weights must be > 0; fix {bad}")
        return v

    @model_validator(mode="after")
    def _key_env_set(self) -> Target:
        if self.api_key_env and self.api_key_env not in os.environ:
            raise ValueError(f"api_key_env: environment variable {self.api_key_env} is not set")
        return self

    def key(self, model: str | None = None) -> str | None:
        """The API key to send with requests for `model`."""
        if model in self.model_keys:
            return self.model_keys[model]
        return os.environ[self.api_key_env] if self.api_key_env else self.api_key

    def mix(self) -> dict[str, float]:
        """Traffic weights per model name; the plain model when no adapters are listed."""
        return dict(self.adapters) or {self.model: 1.0}


class Load(Strict):
    mode: Literal["open", "closed"] = Field("closed", description="open: arrivals at `rate`; closed: `concurrency`")
    rate: float | None = Field(None, gt=0, description="open loop: offered requests per second")
    burstiness: float = Field(1.0, gt=0, description="gamma shape of inter-arrival gaps: 1 Poisson, <1 burstier")
    concurrency: int | None = Field(None, ge=1, description="closed loop: requests kept in flight")
    duration_s: float | None = Field(None, gt=0, description="per step, measured after the ramp-up")
    num_requests: int | None = Field(None, ge=1)
    sweep: list[float] | None = Field(None, description="rates (open) or concurrencies (closed), ascending")
    min_gain: float = Field(0.05, ge=0, description="sweep stops when output tok/s grows less than this fraction")
    ramp_up_s: float = Field(
        0.0,
        ge=0,
        description="closed loop: workers start one by one over this many seconds (locust's spawn rate), so their "
        "requests do not run in lockstep; both modes: what is sent before it ends is left out of the figures",
    )
    warmup_requests: int = Field(4, ge=0, description="per target, at least one per model; excluded from figures")
    max_tokens: int = Field(64, ge=1)
    force_output_len: bool = Field(False, description="send ignore_eos + min_tokens=max_tokens (vLLM extensions)")
    temperature: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> Load:
        if (self.duration_s is None) == (self.num_requests is None):
            raise ValueError("give exactly one of duration_s or num_requests")
        if self.ramp_up_s and self.duration_s is None:
            raise ValueError("ramp_up_s needs duration_s: the step runs ramp_up_s + duration_s seconds")
        knob = "rate" if self.mode == "open" else "concurrency"
        if self.sweep is not None:
            if not self.sweep or any(v <= 0 for v in self.sweep) or self.sweep != sorted(set(self.sweep)):
                raise ValueError("sweep must be a non-empty list of positive values in strictly ascending order")
            if self.mode == "closed" and any(v != int(v) for v in self.sweep):
                raise ValueError("closed-loop sweep values are concurrencies: use whole numbers")
        elif getattr(self, knob) is None:
            raise ValueError(f"mode {self.mode!r} needs `{knob}` (or a `sweep` of {knob}s)")
        return self

    @property
    def end_s(self) -> float | None:
        """When a step stops sending, in seconds from its start (None: it stops after num_requests)."""
        return None if self.duration_s is None else self.ramp_up_s + self.duration_s

    def steps(self) -> list[float]:
        """The offered load of each step: req/s (open loop) or concurrency (closed loop)."""
        if self.sweep is not None:
            return list(self.sweep)
        return [self.rate if self.mode == "open" else float(self.concurrency)]


class Slo(Strict):
    ttft_p90_s: float | None = Field(None, gt=0, description="p90 time to first token, client queue delay included")
    tpot_p90_s: float | None = Field(None, gt=0, description="p90 time per output token after the first")
    e2e_p90_s: float | None = Field(None, gt=0, description="p90 end-to-end latency, client queue delay included")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="a step with more failed requests breaks the SLO")

    def is_set(self) -> bool:
        return any(v is not None for v in (self.ttft_p90_s, self.tpot_p90_s, self.e2e_p90_s))


class Prompts(Strict):
    source: Literal["synthetic", "task"] = "synthetic"
    input_tokens: int = Field(128, ge=1, description="synthetic: words per prompt (about one token each)")
    task: str | dict[str, str] | None = Field(
        None, description="source=task: a task (built-in name or task file), or model -> task ('*' for the rest)"
    )
    completion_few_shot_k: int = Field(3, ge=0, description="examples in prompts sent to `api: completions` targets")
    pool_size: int = Field(256, ge=1, description="distinct prompts drawn per model")

    @model_validator(mode="after")
    def _task_given(self) -> Prompts:
        if self.source == "task" and not self.task:
            raise ValueError("source 'task' needs `task`: a built-in task name, a task file, or a map model -> task")
        return self

    def task_for(self, model: str) -> str | None:
        if self.source != "task":
            return None
        if isinstance(self.task, str):
            return self.task
        return self.task.get(model) or self.task.get("*")


class Eval(Strict):
    target: str
    model: str | None = Field(None, description="model or adapter to ask; default: the target's model")
    task: str = Field(description="a built-in task name or a task file (task.yaml or its folder)")
    mode: Literal["zero_shot", "few_shot_chat", "few_shot_completion"] = "zero_shot"
    k: int = Field(3, ge=0, description="few-shot examples")
    n: int | None = Field(None, ge=1, description="eval items; default quality.n")


class Quality(Strict):
    n: int = Field(100, ge=1, description="eval items per eval")
    max_tokens: int = Field(64, ge=1)
    concurrency: int = Field(4, ge=1)
    seed: int = 0
    evals: list[Eval] = Field(min_length=1)


class BenchConfig(Strict):
    targets: list[Target] = Field(min_length=1)
    load: Load | None = None
    slo: Slo = Field(default_factory=Slo)
    prompts: Prompts = Field(default_factory=Prompts)
    quality: Quality | None = None
    metrics_port: int = Field(0, ge=0, le=65535, description="serve lorafleet_bench_* on this port; 0 = off")
    metrics_addr: str = "0.0.0.0"
    output_dir: str | None = Field(None, description="default runs/bench-<timestamp>")
    seed: int = 0
    request_timeout_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _cross_checks(self) -> BenchConfig:
        names = [t.name for t in self.targets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"targets: names must be unique, repeated: {dupes}")
        if self.load is None and self.quality is None:
            raise ValueError("nothing to do: give a `load` section, a `quality` section or both")
        if self.quality:
            for i, ev in enumerate(self.quality.evals):
                if ev.target not in names:
                    raise ValueError(f"quality.evals.{i}.target: no target named {ev.target!r}; targets are {names}")
                if self.target(ev.target).api == "completions" and ev.mode != "few_shot_completion":
                    raise ValueError(
                        f"quality.evals.{i}.mode: target {ev.target!r} is `api: completions` (a model without a chat "
                        f"template); use mode few_shot_completion"
                    )
        return self

    def target(self, name: str) -> Target:
        return next(t for t in self.targets if t.name == name)


def parse_config(data: Any, overrides: list[str] | None = None, source: str = "bench config") -> BenchConfig:
    """Validate a parsed YAML document after `dotted.key=value` overrides (lorafleet.core.config syntax)."""
    if not isinstance(data, dict):
        raise ConfigError("invalid bench config: the top level must be a mapping with `targets:`")
    return BenchConfig.parse(apply_overrides(data, overrides), source, reference=REFERENCE)


def load_config(path: str | Path, overrides: list[str] | None = None) -> BenchConfig:
    return parse_config(load_yaml(path, "bench config"), overrides, f"bench config {path}")
