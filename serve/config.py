"""The deployment config: engines, adapters, tenants, prices and the gateway, validated on load.

One YAML file describes a deployment. Every problem is reported at once and names its field the way a user
reads the file (`tenants[1].limits.rpm: must be > 0`). Label values for metrics (tenant, model, upstream names)
come from here only, so their cardinality is bounded by the config.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator

from lorafleet.core.config import Price, Strict, TokenPrice, parse_yaml
from lorafleet.core.errors import ConfigError  # noqa: F401  (re-exported: callers catch it from here)
from lorafleet.core.vllm import LORA_RANKS

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
DEFAULT_CONFIG = "default.yaml"


def _check_name(v: str) -> str:
    if not NAME.match(v):
        raise ValueError(f"{v!r} is not a valid name: use letters, digits, '.', '_', '-' (at most 64)")
    return v


Name = Annotated[str, AfterValidator(_check_name)]


class GatewayConfig(Strict):
    host: str = Field("127.0.0.1", description="address the gateway listens on")
    port: int = Field(8080, gt=0, lt=65536, description="gateway port")
    admin_key_hash: str | None = Field(None, description="sha256:<hex> of the admin key; none = admin API off")
    metrics_key_hash: str | None = Field(
        None,
        description="sha256:<hex> of a bearer token /metrics and /engines/*/metrics require (the admin key works "
        "too); none = open to anyone who can reach the gateway",
    )
    max_body_bytes: int = Field(1 << 20, gt=0, description="larger request bodies get 413")
    max_tokens_cap: int = Field(2048, gt=0, description="requests asking for more max_tokens get 400")
    max_n: int = Field(8, gt=0, description="requests asking for more choices (n) get 400")
    request_timeout_s: float = Field(300.0, gt=0, description="longest wait for an engine's next bytes")
    connect_timeout_s: float = Field(2.0, gt=0, description="engine connect timeout; past it the replica is down")
    health_interval_s: float = Field(2.0, gt=0, description="how often each engine's /health is polled")
    retry_after_s: int = Field(5, gt=0, description="Retry-After sent with 503 when no engine is up")
    log_dir: str | None = Field(None, description="engine logs; default: runs/serve under the lorafleet home")
    store_url: str = Field(
        "memory",
        description="where run-time state lives: `sqlite` (data/lorafleet.db under the lorafleet home), a "
        "sqlite:///PATH or postgresql+psycopg://... URL (several gateways and workers share one), or `memory` "
        "(this process only, gone at exit)",
    )
    max_file_bytes: int = Field(50 << 20, gt=0, description="largest file POST /v1/files accepts (413 above)")
    store_poll_s: float = Field(1.0, gt=0, description="how often the store is read for models others registered")
    placement: Literal["bounded", "pinned"] = Field(
        "bounded",
        description="adapters over an engine's replicas: bounded = each on its own replica until that one carries "
        "more than load_factor x the mean load, then spilled to the next in its ranking; pinned = always its own",
    )
    load_factor: float = Field(1.25, gt=1, description="bounded placement: how far above the mean a replica may go")
    redis_url: str | None = Field(
        None,
        description="redis://HOST:PORT/DB holding the tenants' limit windows, slots and budgets, shared by every "
        "gateway replica; none = counted in this process (one gateway). Set, an unreachable Redis gives 503s, "
        "never per-process limits",
    )

    @field_validator("admin_key_hash", "metrics_key_hash")
    @classmethod
    def _hash(cls, v: str | None) -> str | None:
        if v is not None and not KEY_HASH.match(v):
            raise ValueError("must look like sha256:<64 hex digits>; make one with `lorafleet serve hash-key KEY`")
        return v


class EngineConfig(Strict):
    name: Name = Field(description="engine name; the `upstream` label of its metrics")
    model: str = Field(description="lorafleet model id (models/<id>) or a local HF folder")
    served_name: str | None = Field(
        None, description="the model name clients use; default: the model id or folder name"
    )
    host: str = Field(
        "127.0.0.1",
        description="address lorafleet's vLLM processes listen on: loopback by default, because an engine's API has "
        "no keys (any caller could load adapters or read every tenant's traffic); the gateway is the way in",
    )
    port: int = Field(8001, gt=0, lt=65536, description="port of the first replica; replica i uses port + i")
    replicas: int = Field(1, gt=0, le=16, description="vLLM processes serving this model")
    urls: list[str] = Field([], description="engines already running elsewhere: route to these, start nothing")
    dns: str | None = Field(
        None,
        description="HOST:PORT whose addresses are the replicas (a Kubernetes headless Service): re-resolved every "
        "health_interval_s, so replicas join and leave without a gateway restart; start nothing",
    )
    enable_lora: bool = True
    compile_lora: bool = Field(
        True,
        description="CPU hosts: compile a LoRA engine as vLLM compiles a LoRA-off one (vLLM runs LoRA engines on CPU "
        "eagerly; compiled, base-model requests ran 0.94-0.98x of a LoRA-off engine's throughput, eager 0.85x); "
        "costs about 85 s more at start",
    )
    max_lora_rank: int = Field(16, description=f"vLLM --max-lora-rank, one of {LORA_RANKS}")
    max_loras: int = Field(4, gt=0, description="distinct adapters in one batch (vLLM --max-loras)")
    max_cpu_loras: int | None = Field(None, gt=0, description="adapters cached in RAM; default max(max_loras, 8)")
    max_model_len: int = Field(2048, gt=0)
    kv_cache_gib: int = Field(2, gt=0, description="CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="weights and activations; auto: bfloat16 on GPUs and CPUs with AVX512-BF16/AMX, else float32",
    )
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="GPU hosts: share of its GPU's memory each replica takes (vLLM --gpu-memory-utilization); "
        "default: 0.9 split among the engine processes placed on that GPU",
    )
    price_usd_per_hour: float = Field(0.0, ge=0, description="what one replica costs to run")
    extra_args: list[str] = Field([], description="more vLLM server arguments")
    cpu_bind: list[str] = Field(
        [],
        description="CPU hosts: the cores of each replica (vLLM's VLLM_CPU_OMP_THREADS_BIND, e.g. ['0-7', '8-15']), "
        "so replicas on one machine do not share cores; default: vLLM's own choice for each",
    )

    @field_validator("max_lora_rank")
    @classmethod
    def _rank(cls, v: int) -> int:
        if v not in LORA_RANKS:
            raise ValueError(f"must be one of {LORA_RANKS} (vLLM refuses other ranks), got {v}")
        return v

    @field_validator("urls")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not re.match(r"^https?://[^/\s]+$", url):
                raise ValueError(f"{url!r} must be an engine root like http://127.0.0.1:8001 (no path)")
        return v

    @property
    def public_name(self) -> str:
        return self.served_name or Path(self.model).name

    @field_validator("dns")
    @classmethod
    def _dns(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[A-Za-z0-9.-]+:\d{1,5}$", v):
            raise ValueError(f"{v!r} must be HOST:PORT, e.g. lorafleet-engine-smollm2-headless:8000")
        return v

    @property
    def managed(self) -> bool:
        """Whether lorafleet starts this engine's processes (else they run elsewhere, at `urls` or `dns`)."""
        return not self.urls and self.dns is None

    def replica_urls(self) -> list[str]:
        """Where the replicas answer (with `dns`: none until the gateway resolves it)."""
        if self.dns is not None:
            return []
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host  # listening on all: reach it locally
        return list(self.urls) or [f"http://{host}:{self.port + i}" for i in range(self.replicas)]

    def replica_names(self) -> list[str]:
        n = len(self.replica_urls())
        return [self.name] if n == 1 else [f"{self.name}-{i}" for i in range(n)]


