"""The admin API's logic: register and remove adapters at run time, report tenants and their usage.

An adapter is checked (inside the adapters root, servable by vLLM on its base) before any engine sees it; it is
loaded into an engine on its first request. Each function takes only the parts of the gateway it works on.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from pydantic import BaseModel, ValidationError

from serve.config import EngineConfig, ServeConfig
from serve.engines.deploy import AdapterPathError, adapter_dir, check_adapter
from serve.gateway.limits import Limiter
from serve.gateway.protocol import (
    ApiError,
    CreateVersion,
    PointAlias,
    RegisterAdapter,
    SetReplicas,
    bad_request,
    invalid_body,
)
from serve.gateway.registry import Registry
from serve.gateway.tenants import TenantStore, bearer_key, key_matches
from serve.store.schema import AliasRow, VersionRow
from serve.store.store import Store, StoreError


def check_metrics_key(metrics_hash: str | None, admin_hash: str | None, authorization: str | None) -> None:
    """Nothing when the metrics are open (no metrics key set) or the request carries the metrics or admin key."""
    if metrics_hash is None or is_operator(metrics_hash, admin_hash, authorization):
        return
    raise ApiError(
        401, "metrics key required: send `Authorization: Bearer METRICS_KEY`", "authentication_error",
        code="invalid_api_key",
    )  # fmt: skip


def is_operator(metrics_hash: str | None, admin_hash: str | None, authorization: str | None) -> bool:
    """Whether the request carries the metrics key or the admin key."""
    key = bearer_key(authorization)
    return key is not None and any(h is not None and key_matches(key, h) for h in (metrics_hash, admin_hash))


def check_admin_key(stored_hash: str | None, authorization: str | None) -> None:
    key = bearer_key(authorization)
    if stored_hash is None:
        raise ApiError(
            401, "the admin API is off: set gateway.admin_key_hash", "authentication_error", code="admin_off"
        )
    if key is None or not key_matches(key, stored_hash):
        raise ApiError(
            401,
            "admin key required: send `Authorization: Bearer ADMIN_KEY`",
            "authentication_error",
            code="invalid_api_key",
        )


def parse_register(raw: bytes) -> RegisterAdapter:
    return parse_body(raw, RegisterAdapter)


async def register_adapter(
    req: RegisterAdapter, *, cfg: ServeConfig, registry: Registry, tenants: TenantStore, root: Path, store: Store
) -> dict:
    """Check the adapter named in `req` (the cheap checks first, the disk last) and make it servable. It is kept
    in the store as a version and an alias of that name, so a restarted gateway serves it again."""
    engine = _engine_for_new(req, cfg, registry, tenants)
    folder = await _servable_folder(root, req.path, engine)
    version = await asyncio.to_thread(_persist, store, req, folder)
    registry.add_named(req.name, folder, req.base, version)
    tenants.restrict(req.name, req.tenants)  # with a tenant list, for those tenants only
    tenants.grant(req.name, req.tenants)
    return {"name": req.name, "base": req.base, "path": str(folder), "tenants": req.tenants, "version": version}


def _persist(store: Store, req: RegisterAdapter, folder: Path) -> str:
    v = store.add_version(req.name, folder, req.base, source="admin")
    store.set_alias(req.name, [{"version": v.id, "weight": 1.0}], req.tenants)
    store.grant(req.name, req.tenants)
    return v.id


def _engine_for_new(req: RegisterAdapter, cfg: ServeConfig, registry: Registry, tenants: TenantStore) -> EngineConfig:
    if registry.resolve(req.name) is not None:
        raise ApiError(
            409,
            f"model {req.name!r} already exists; DELETE /admin/adapters/{req.name} first",
            param="name",
            code="conflict",
        )
    engine = cfg.engine_for(req.base)
    if engine is None or not engine.enable_lora:
        bases = sorted(e.public_name for e in cfg.engines if e.enable_lora)
        raise bad_request(f"base {req.base!r} is not a LoRA-enabled base model; choose one of {bases}", param="base")
    unknown = sorted(set(req.tenants) - set(tenants.tenants))
    if unknown:
        raise bad_request(f"unknown tenants {unknown}; known: {sorted(tenants.tenants)}", param="tenants")
    return engine


async def _servable_folder(root: Path, path: str, engine: EngineConfig) -> Path:
    try:
        folder = adapter_dir(root, path)
    except AdapterPathError as e:
        raise bad_request(str(e), param="path") from None
    # Reading the weights' headers touches the disk: keep it off the event loop.
    try:
        problems = await asyncio.to_thread(check_adapter, folder, engine)
    except Exception as e:  # a file crafted to break the checker (JSON nested 100k deep, ...) is still a 400
        problems = [f"its files cannot be read ({type(e).__name__})"]
    if problems:
        raise bad_request(
            "vLLM would refuse this adapter: " + "; ".join(problems), param="path", code="invalid_adapter"
        )
    return folder


async def remove_adapter(name: str, *, registry: Registry, tenants: TenantStore, store: Store) -> dict:
    model = registry.resolve(name)
    if model is None:
        raise ApiError(404, f"no adapter {name!r}", code="model_not_found")
    if model.kind != "lora":
        raise bad_request(f"{name!r} is a {model.kind} model, not a LoRA adapter; change the config to remove it")
    if name in registry.aliases:
        registry.drop_alias(name)
    else:
        await registry.remove_adapter(name)
    await asyncio.to_thread(store.delete_alias, name)
    await asyncio.to_thread(store.revoke, name)
    tenants.revoke(name)
    return {"deleted": name}


def adapters_report(registry: Registry) -> dict:
    """What a client may call, as it calls it: an alias shows the versions it points at."""
    rows = []
    for name, _, _ in registry.names():
        m = registry.models.get(name)
        alias = registry.aliases.get(name)
        if alias is not None:
            m = registry.models[alias.targets[0][0]] if alias.targets else None
        if m is None or m.kind == "base":
            continue
        versions = [v for v, _ in alias.targets] if alias else [m.name]
        loaded = [r.name for r in registry.groups[m.engine] if m.kind == "merged" or set(versions) & r.loaded]
        rows.append({"name": name, "kind": m.kind, "base": m.base, "path": str(m.path) if m.path else None,
                     "versions": versions, "loaded_on": loaded})  # fmt: skip
    return {"adapters": rows}


def tenants_report(tenants: TenantStore, limiter: Limiter) -> dict:
    rows = []
    for t in tenants.tenants.values():
        u = t.usage
        rows.append(
            {
                "name": t.name,
                "models": sorted(t.models),
                "limits": t.limits.model_dump(),
                "usage": {
                    "requests": u.requests,
                    "prompt_tokens": u.prompt_tokens,
                    "completion_tokens": u.completion_tokens,
                    "cost_usd": round(u.cost_usd, 9),
                    **limiter.usage(t.name),
                    **limiter.spend(t.name),
                },
                "utilization": limiter.utilization(t.name, t.limits),
                "budget_utilization": limiter.budget_utilization(t.name, t.limits),
            }
        )
    return {"tenants": rows}


# -- versions and aliases


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise invalid_body(e) from None


def version_object(v: VersionRow) -> dict:
    return {"id": v.id, "adapter": v.adapter, "digest": v.digest, "base": v.base, "path": v.path, "owner": v.owner,
            "source": v.source, "created_at": int(v.created_at.timestamp())}  # fmt: skip


async def create_version(
    req: CreateVersion, *, cfg: ServeConfig, registry: Registry, tenants: TenantStore, store: Store, root: Path
) -> dict:
    """An immutable version of an adapter, named by its files' hash; the same files give the same version."""
    engine = cfg.engine_for(req.base)
    if engine is None or not engine.enable_lora:
        bases = sorted(e.public_name for e in cfg.engines if e.enable_lora)
        raise bad_request(f"base {req.base!r} is not a LoRA-enabled base model; choose one of {bases}", param="base")
    if req.owner is not None and req.owner not in tenants.tenants:
        raise bad_request(f"owner: unknown tenant {req.owner!r}", param="owner")
    folder = await _servable_folder(root, req.path, engine)
    v = await asyncio.to_thread(store.add_version, req.adapter, folder, req.base, req.owner, "admin")
    if v.id not in registry.models:
        registry.add_adapter(v.id, Path(v.path), v.base)
    tenants.restrict(v.id, [v.owner] if v.owner else None)
    return version_object(v)


ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,255}$")  # the store's column holds 256 characters


