"""The gateway's parts in one container: tenants, limits, the adapter registry, the proxy and their metrics.

It knows nothing of HTTP routing: app.py wraps it in a FastAPI app, and the routes reach its parts through the
dependencies in deps.py, so no module below it needs to import it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import httpx

from lorafleet.core.paths import data_dir
from serve.config import ServeConfig
from serve.engines.deploy import adapters_root, configured_adapters
from serve.engines.supervisor import Supervisor
from serve.gateway.limits import Limiter
from serve.gateway.metrics import Metrics
from serve.gateway.proxy import Proxy
from serve.gateway.registry import Registry
from serve.gateway.shared_limits import RedisLimiter
from serve.gateway.tenants import NANO, TenantStore, Usage
from serve.store.schema import AliasRow, VersionRow
from serve.store.store import Store

log = logging.getLogger("lorafleet.serve")


class Gateway:
    """One per served config; `start` and `stop` run inside the event loop that serves it."""

    def __init__(
        self, cfg: ServeConfig, adapter_paths: dict[str, Path] | None = None, supervisor: Supervisor | None = None
    ):
        self.cfg = cfg
        self.metrics = Metrics()
        self.tenants = TenantStore(cfg.tenants)
        g = cfg.gateway
        self.limiter = Limiter() if g.redis_url is None else RedisLimiter(g.redis_url, lease_s=g.request_timeout_s)
        self.adapters_root = adapters_root(cfg)
        paths = configured_adapters(cfg) if adapter_paths is None else adapter_paths
        self.registry = Registry(cfg, self.metrics, paths)
        self.proxy = Proxy(
            settings=cfg.gateway,
            price=cfg.price,
            tenants=self.tenants,
            limiter=self.limiter,
            registry=self.registry,
            metrics=self.metrics,
            get_session=self.engine_session,
        )
        self.supervisor = supervisor
        self.data = data_dir()
        self.store = Store.open(cfg.gateway.store_url, self.data)
        self._restore()
        self.client: httpx.AsyncClient | None = None
        self.session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []
        for name in self.tenants.tenants:  # every tenant has its series from the start, at 0
            self.metrics.inflight.labels(name).set(0)
        self.refresh_gauges()

    # -- state in the store

    def _restore(self) -> None:
        """Seed the store with the config's tenants, then take back what it holds: grants, usage, models."""
        self.store.seed_tenants([{"name": t.name, "key_hashes": t.api_key_hashes, "models": t.models}
                                 for t in self.cfg.tenants])  # fmt: skip
        for name, models in self.store.tenant_models().items():
            if name in self.tenants.tenants:
                self.tenants.tenants[name].models |= set(models)
        for name, u in self.store.usage_totals().items():
            if name in self.tenants.tenants:
                self.tenants.tenants[name].usage = Usage(u["requests"], u["prompt_tokens"], u["completion_tokens"],
                                                         u["cost_nano_usd"])  # fmt: skip
        self.trained_floor = self.store.last_usage_id()  # the totals above hold every job billed up to here
        self.trained_seen: set[int] = set()  # rows read since; ids may commit out of order, so not a high-water mark
        self.sync_models()

    async def read_training(self) -> None:
        """Fine-tuning jobs the workers billed since the last look: into the tenant's $ budgets, its usage and (from
        the one gateway that charged it first) Prometheus. A row is passed only once it is charged: a Redis outage
        leaves it for the next round."""
        rows = await asyncio.to_thread(self.store.training_usage, self.trained_floor)
        for row in (r for r in rows if r.id not in self.trained_seen):
            tenant = self.tenants.tenants.get(row.tenant)
            if tenant is not None:
                first = await self.limiter.charge_once(f"usage-{row.id}", row.tenant, row.cost_nano_usd / NANO)
                tenant.usage.cost_nano_usd += row.cost_nano_usd
                if first:  # summed over gateways, the counters show each job once
                    self.metrics.tokens.labels(row.tenant, row.model, "trained").inc(row.trained_tokens)
                    self.metrics.cost.labels(row.tenant, row.model).inc(row.cost_nano_usd / NANO)
            self.trained_seen.add(row.id)

    def flush_usage(self) -> None:
        """Append what was metered since the last flush to the ledger; its sum is always the running total."""
        self.write_usage(self.take_usage())

    def take_usage(self) -> dict:
        # On the event loop (or with it stopped): the proxy adds to these rows there, so the swap cannot race it.
        pending, self.proxy.ledger = self.proxy.ledger, {}
        return pending

    def write_usage(self, pending: dict) -> None:
        rows = [{"tenant": t, "model": m, "version": v, "requests": r, "prompt_tokens": p, "completion_tokens": c,
                 "cost_nano_usd": n} for (t, m, v), (r, p, c, n) in pending.items()]  # fmt: skip
        try:
            self.store.record_usage(rows)
        except Exception:
            for key, row in pending.items():  # the database is away: keep the rows for the next flush
                mine = self.proxy.ledger.setdefault(key, [0, 0, 0, 0])
                for i, x in enumerate(row):
                    mine[i] += x
            raise

    def sync_models(self) -> None:
        self.apply_store(*self.read_store())

    def read_store(self) -> tuple[list[VersionRow], list[AliasRow]]:
        """The versions and aliases in the store (registered here, by a worker, or by another gateway). Reads
        only, so it may run off the event loop."""
        return self.store.versions(), self.store.aliases()

    def apply_store(self, versions: list[VersionRow], aliases: list[AliasRow]) -> None:
        """Serve what the store holds that this gateway does not: new versions, new or moved aliases."""
        reg, owner = self.registry, {v.id: v.owner for v in versions}
        for v in versions:
            if v.id not in reg.models and self.cfg.engine_for(v.base) is not None:
                reg.add_adapter(v.id, Path(v.path), v.base)
            self.tenants.restrict(v.id, [v.owner] if v.owner else None)
        for a in aliases:
            targets = [(t["version"], float(t["weight"])) for t in a.targets]
            if a.name in reg.models or not all(v in reg.models for v, _ in targets):  # a base or merged model
                continue
            # an alias with a tenant list, or serving a tenant's own versions, is theirs only: outside '*'
            self.tenants.restrict(a.name, a.tenants or [owner[v] for v, _ in targets if owner.get(v)])
            granted = [t.name for t in self.tenants.tenants.values() if a.name in t.models]
            self.tenants.revoke(a.name, [t for t in granted if t not in a.tenants])  # another gateway revoked it
            current = reg.aliases.get(a.name)
            if current is None or current.targets != targets:
                reg.set_alias(a.name, targets, reg.models[targets[0][0]].base)
                log.info("alias %s -> %s (from the store)", a.name, targets)
            self.tenants.grant(a.name, [t for t in a.tenants if t in self.tenants.tenants])

    async def _store_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.limiter.refresh(list(self.tenants.tenants))  # shared limits: counts for the reports
            try:
                await asyncio.to_thread(self.write_usage, self.take_usage())
                await self.read_training()
                self.apply_store(*await asyncio.to_thread(self.read_store))  # registry changes on the loop only
            except Exception:  # a database hiccup must not end the loop; the next round retries
                log.exception("store sync failed")

    def engine_session(self) -> aiohttp.ClientSession:
        # Clients bind to the event loop they first run in: they can only be made in `start`.
        if self.session is None:
            raise RuntimeError("the gateway has not started: it has no engine client yet")
        return self.session

    def http_client(self) -> httpx.AsyncClient:
        if self.client is None:
            raise RuntimeError("the gateway has not started: it has no engine client yet")
        return self.client

    async def start(self) -> None:
        g = self.cfg.gateway
        # Keep-alive connections are reused instead of a TCP handshake each. Completions, the hot path, go through
        # aiohttp: a streamed request costs 0.3 ms of client time there against 1.5 ms in httpx (measured here), and
        # on 2 cores that time is the engine's. httpx serves the rest (adapter loads, health, discovery, admin).
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),  # below uvicorn's 5 s: vLLM closes first
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=g.connect_timeout_s, sock_read=g.request_timeout_s),
            auto_decompress=False,  # the engine's bytes are passed on as they are
            trust_env=False,  # engines are local; a proxy from the environment must not sit in between
        )
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(g.request_timeout_s, connect=g.connect_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
            trust_env=False,
        )
        self.registry.client = self.client
        await self.limiter.start()
        await self.registry.discover()
        await self.registry.check_health(timeout=g.connect_timeout_s)
        self._tasks.append(asyncio.create_task(self.registry.health_loop(g.health_interval_s, g.connect_timeout_s)))
        self._tasks.append(asyncio.create_task(self._store_loop(g.store_poll_s)))
        if self.supervisor is not None:
            self.supervisor.on_restart = self.registry.replica_restarted
            self.supervisor.on_down = self._engine_down
            self._tasks.append(asyncio.create_task(self.supervisor.run()))

    def _engine_down(self, name: str) -> None:
        replica = self.registry.replica(name)
        if replica is not None:
            self.registry.mark_unreachable(replica)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.flush_usage()  # nothing metered is lost at shutdown
        await self.limiter.close()
        if self.client is not None:
            await self.client.aclose()
        if self.session is not None:
            await self.session.close()

    def refresh_gauges(self) -> None:
        self.metrics.refresh_quota(self.tenants, self.limiter)