class AdapterConfig(Strict):
    name: Name = Field(description="the model name clients send")
    path: str = Field(description="adapter folder, relative to the adapters root (or absolute inside it)")
    base: str = Field(description="served name of the base model it was trained on")
    mode: Literal["lora", "merged"] = Field("lora", description="lora: hot-loaded; merged: own engine, base speed")
    port: int | None = Field(None, gt=0, lt=65536, description="merged only: port of its own engine (replica i: +i)")
    replicas: int = Field(1, gt=0, le=16, description="merged only: engine processes lorafleet runs for it")
    url: str | None = Field(None, description="merged only: its engine runs elsewhere, at this root URL")
    optional: bool = Field(False, description="skip it (with a warning) when its folder does not exist")

    def replica_urls(self) -> list[str]:
        """merged: where its engines answer."""
        return [self.url] if self.url else [f"http://127.0.0.1:{self.port + i}" for i in range(self.replicas)]

    def replica_names(self) -> list[str]:
        group = merged_group(self.name)
        return [group] if len(self.replica_urls()) == 1 else [f"{group}-{i}" for i in range(self.replicas)]


class Limits(Strict):
    rpm: int | None = Field(None, gt=0, description="requests per minute (sliding window); none = unlimited")
    tpm: int | None = Field(None, gt=0, description="prompt+completion tokens per minute; none = unlimited")
    concurrency: int | None = Field(None, gt=0, description="requests in flight; none = unlimited")
    usd_per_day: float | None = Field(None, gt=0, description="$ budget per UTC day; none = unlimited")
    usd_per_month: float | None = Field(None, gt=0, description="$ budget per UTC calendar month; none = unlimited")
    fine_tuning_jobs: int | None = Field(
        4, gt=0, description="fine-tuning jobs not yet ended (validating, queued, running); more get 429"
    )
    storage_bytes: int | None = Field(1 << 30, gt=0, description="bytes of uploaded files kept; more get 429")


