"""The gateway's parts in one container: tenants, limits, the adapter registry, the proxy and their metrics.

It knows nothing of HTTP routing: app.py wraps it in a FastAPI app, and the routes reach its parts through the
dependencies in deps.py, so no module below it needs to import it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from serve.config import ServeConfig
from serve.engines.deploy import adapters_root, configured_adapters
from serve.engines.supervisor import Supervisor
from serve.gateway.limits import Limiter
from serve.gateway.metrics import Metrics
from serve.gateway.proxy import Proxy
from serve.gateway.registry import Registry
from serve.gateway.tenants import TenantStore


class Gateway:
    """One per served config; `start` and `stop` run inside the event loop that serves it."""

    def __init__(
        self, cfg: ServeConfig, adapter_paths: dict[str, Path] | None = None, supervisor: Supervisor | None = None
    ):
        self.cfg = cfg
        self.metrics = Metrics()
        self.tenants = TenantStore(cfg.tenants)
        self.limiter = Limiter()
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
            get_client=self.http_client,
        )
        self.supervisor = supervisor
        self.client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task] = []
        for name in self.tenants.tenants:  # every tenant has its series from the start, at 0
            self.metrics.inflight.labels(name).set(0)
        self.refresh_gauges()

    def http_client(self) -> httpx.AsyncClient:
        # An httpx client binds to the event loop it first runs in: it can only be made in `start`.
        if self.client is None:
            raise RuntimeError("the gateway has not started: it has no engine client yet")
        return self.client

    async def start(self) -> None:
        g = self.cfg.gateway
        # One client for every engine call: keep-alive connections are reused instead of a TCP handshake each.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(g.request_timeout_s, connect=g.connect_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
            trust_env=False,  # engines are local; a proxy from the environment must not sit in between
        )
        self.registry.client = self.client
        await self.registry.check_health(timeout=g.connect_timeout_s)
        self._tasks.append(asyncio.create_task(self.registry.health_loop(g.health_interval_s, g.connect_timeout_s)))
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
        if self.client is not None:
            await self.client.aclose()

    def refresh_gauges(self) -> None:
        self.metrics.refresh_quota(self.tenants, self.limiter)
