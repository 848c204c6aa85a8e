"""Which engine serves which model, where each adapter is loaded, and loading it on first use.

A model name is a base model (served by an engine group), a LoRA adapter (hot-loaded into its base model's
engines through vLLM's /v1/load_lora_adapter) or a merged adapter (its own engine, LoRA off). With several
replicas of one base model, rendezvous hashing keeps each adapter on a stable replica, so it is loaded once
rather than everywhere, and only the adapters of a lost replica move when one goes down.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

from serve.config import ServeConfig, merged_group
from serve.gateway.metrics import Metrics
from serve.gateway.protocol import ApiError
from serve.store.store import version_id

log = logging.getLogger("lorafleet.serve")


@dataclass
class Replica:
    name: str  # the `upstream` label
    url: str
    engine: str  # engine group
    managed: bool  # started by our supervisor (else it runs elsewhere)
    up: bool | None = None  # None until the first health check
    inflight: int = 0
    refused: bool = False  # the last failed health check was a refused connection (process gone)
    loaded: set[str] = field(default_factory=set)
    loading: dict[str, asyncio.Task] = field(default_factory=dict)


@dataclass
class Model:
    name: str  # what clients send as `model`
    kind: Literal["base", "lora", "merged"]
    engine: str  # the engine group that serves it
    base: str | None = None  # base model name (adapters)
    path: Path | None = None  # adapter folder (lora)
    created: int = field(default_factory=lambda: int(time.time()))
    inflight: int = 0  # admitted requests not yet finished: a version is unloaded only at 0

    @property
    def adapter(self) -> str:
        """The adapter a version belongs to (`name@digest` -> `name`): the bounded label of its load metrics."""
        return self.name.split("@", 1)[0]


@dataclass
class Alias:
    """What a tenant sends as `model` for a versioned adapter: one version, or a weighted split (canary)."""

    name: str
    targets: list[tuple[str, float]]  # (version id, weight); the id is the name the engine knows it by
    base: str
    created: int = field(default_factory=lambda: int(time.time()))


def pick(alias: Alias, key: str | None) -> str:
    """The version of a split a request goes to: sticky per `key` (user or request id), else at random."""
    if len(alias.targets) == 1:
        return alias.targets[0][0]
    if key is None:
        u = random.random()
    else:
        u = int.from_bytes(hashlib.blake2b(f"{alias.name}\0{key}".encode(), digest_size=8).digest(), "big") / 2**64
    acc = 0.0
    for version, weight in alias.targets:
        acc += weight
        if u < acc:
            return version
    return alias.targets[-1][0]


def rendezvous(key: str, names: list[str]) -> list[str]:
    """`names` ordered by highest random weight for `key`: stable across processes and restarts, and removing
    one name only moves the keys that ranked it first."""

    def weight(name: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{key}\0{name}".encode(), digest_size=8).digest(), "big")

    return sorted(names, key=weight, reverse=True)


class Registry:
    def __init__(self, cfg: ServeConfig, metrics: Metrics, adapter_paths: dict[str, Path]):
        """`adapter_paths`: resolved folders of the configured LoRA adapters that exist (others are skipped)."""
        self.cfg, self.metrics = cfg, metrics
        self.groups: dict[str, list[Replica]] = {}
        self.models: dict[str, Model] = {}
        self.aliases: dict[str, Alias] = {}
        self.client: httpx.AsyncClient | None = None  # set by the gateway when its event loop runs
        self._tasks: set[asyncio.Task] = set()
        for e in cfg.engines:
            urls, names = e.replica_urls(), e.replica_names()
            self.groups[e.name] = [Replica(n, u, e.name, e.managed) for n, u in zip(names, urls, strict=True)]
            self.models[e.public_name] = Model(e.public_name, "base", e.name)
            for n in names:
                metrics.price.labels(n, e.public_name).set(e.price_usd_per_hour)
        for a in cfg.adapters:
            base = cfg.engine_for(a.base)
            if a.mode == "merged":
                group = merged_group(a.name)
                url = a.url or f"http://127.0.0.1:{a.port}"
                self.groups[group] = [Replica(group, url, group, a.url is None)]
                self.models[a.name] = Model(a.name, "merged", group, base=a.base)
                metrics.price.labels(group, a.name).set(base.price_usd_per_hour)
            elif a.name in adapter_paths:
                self.add_named(a.name, adapter_paths[a.name], a.base)
        for replicas in self.groups.values():
            for r in replicas:
                metrics.upstream_up.labels(r.name).set(0)

    # -- lookup and routing

    def resolve(self, name: str, key: str | None = None) -> Model | None:
        """The model a client's `model` names; an alias resolves to one of its versions (see `pick`)."""
        alias = self.aliases.get(name)
        if alias is not None:
            return self.models.get(pick(alias, key))
        return self.models.get(name)

    def names(self) -> list[tuple[str, str | None, int]]:
        """(name, base, created) of everything a client may send as `model`: models and aliases, not versions."""
        versions = {v for a in self.aliases.values() for v, _ in a.targets} | {
            m.name for m in self.models.values() if "@" in m.name}  # fmt: skip
        out = [(m.name, m.base, m.created) for m in self.models.values() if m.name not in versions]
        return out + [(a.name, a.base, a.created) for a in self.aliases.values()]

    def replica(self, name: str) -> Replica | None:
        return next((r for rs in self.groups.values() for r in rs if r.name == name), None)

    def route(self, model: Model) -> list[Replica]:
        """Replicas to try, best first; replicas known to be down go last (their state may be stale)."""
        replicas = self.groups[model.engine]
        if len(replicas) > 1:
            if model.kind == "lora":
                order = {n: i for i, n in enumerate(rendezvous(model.adapter, [r.name for r in replicas]))}
                replicas = sorted(replicas, key=lambda r: order[r.name])
            else:
                replicas = sorted(replicas, key=lambda r: r.inflight)  # no affinity to keep: least busy first
        return sorted(replicas, key=lambda r: r.up is False)

    # -- runtime registration

    def add_adapter(self, name: str, path: Path, base: str) -> Model:
        engine = self.cfg.engine_for(base)
        model = self.models[name] = Model(name, "lora", engine.name, base=base, path=path)
        return model

    def add_named(self, name: str, path: Path, base: str, version: str | None = None) -> str:
        """An adapter clients call `name`, served as the version its files are: the engine only ever hears the
        content-named version, so new files under an old name can never be answered with the old weights."""
        version = version or version_id(name, path)
        if version not in self.models:
            self.add_adapter(version, path, base)
        self.set_alias(name, [(version, 1.0)], base)
        return version

    # -- versions and aliases

    async def preload(self, versions: list[str]) -> None:
        """Load versions where their requests will go, before an alias moves to them: no request meets a cold or
        missing adapter."""
        for version in versions:
            model = self.models[version]
            for replica in [r for r in self.route(model) if r.up is not False][:1]:
                await self.ensure_loaded(model, replica)

    def set_alias(self, name: str, targets: list[tuple[str, float]], base: str) -> None:
        """Move an alias; versions no alias points at any more are unloaded once their in-flight requests end."""
        before = {v for a in self.aliases.values() for v, _ in a.targets}
        old = self.aliases.get(name)
        self.aliases[name] = Alias(name, targets, base, old.created if old else int(time.time()))
        after = {v for a in self.aliases.values() for v, _ in a.targets}
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # at start-up, before the loop: nothing is loaded yet, nothing to retire
            return
        for version in before - after:
            task = loop.create_task(self._retire(version))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def drop_alias(self, name: str) -> None:
        self.set_alias(name, [], self.aliases[name].base)  # retires the versions only this alias used
        del self.aliases[name]

    async def _retire(self, version: str, timeout: float = 600.0) -> None:
        model = self.models.get(version)
        deadline = time.monotonic() + timeout
        while model is not None and model.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if any(version in (v for v, _ in a.targets) for a in self.aliases.values()):
            return  # pointed at again meanwhile (a rollback): keep it
        await self.unload(version)

    async def unload(self, name: str) -> None:
        model = self.models.get(name)
        for r in self.groups.get(model.engine, []) if model else []:
            if name in r.loaded:
                r.loaded.discard(name)
                try:  # vLLM keeps the weights until LRU eviction, but stops serving the name
                    await self.client.post(f"{r.url}/v1/unload_lora_adapter", json={"lora_name": name})
                except httpx.HTTPError as e:
                    log.warning("unloading %s from %s failed: %s", name, r.name, e)

    async def remove_adapter(self, name: str) -> None:
        await self.unload(name)
        self.models.pop(name)

    # -- hot-loading

    async def ensure_loaded(self, model: Model, replica: Replica) -> None:
        """Load a LoRA adapter into a replica unless it is there. Concurrent callers share one load."""
        if model.kind != "lora" or model.name in replica.loaded:
            return
        task = replica.loading.get(model.name)
        if task is None:
            task = replica.loading[model.name] = asyncio.create_task(self._load(model, replica))
            task.add_done_callback(lambda _: replica.loading.pop(model.name, None))
        # shield: a waiter whose client went away must not cancel the load the others wait for
        await asyncio.shield(task)

    async def _load(self, model: Model, replica: Replica) -> None:
        t0 = time.perf_counter()
        body = {"lora_name": model.name, "lora_path": str(model.path)}
        try:
            resp = await self.client.post(f"{replica.url}/v1/load_lora_adapter", json=body)
        except httpx.HTTPError:
            self.metrics.adapter_loads.labels(model.adapter, "error").inc()
            raise  # the caller fails over to another replica
        # After a gateway restart the engine may still hold it: vLLM then answers 400 "already been loaded".
        ok = resp.status_code == 200 or (resp.status_code == 400 and "already been loaded" in resp.text)
        self.metrics.adapter_loads.labels(model.adapter, "ok" if ok else "error").inc()
        if not ok:
            log.error("engine %s refused adapter %s: %s %s", replica.name, model.name, resp.status_code, resp.text)
            raise ApiError(
                502, f"the engine could not load adapter {model.name!r}", "server_error", code="adapter_load_failed"
            )
        self.metrics.adapter_load_seconds.labels(model.adapter).observe(time.perf_counter() - t0)
        replica.loaded.add(model.name)

    def forget_loaded(self, replica: Replica, adapter: str) -> None:
        """The engine no longer has it (it said 404): load it again on next use."""
        replica.loaded.discard(adapter)

    # -- engine life

    def mark(self, replica: Replica, up: bool) -> None:
        replica.up = up
        self.metrics.upstream_up.labels(replica.name).set(1 if up else 0)

    def mark_unreachable(self, replica: Replica) -> None:
        self.mark(replica, False)
        replica.refused = True

    def replica_restarted(self, name: str) -> None:
        """A fresh engine process holds no runtime-loaded adapters: clear the set and load them back."""
        replica = self.replica(name)
        if replica is None:
            return
        previous, replica.loaded = set(replica.loaded), set()
        self.mark(replica, True)
        log.info("engine %s restarted; reloading adapters %s", name, sorted(previous))
        for adapter in previous:
            model = self.models.get(adapter)
            if model is not None and self.client is not None:
                task = asyncio.get_running_loop().create_task(self._reload(model, replica))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _reload(self, model: Model, replica: Replica) -> None:
        try:
            await self.ensure_loaded(model, replica)
        except (httpx.HTTPError, ApiError) as e:
            log.warning("reloading %s into %s failed (%s); it will load on next use", model.name, replica.name, e)

    async def check_health(self, timeout: float) -> None:
        async def one(r: Replica) -> None:
            try:
                ok = (await self.client.get(f"{r.url}/health", timeout=timeout)).status_code == 200
            except httpx.TimeoutException:
                ok = False  # busy, not necessarily gone
            except httpx.HTTPError:
                ok, r.refused = False, True
            self.mark(r, ok)
            # An external engine that refused connections and answers again was restarted: its adapters are
            # gone. (The supervisor reports restarts of the engines we run ourselves.)
            if ok and r.refused:
                r.refused = False
                if not r.managed:
                    self.replica_restarted(r.name)

        await asyncio.gather(*(one(r) for rs in self.groups.values() for r in rs))

    async def health_loop(self, interval: float, timeout: float) -> None:
        while True:
            try:
                await self.check_health(timeout)
            except Exception:  # the loop must outlive any one bad check
                log.exception("health check failed")
            await asyncio.sleep(interval)