class TenantConfig(Strict):
    name: Name
    api_key_hashes: list[str] = Field(
        min_length=1, description="sha256:<hex> of each key (`lorafleet serve hash-key`)"
    )
    models: list[str] = Field(["*"], description="models and adapters it may use; '*' = all")
    limits: Limits = Limits()
    prices: dict[str, TokenPrice] = Field({}, description="per-model price overrides for this tenant")

    @field_validator("api_key_hashes")
    @classmethod
    def _hashes(cls, v: list[str]) -> list[str]:
        for h in v:
            if not KEY_HASH.match(h):
                raise ValueError(
                    f"{h!r} must look like sha256:<64 hex digits>; make one: `lorafleet serve hash-key KEY`"
                )
        return v


class ServeConfig(Strict):
    gateway: GatewayConfig = GatewayConfig()
    adapters_root: str | None = Field(None, description="registered adapters must live under it; default adapters/")
    engines: list[EngineConfig] = Field(min_length=1)
    adapters: list[AdapterConfig] = []
    tenants: list[TenantConfig] = []
    prices: dict[str, TokenPrice] = Field(
        {}, description="$ per 1M tokens by model name ({input, output}); adapters default to their base"
    )

    def engine_for(self, served_name: str) -> EngineConfig | None:
        return next((e for e in self.engines if e.public_name == served_name), None)

    def model_names(self) -> list[str]:
        return [e.public_name for e in self.engines] + [a.name for a in self.adapters]

    def price(self, model: str, base: str | None = None, tenant: TenantConfig | None = None) -> Price:
        """A tenant's override, else the model's list price, else its base model's, else free."""
        for table in (tenant.prices if tenant else {}, self.prices):
            for name in (model, base):
                if name in table:
                    return table[name]
        return Price()


