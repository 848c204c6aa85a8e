"""FastAPI dependencies: what a route needs from the gateway, taken from the app it runs in.

Every provider is `async def`: FastAPI runs a plain `def` dependency in a worker thread, a thread hop per
request. Each reads the gateway straight off `app.state`, one level deep, so a route pays one dependency per
part it asks for. This is the only module that knows where the gateway is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import httpx
from fastapi import Depends, Request

from serve.config import Limits, ServeConfig
from serve.gateway.admin import check_admin_key, check_metrics_key, is_operator
from serve.gateway.limits import Limiter
from serve.gateway.metrics import Metrics
from serve.gateway.protocol import over_budget, rate_limited, unauthorized
from serve.gateway.proxy import Proxy
from serve.gateway.registry import Registry
from serve.gateway.tenants import Tenant, TenantStore, bearer_key
from serve.store.store import Store

if TYPE_CHECKING:
    from serve.gateway.gateway import Gateway


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def get_config(request: Request) -> ServeConfig:
    return _gateway(request).cfg


def proxy_of(request: Request) -> Proxy:
    """The completion routes' proxy, fetched with a plain call: resolving a FastAPI dependency costs about 12 us
    a request (measured: 55 us -> 67 us for a bare route), which the hot path cannot spare on 2 cores."""
    return _gateway(request).proxy


async def get_registry(request: Request) -> Registry:
    return _gateway(request).registry


async def get_tenants(request: Request) -> TenantStore:
    return _gateway(request).tenants


async def get_limiter(request: Request) -> Limiter:
    return _gateway(request).limiter


async def get_metrics(request: Request) -> Metrics:
    return _gateway(request).metrics


async def get_store(request: Request) -> Store:
    return _gateway(request).store


async def get_data_dir(request: Request) -> Path:
    return _gateway(request).data


async def get_client(request: Request) -> httpx.AsyncClient:
    return _gateway(request).http_client()


async def get_adapters_root(request: Request) -> Path:
    return _gateway(request).adapters_root


async def get_tenant(request: Request) -> Tenant:
    """The tenant whose API key the request carries; 401 without one."""
    tenant = _gateway(request).tenants.authenticate(bearer_key(request.headers.get("authorization")))
    if tenant is None:
        raise unauthorized()
    return tenant


async def _admitted(request: Request, budgets: bool) -> Tenant:
    tenant = await get_tenant(request)
    limiter, mine = _gateway(request).limiter, tenant.limits
    spend = {"usd_per_day": mine.usd_per_day, "usd_per_month": mine.usd_per_month} if budgets else {}
    decision = await limiter.acquire(tenant.name, Limits(rpm=mine.rpm, **spend))
    if not decision.ok:
        if decision.limit.startswith("usd_"):
            raise over_budget(decision.message, decision.retry_after_header)
        raise rate_limited(decision.limit, decision.retry_after_header)
    limiter.release(tenant.name, lease=decision.lease)  # no slot held: these routes answer from the store
    return tenant


async def get_metered_tenant(request: Request) -> Tenant:
    """The tenant, counted against its rpm like a completion (files and fine-tuning routes): 429 past it."""
    return await _admitted(request, budgets=False)


async def get_budgeted_tenant(request: Request) -> Tenant:
    """... and refused (429 insufficient_quota) once its $ budget is spent: what starts new spending."""
    return await _admitted(request, budgets=True)


async def require_admin(request: Request) -> None:
    """401 unless the request carries the admin key (or when the admin API is off)."""
    check_admin_key(_gateway(request).cfg.gateway.admin_key_hash, request.headers.get("authorization"))


async def require_metrics_key(request: Request) -> None:
    """401 unless the metrics are open or the request carries the metrics key (or the admin key)."""
    g = _gateway(request).cfg.gateway
    check_metrics_key(g.metrics_key_hash, g.admin_key_hash, request.headers.get("authorization"))


async def get_is_operator(request: Request) -> bool:
    """Whether the caller holds the metrics or admin key (who may see engine names and states)."""
    g = _gateway(request).cfg.gateway
    return is_operator(g.metrics_key_hash, g.admin_key_hash, request.headers.get("authorization"))


ConfigDep = Annotated[ServeConfig, Depends(get_config)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
TenantsDep = Annotated[TenantStore, Depends(get_tenants)]
LimiterDep = Annotated[Limiter, Depends(get_limiter)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ClientDep = Annotated[httpx.AsyncClient, Depends(get_client)]
AdaptersRootDep = Annotated[Path, Depends(get_adapters_root)]
TenantDep = Annotated[Tenant, Depends(get_tenant)]
MeteredTenantDep = Annotated[Tenant, Depends(get_metered_tenant)]
BudgetedTenantDep = Annotated[Tenant, Depends(get_budgeted_tenant)]
StoreDep = Annotated[Store, Depends(get_store)]
DataDirDep = Annotated[Path, Depends(get_data_dir)]
AdminDep = Depends(require_admin)
MetricsKeyDep = Depends(require_metrics_key)
OperatorDep = Annotated[bool, Depends(get_is_operator)]
