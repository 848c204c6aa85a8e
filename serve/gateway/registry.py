"""Which engine serves which model, where each adapter is loaded, and loading it on first use.

A model name is a base model (served by an engine group), a LoRA adapter (hot-loaded into its base model's
engines through vLLM's /v1/load_lora_adapter) or a merged adapter (its own engine, LoRA off). With several
replicas of one base model, placement is bounded-load consistent hashing (Mirrokni, Thorup, Zadimoghaddam 2018):
rendezvous hashing ranks the replicas for each adapter, so it is loaded once rather than everywhere and only the
adapters of a lost replica move when one goes down; but a request skips a replica that already carries more than
`load_factor` times the group's mean load, to the next in the adapter's own ranking, so a hot adapter spills
onto a second replica (always the same one) instead of queueing behind one. Load is this gateway's requests in
flight plus what other gateways had there at the last scrape of the engine's own running/waiting counts. Each
replica holds at most `max_cpu_loras` adapters: loading one more unloads the least recently used idle one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

from serve.config import ServeConfig, merged_group
from serve.gateway.metrics import Metrics, model_label
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
    used: dict[str, float] = field(default_factory=dict)  # adapter -> when a request last went to it here (LRU)
    engine_load: int = 0  # running + waiting requests the engine reported at its last scrape (all gateways')
    inflight_at_scrape: int = 0  # ours among them

    @property
    def load(self) -> int:
        """Requests on this replica: ours now, plus the other gateways' at the last scrape."""
        return self.inflight + max(0, self.engine_load - self.inflight_at_scrape)


def adapter_of(version: str) -> str:
    """`name@digest` -> `name`."""
    return version.split("@", 1)[0]


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
        """The adapter a version belongs to: the bounded label of its load metrics."""
        return adapter_of(self.name)


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


def bounded(ranked: list[Replica], load_factor: float) -> list[Replica]:
    """`ranked` (an adapter's rendezvous order) with the first replica that stays under `load_factor` x the
    mean load (counting this request) moved to the front; replicas known down are not candidates."""
    up = [r for r in ranked if r.up is not False] or ranked
    cap = math.ceil(load_factor * (sum(r.load for r in up) + 1) / len(up))
    first = next((r for r in up if r.load + 1 <= cap), up[0])
    return [first, *(r for r in ranked if r is not first)]


ENGINE_LOAD = re.compile(r"^vllm:num_requests_(?:running|waiting)(?:\{[^}]*\})? ([0-9.eE+-]+)$", re.M)