def _cross_check(cfg: ServeConfig) -> list[str]:
    """Problems that span several fields: unique names and ports, references that must resolve."""
    problems: list[str] = []

    def dupes(kind: str, items: list[tuple[str, Any]]) -> None:
        seen: dict[Any, str] = {}
        for where, value in items:
            if value in seen:
                problems.append(f"{where}: {kind} {value!r} is already used by {seen[value]}")
            seen.setdefault(value, where)

    dupes("name", [(f"engines[{i}].name", e.name) for i, e in enumerate(cfg.engines)])
    for i, e in enumerate(cfg.engines):
        if e.dns is not None and e.urls:
            problems.append(f"engines[{i}]: give urls or dns, not both")
        if e.cpu_bind and len(e.cpu_bind) != e.replicas:
            problems.append(f"engines[{i}].cpu_bind: one entry per replica ({e.replicas}), got {len(e.cpu_bind)}")
    models = [(f"engines[{i}].served_name", e.public_name) for i, e in enumerate(cfg.engines)]
    dupes("model name", models + [(f"adapters[{i}].name", a.name) for i, a in enumerate(cfg.adapters)])
    ports = [
        (f"engines[{i}].port", e.port + r) for i, e in enumerate(cfg.engines) if e.managed for r in range(e.replicas)
    ]
    ports += [(f"adapters[{i}].port", a.port + r) for i, a in enumerate(cfg.adapters) if a.port is not None
              for r in range(a.replicas)]  # fmt: skip
    dupes("port", ports + [("gateway.port", cfg.gateway.port)])
    dupes("tenant name", [(f"tenants[{i}].name", t.name) for i, t in enumerate(cfg.tenants)])
    keys = [
        (f"tenants[{i}].api_key_hashes[{j}]", h)
        for i, t in enumerate(cfg.tenants)
        for j, h in enumerate(t.api_key_hashes)
    ]
    dupes(
        "key hash",
        keys + ([("gateway.admin_key_hash", cfg.gateway.admin_key_hash)] if cfg.gateway.admin_key_hash else []),
    )

    bases = {e.public_name: e for e in cfg.engines}
    for i, a in enumerate(cfg.adapters):
        engine = bases.get(a.base)
        if engine is None:
            problems.append(f"adapters[{i}].base: unknown base model {a.base!r}; engines serve {sorted(bases)}")
        elif a.mode == "lora" and not engine.enable_lora:
            problems.append(f"adapters[{i}].base: engine {engine.name!r} has enable_lora: false")
        if a.mode == "merged" and (a.port is None) == (a.url is None):
            problems.append(f"adapters[{i}]: a merged adapter needs exactly one of port (lorafleet starts it) or url")
        if a.mode == "lora" and (a.port is not None or a.url is not None or a.replicas != 1):
            problems.append(f"adapters[{i}]: port/url/replicas only apply to mode: merged")
        if a.url is not None and a.replicas != 1:
            problems.append(f"adapters[{i}].replicas: lorafleet starts replicas only with port; one url is one engine")
    known = set(cfg.model_names())
    for i, t in enumerate(cfg.tenants):
        for j, m in enumerate(t.models):
            if m != "*" and m not in known:
                problems.append(f"tenants[{i}].models[{j}]: unknown model {m!r}; known: {sorted(known)}")
        for m in t.prices:
            if m not in known:
                problems.append(f"tenants[{i}].prices.{m}: unknown model; known: {sorted(known)}")
    for m in cfg.prices:
        if m not in known:
            problems.append(f"prices.{m}: unknown model; known: {sorted(known)}")
    return problems


def parse_config(data: Any, source: str = "config") -> ServeConfig:
    """Validate a parsed YAML document; raise ConfigError listing every problem by field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with engines/adapters/tenants, got {type(data).__name__}")
    # Index brackets (`tenants[1].limits.rpm`), as in the cross-checks below.
    cfg = ServeConfig.parse(data, source, brackets=True, reference="serve/default.yaml")
    problems = _cross_check(cfg)
    if problems:
        raise ConfigError(f"{source} is invalid:\n  " + "\n  ".join(problems))
    return cfg


def load_config(path: str | Path | None = None) -> ServeConfig:
    """Load and validate a YAML config; None means the embedded default (serve/default.yaml)."""
    if path is None:
        text, source = resources.files("serve").joinpath(DEFAULT_CONFIG).read_text(), "serve/default.yaml"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        text, source = p.read_text(), str(p)
    return parse_config(parse_yaml(text, source), source)


def merged_group(adapter: str) -> str:
    """The engine (and model folder) name of an adapter served `mode: merged`."""
    return f"merged-{adapter}"
