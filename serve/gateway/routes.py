"""HTTP routes: thin, each gets the gateway's parts it needs as dependencies (deps.py) and hands over to the
module that does the work. Every /admin route sits on `admin_router`, behind the one admin-key dependency.
The two completion routes, the hot path, fetch the proxy with a plain call instead (see `deps.proxy_of`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from serve.gateway import admin
from serve.gateway.deps import (
    AdaptersRootDep,
    AdminDep,
    ClientDep,
    ConfigDep,
    LimiterDep,
    MetricsDep,
    MetricsKeyDep,
    OperatorDep,
    RegistryDep,
    TenantDep,
    TenantsDep,
    proxy_of,
)
from serve.gateway.protocol import ApiError, model_card, model_not_found, openapi_body
from serve.gateway.registry import Registry
from serve.gateway.tenants import Tenant

router = APIRouter()
admin_router = APIRouter(prefix="/admin", dependencies=[AdminDep])

# The function names are part of the API: FastAPI derives each OpenAPI operationId from one.


@router.post("/v1/chat/completions", openapi_extra=openapi_body("chat"))
async def chat_completions(request: Request) -> Response:
    return await proxy_of(request).handle(request, "chat")


@router.post("/v1/completions", openapi_extra=openapi_body("completion"))
async def completions(request: Request) -> Response:
    return await proxy_of(request).handle(request, "completion")


def _visible_models(tenant: Tenant, registry: Registry) -> list[dict]:
    return [model_card(m.name, m.base, m.created) for m in registry.models.values() if tenant.may_use(m.name)]


@router.get("/v1/models")
async def list_models(tenant: TenantDep, registry: RegistryDep) -> dict:
    return {"object": "list", "data": _visible_models(tenant, registry)}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, tenant: TenantDep, registry: RegistryDep) -> dict:
    card = next((c for c in _visible_models(tenant, registry) if c["id"] == model), None)
    if card is None:
        raise model_not_found(model)
    return card


def _replica_names(registry: Registry) -> list[str]:
    return [r.name for rs in registry.groups.values() for r in rs]


@router.get("/health")
async def health(registry: RegistryDep, operator: OperatorDep) -> dict:
    """Anyone learns that the gateway is up; only the metrics or admin key learns which engines are."""
    if not operator:
        return {"status": "ok"}
    replicas = [r for rs in registry.groups.values() for r in rs]
    return {"status": "ok", "upstreams": {r.name: bool(r.up) for r in replicas}}


@router.get("/metrics", dependencies=[MetricsKeyDep])
async def metrics(m: MetricsDep, tenants: TenantsDep, limiter: LimiterDep) -> Response:
    m.refresh_quota(tenants, limiter)
    return Response(m.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/engines/{name}/metrics", dependencies=[MetricsKeyDep])
async def engine_metrics(name: str, registry: RegistryDep, client: ClientDep) -> Response:
    """An engine's own vLLM metrics, for a Prometheus that can reach only the gateway."""
    replica = registry.replica(name)
    if replica is None:
        raise ApiError(404, f"no engine {name!r}; engines: {sorted(_replica_names(registry))}")
    try:
        resp = await client.get(f"{replica.url}/metrics")
    except Exception as e:
        raise ApiError(
            503, f"engine {name!r} unreachable: {e}", "server_error", headers={"Retry-After": "5"}
        ) from None
    return Response(resp.content, status_code=resp.status_code, media_type=resp.headers.get("content-type"))


@admin_router.post("/adapters", status_code=201, openapi_extra=openapi_body("register"))
async def register_adapter(
    request: Request, cfg: ConfigDep, registry: RegistryDep, tenants: TenantsDep, root: AdaptersRootDep
) -> dict:
    req = admin.parse_register(await request.body())
    return await admin.register_adapter(req, cfg=cfg, registry=registry, tenants=tenants, root=root)


@admin_router.get("/adapters")
async def list_adapters(registry: RegistryDep) -> dict:
    return admin.adapters_report(registry)


@admin_router.delete("/adapters/{name}")
async def delete_adapter(name: str, registry: RegistryDep, tenants: TenantsDep) -> dict:
    return await admin.remove_adapter(name, registry=registry, tenants=tenants)


@admin_router.get("/tenants")
async def tenants(store: TenantsDep, limiter: LimiterDep) -> JSONResponse:
    return JSONResponse(admin.tenants_report(store, limiter))


router.include_router(admin_router)  # after its routes: including copies the routes defined so far
