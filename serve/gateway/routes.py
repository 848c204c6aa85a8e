"""HTTP routes: thin, each hands over to the module that does the work."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from serve.gateway import admin
from serve.gateway.protocol import ApiError, model_card, model_not_found, openapi_body, unauthorized
from serve.gateway.tenants import bearer_key

router = APIRouter()


def _gw(request: Request):
    return request.app.state.gateway


@router.post("/v1/chat/completions", openapi_extra=openapi_body("chat"))
async def chat_completions(request: Request) -> Response:
    return await _gw(request).proxy.handle(request, "chat")


@router.post("/v1/completions", openapi_extra=openapi_body("completion"))
async def completions(request: Request) -> Response:
    return await _gw(request).proxy.handle(request, "completion")


def _visible_models(request: Request) -> list[dict]:
    gw = _gw(request)
    tenant = gw.tenants.authenticate(bearer_key(request.headers.get("authorization")))
    if tenant is None:
        raise unauthorized()
    return [model_card(m.name, m.base, m.created) for m in gw.registry.models.values() if tenant.may_use(m.name)]


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": _visible_models(request)}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict:
    card = next((c for c in _visible_models(request) if c["id"] == model), None)
    if card is None:
        raise model_not_found(model)
    return card


@router.get("/health")
async def health(request: Request) -> dict:
    replicas = [r for rs in _gw(request).registry.groups.values() for r in rs]
    return {"status": "ok", "upstreams": {r.name: bool(r.up) for r in replicas}}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    gw = _gw(request)
    gw.refresh_gauges()
    return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/engines/{name}/metrics")
async def engine_metrics(name: str, request: Request) -> Response:
    """An engine's own vLLM metrics, for a Prometheus that can reach only the gateway."""
    gw = _gw(request)
    replica = gw.registry.replica(name)
    if replica is None:
        raise ApiError(
            404, f"no engine {name!r}; engines: {sorted(r.name for rs in gw.registry.groups.values() for r in rs)}"
        )
    try:
        resp = await gw.client.get(f"{replica.url}/metrics")
    except Exception as e:
        raise ApiError(
            503, f"engine {name!r} unreachable: {e}", "server_error", headers={"Retry-After": "5"}
        ) from None
    return Response(resp.content, status_code=resp.status_code, media_type=resp.headers.get("content-type"))


@router.post("/admin/adapters", status_code=201, openapi_extra=openapi_body("register"))
async def register_adapter(request: Request) -> dict:
    gw = _gw(request)
    admin.require_admin(gw, request.headers.get("authorization"))
    return await admin.register_adapter(gw, admin.parse_register(await request.body()))


@router.get("/admin/adapters")
async def list_adapters(request: Request) -> dict:
    gw = _gw(request)
    admin.require_admin(gw, request.headers.get("authorization"))
    return admin.adapters_report(gw)


@router.delete("/admin/adapters/{name}")
async def delete_adapter(name: str, request: Request) -> dict:
    gw = _gw(request)
    admin.require_admin(gw, request.headers.get("authorization"))
    return await admin.remove_adapter(gw, name)


@router.get("/admin/tenants")
async def tenants(request: Request) -> JSONResponse:
    gw = _gw(request)
    admin.require_admin(gw, request.headers.get("authorization"))
    return JSONResponse(admin.tenants_report(gw))