async def point_alias(name: str, req: PointAlias, *, registry: Registry, tenants: TenantStore, store: Store) -> dict:
    """Load the target versions, then move the alias (store first, so every gateway follows). `req.tenants` is
    the alias's whole tenant list."""
    if not ALIAS.match(name):
        raise bad_request("name: an alias is letters, digits and . _ : @ / - (at most 256), starting with a letter or "
                          "digit", param="name")  # fmt: skip
    if name in registry.models:
        raise bad_request(f"name: {name!r} is a model of this deployment, not an alias", param="name")
    unknown = sorted(set(req.tenants) - set(tenants.tenants))
    if unknown:
        raise bad_request(f"tenants: unknown {unknown}", param="tenants")
    targets = [{"version": t.version, "weight": t.weight} for t in req.targets]
    versions = await asyncio.to_thread(_versions_for, store, name, targets, req.tenants)
    bases = {v.base for v in versions}
    if len(bases) != 1:
        raise bad_request(f"targets: the versions of one alias must share a base model, got {sorted(bases)}",
                          param="targets")  # fmt: skip
    pairs = [(t["version"], t["weight"]) for t in targets]
    for v in versions:
        if v.id not in registry.models:
            registry.add_adapter(v.id, Path(v.path), v.base)
    await registry.preload([v for v, _ in pairs])  # loaded before the alias moves: no window of errors
    before = await asyncio.to_thread(store.alias, name)
    try:
        row = await asyncio.to_thread(store.set_alias, name, targets, req.tenants)  # the store first: every gateway
    except StoreError as e:
        raise bad_request(str(e), param="targets") from None
    # `tenants` is the alias's whole list: a tenant left out loses it (a promoted alias taken back by the operator)
    gone = sorted(set(before.tenants if before else []) - set(req.tenants))
    if gone:
        await asyncio.to_thread(store.revoke, name, gone)
        tenants.revoke(name, gone)
    registry.set_alias(name, pairs, bases.pop())
    for v in versions:
        tenants.restrict(v.id, [v.owner] if v.owner else None)
    owners = [v.owner for v in versions if v.owner]
    tenants.restrict(name, req.tenants or owners)  # with a tenant list, for those tenants only
    tenants.grant(name, req.tenants)
    return alias_object(row, store)