def engine_load(metrics_text: str) -> int:
    """Running + waiting requests in a vLLM /metrics page (summed over its engines)."""
    return round(sum(float(v) for v in ENGINE_LOAD.findall(metrics_text)))


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
                self.groups[group] = [Replica(n, u, group, a.url is None)
                                      for n, u in zip(a.replica_names(), a.replica_urls(), strict=True)]  # fmt: skip
                self.models[a.name] = Model(a.name, "merged", group, base=a.base)
                for n in a.replica_names():
                    metrics.price.labels(n, a.name).set(base.price_usd_per_hour)
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
                if self.cfg.gateway.placement == "bounded":
                    replicas = bounded(replicas, self.cfg.gateway.load_factor)
            else:
                replicas = sorted(replicas, key=lambda r: r.load)  # no affinity to keep: least busy first
        return sorted(replicas, key=lambda r: r.up is False)

    def set_replicas(self, engine: str, urls: list[str]) -> list[Replica]:
        """Serve an engine group from these URLs from now on (replicas added or removed while running). Kept
        replicas keep their state; requests already on a removed one finish there; its adapters move to the
        next replica in their ranking on their next request."""
        old = {r.url: r for r in self.groups[engine]}
        replicas = []
        for url in urls:
            r = old.get(url) or Replica(f"{engine}@{url.split('://', 1)[-1]}", url, engine, managed=False)
            if url not in old:
                self.metrics.upstream_up.labels(r.name).set(0)
            replicas.append(r)
        for gone in set(old) - set(urls):
            log.info("engine %s: replica %s removed", engine, old[gone].name)
        self.groups[engine] = replicas
        return replicas

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
                await self._unload_from(r, name)

    async def _unload_from(self, replica: Replica, name: str) -> None:
        replica.loaded.discard(name)
        replica.used.pop(name, None)
        try:  # vLLM keeps the weights until LRU eviction, but stops serving the name
            await self.client.post(f"{replica.url}/v1/unload_lora_adapter", json={"lora_name": name})
        except httpx.HTTPError as e:
            log.warning("unloading %s from %s failed: %s", name, replica.name, e)

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

    def touch(self, replica: Replica, model: Model) -> None:
        if model.kind == "lora":
            replica.used[model.name] = time.monotonic()

    async def _evict_for(self, model: Model, replica: Replica) -> None:
        """Make room for one more adapter: unload the least recently used one no request is using."""
        engine = self.cfg.engine_for(model.base) if model.base else None
        room = (engine.max_cpu_loras or max(engine.max_loras, 8)) if engine else None
        if room is None or len(replica.loaded) < room:
            return
        idle = [n for n in replica.loaded if (m := self.models.get(n)) is None or m.inflight == 0]
        if not idle:
            return  # all busy: vLLM's own cache copes; the next load tries again
        victim = min(idle, key=lambda n: replica.used.get(n, 0.0))
        self.metrics.adapter_loads.labels(model_label(adapter_of(victim)), "evicted").inc()
        log.info("engine %s holds %d adapters (max_cpu_loras): unloading %s, the least recently used",
                 replica.name, room, victim)  # fmt: skip
        await self._unload_from(replica, victim)

    async def _load(self, model: Model, replica: Replica) -> None:
        await self._evict_for(model, replica)
        t0 = time.perf_counter()
        body = {"lora_name": model.name, "lora_path": str(model.path)}
        try:
            resp = await self.client.post(f"{replica.url}/v1/load_lora_adapter", json=body)
        except httpx.HTTPError:
            self.metrics.adapter_loads.labels(model_label(model.adapter), "error").inc()
            raise  # the caller fails over to another replica
        # After a gateway restart the engine may still hold it: vLLM then answers 400 "already been loaded".
        ok = resp.status_code == 200 or (resp.status_code == 400 and "already been loaded" in resp.text)
        self.metrics.adapter_loads.labels(model_label(model.adapter), "ok" if ok else "error").inc()
        if not ok:
            log.error("engine %s refused adapter %s: %s %s", replica.name, model.name, resp.status_code, resp.text)
            raise ApiError(502, "the engine could not load the adapter", "server_error", code="adapter_load_failed")
        self.metrics.adapter_load_seconds.labels(model_label(model.adapter)).observe(time.perf_counter() - t0)
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
        async def one(r: Replica, scrape: bool) -> None:
            try:
                ok = (await self.client.get(f"{r.url}/health", timeout=timeout)).status_code == 200
                if ok and scrape:  # the load other gateways put there, for placement
                    inflight = r.inflight
                    resp = await self.client.get(f"{r.url}/metrics", timeout=timeout)
                    r.engine_load, r.inflight_at_scrape = engine_load(resp.text), inflight
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

        await asyncio.gather(*(one(r, len(rs) > 1) for rs in self.groups.values() for r in rs))

    async def discover(self) -> None:
        """Engines configured by `dns`: their replicas are the name's current addresses."""
        loop = asyncio.get_running_loop()
        for e in (e for e in self.cfg.engines if e.dns is not None):
            host, port = e.dns.rsplit(":", 1)
            try:
                infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except OSError as err:  # keep routing to what we had: a DNS hiccup must not empty the group
                log.warning("engine %s: resolving %s failed (%s); keeping %d replica(s)", e.name, e.dns, err,
                            len(self.groups[e.name]))  # fmt: skip
                continue
            ips = sorted({info[4][0] for info in infos})
            urls = [f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}" for ip in ips]
            if urls != [r.url for r in self.groups[e.name]]:
                log.info("engine %s: replicas %s (from %s)", e.name, urls, e.dns)
                self.set_replicas(e.name, urls)

    async def health_loop(self, interval: float, timeout: float) -> None:
        while True:
            try:
                await self.discover()
                await self.check_health(timeout)
            except Exception:  # the loop must outlive any one bad check
                log.exception("health check failed")
            await asyncio.sleep(interval)