def _versions_for(store: Store, alias: str, targets: list[dict], alias_tenants: list[str]) -> list:
    total = sum(t["weight"] for t in targets)
    if abs(total - 1) > 1e-6:
        raise bad_request(f"targets: weights must sum to 1, got {total:g}", param="targets")
    out = []
    for i, t in enumerate(targets):
        v = store.version(t["version"])
        # another tenant's version is as unknown as a version that does not exist
        if v is None or (v.owner is not None and set(alias_tenants) - {v.owner}):
            raise bad_request(f"targets.{i}.version: no version {t['version']!r} for these tenants",
                              param=f"targets.{i}.version")  # fmt: skip
        out.append(v)
    return out


def alias_object(row: AliasRow, store: Store) -> dict:
    history = [{"targets": h.targets, "at": int(h.at.timestamp())} for h in store.history(row.name)]
    return {"name": row.name, "targets": row.targets, "tenants": row.tenants, "history": history}


async def rollback_alias(name: str, *, registry: Registry, tenants: TenantStore, store: Store) -> dict:
    row = await asyncio.to_thread(store.alias, name)
    if row is None:
        raise ApiError(404, f"no alias {name!r}", code="not_found")
    past = await asyncio.to_thread(store.history, name)
    if len(past) < 2:
        raise bad_request(f"alias {name!r} has no earlier target to roll back to", code="no_history")
    req = PointAlias(targets=past[-2].targets, tenants=row.tenants)
    return await point_alias(name, req, registry=registry, tenants=tenants, store=store)


# -- engine replicas


def engines_report(registry: Registry) -> dict:
    """Each engine group's replicas: up, load (ours and the engine's own count), adapters held."""
    return {"engines": [{"name": name, "replicas": [
        {"name": r.name, "url": r.url, "up": r.up, "inflight": r.inflight, "load": r.load,
         "engine_load": r.engine_load, "adapters": sorted(r.loaded)} for r in replicas]}
        for name, replicas in registry.groups.items()]}  # fmt: skip


def set_replicas(name: str, req: SetReplicas, *, cfg: ServeConfig, registry: Registry) -> None:
    """Route an engine that runs elsewhere to these replicas from now on (this gateway; a fleet of gateways
    follows a headless Service with `dns:` instead)."""
    engine = next((e for e in cfg.engines if e.name == name), None)
    if engine is None:
        raise ApiError(404, f"no engine {name!r}; engines: {sorted(e.name for e in cfg.engines)}", code="not_found")
    if engine.managed:
        raise bad_request(f"engine {name!r} is started by this gateway; change its replicas in the config",
                          param="name")  # fmt: skip
    if engine.dns is not None:
        raise bad_request(f"engine {name!r} follows {engine.dns} (dns); scale that instead", param="name")
    registry.set_replicas(name, list(dict.fromkeys(req.urls)))
