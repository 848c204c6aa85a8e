"""HTTP routes: thin, each gets the gateway's parts it needs as dependencies (deps.py) and hands over to the
module that does the work. Every /admin route sits on `admin_router`, behind the one admin-key dependency.
The two completion routes, the hot path, fetch the proxy with a plain call instead (see `deps.proxy_of`)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from serve.gateway import admin, finetune
from serve.gateway.bodies import read_body, read_form
from serve.gateway.deps import (
    AdaptersRootDep,
    AdminDep,
    BudgetedTenantDep,
    ClientDep,
    ConfigDep,
    DataDirDep,
    LimiterDep,
    MeteredTenantDep,
    MetricsDep,
    MetricsKeyDep,
    OperatorDep,
    RegistryDep,
    StoreDep,
    TenantDep,
    TenantsDep,
    proxy_of,
)
from serve.gateway.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    CreateVersion,
    FileUpload,
    PointAlias,
    RegisterAdapter,
    SetReplicas,
    model_card,
    model_not_found,
    openapi_body,
)
from serve.gateway.registry import Registry
from serve.gateway.tenants import Tenant
from serve.store.store import StoreError

MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and the `purpose` field around the file
router = APIRouter()
admin_router = APIRouter(prefix="/admin", dependencies=[AdminDep])

# The function names are part of the API: FastAPI derives each OpenAPI operationId from one.


@router.post("/v1/chat/completions", openapi_extra=openapi_body(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    return await proxy_of(request).handle(request, "chat")


@router.post("/v1/completions", openapi_extra=openapi_body(CompletionRequest))
async def completions(request: Request) -> Response:
    return await proxy_of(request).handle(request, "completion")


def _visible_models(tenant: Tenant, registry: Registry) -> list[dict]:
    return [model_card(name, base, created) for name, base, created in registry.names() if tenant.may_use(name)]


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
async def health(registry: RegistryDep, limiter: LimiterDep, store: StoreDep, operator: OperatorDep) -> dict:
    """Anyone learns that the gateway is up (`degraded` while its shared limits or its store are away: requests
    that need them get 503); only the metrics or admin key learns which engines are, and where state lives."""
    limits = limiter.health()
    status = "degraded" if (limits["shared"] and not limits["up"]) or not store.up else "ok"
    if not operator:
        return {"status": status}
    replicas = [r for rs in registry.groups.values() for r in rs]
    return {"status": status, "upstreams": {r.name: bool(r.up) for r in replicas}, "limits": limits,
            "store": {"backend": store.backend, "up": store.up}}  # fmt: skip


@router.get("/metrics", dependencies=[MetricsKeyDep])
async def metrics(m: MetricsDep, tenants: TenantsDep, limiter: LimiterDep, store: StoreDep) -> Response:
    m.refresh_quota(tenants, limiter)
    m.refresh_state(store.up, limiter.health())
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


@admin_router.post("/adapters", status_code=201, openapi_extra=openapi_body(RegisterAdapter))
async def register_adapter(
    request: Request,
    cfg: ConfigDep,
    registry: RegistryDep,
    tenants: TenantsDep,
    root: AdaptersRootDep,
    store: StoreDep,
) -> dict:
    req = admin.parse_register(await read_body(request, cfg.gateway.max_body_bytes))
    return await admin.register_adapter(req, cfg=cfg, registry=registry, tenants=tenants, root=root, store=store)


@admin_router.get("/adapters")
async def list_adapters(registry: RegistryDep) -> dict:
    return admin.adapters_report(registry)


@admin_router.delete("/adapters/{name}")
async def delete_adapter(name: str, registry: RegistryDep, tenants: TenantsDep, store: StoreDep) -> dict:
    return await admin.remove_adapter(name, registry=registry, tenants=tenants, store=store)


@admin_router.post("/versions", status_code=201, openapi_extra=openapi_body(CreateVersion))
async def create_version(
    request: Request,
    cfg: ConfigDep,
    registry: RegistryDep,
    tenants: TenantsDep,
    store: StoreDep,
    root: AdaptersRootDep,
) -> dict:
    req = admin.parse_body(await read_body(request, cfg.gateway.max_body_bytes), CreateVersion)
    return await admin.create_version(req, cfg=cfg, registry=registry, tenants=tenants, store=store, root=root)


@admin_router.get("/versions")
async def list_versions(store: StoreDep, adapter: str | None = None) -> dict:
    rows = await run_in_threadpool(store.versions, adapter)
    return {"versions": [admin.version_object(v) for v in rows]}


@admin_router.put("/aliases/{name}", openapi_extra=openapi_body(PointAlias))
async def point_alias(
    name: str, request: Request, registry: RegistryDep, tenants: TenantsDep, store: StoreDep, cfg: ConfigDep
) -> dict:
    req = admin.parse_body(await read_body(request, cfg.gateway.max_body_bytes), PointAlias)
    return await admin.point_alias(name, req, registry=registry, tenants=tenants, store=store)


@admin_router.post("/aliases/{name}/rollback")
async def rollback_alias(name: str, registry: RegistryDep, tenants: TenantsDep, store: StoreDep) -> dict:
    return await admin.rollback_alias(name, registry=registry, tenants=tenants, store=store)


@admin_router.get("/aliases/{name}")
async def get_alias(name: str, store: StoreDep) -> dict:
    row = await run_in_threadpool(store.alias, name)
    if row is None:
        raise ApiError(404, f"no alias {name!r}", code="not_found")
    return await run_in_threadpool(admin.alias_object, row, store)


@admin_router.get("/engines")
async def engines(registry: RegistryDep) -> dict:
    return admin.engines_report(registry)


@admin_router.put("/engines/{name}/replicas", openapi_extra=openapi_body(SetReplicas))
async def set_replicas(name: str, request: Request, registry: RegistryDep, cfg: ConfigDep) -> dict:
    req = admin.parse_body(await read_body(request, cfg.gateway.max_body_bytes), SetReplicas)
    admin.set_replicas(name, req, cfg=cfg, registry=registry)
    await registry.check_health(timeout=cfg.gateway.connect_timeout_s)  # new replicas get a state at once
    return next(e for e in admin.engines_report(registry)["engines"] if e["name"] == name)


@admin_router.get("/tenants")
async def tenants(store: TenantsDep, limiter: LimiterDep) -> JSONResponse:
    return JSONResponse(admin.tenants_report(store, limiter))


# -- the OpenAI Files and fine-tuning API (serve/gateway/finetune.py); the store's I/O runs off the event loop


@router.post("/v1/files", openapi_extra=openapi_body(FileUpload, "multipart/form-data"))
async def upload_file(request: Request, tenant: MeteredTenantDep, store: StoreDep, data: DataDirDep,
                      cfg: ConfigDep) -> dict:  # fmt: skip
    cap = cfg.gateway.max_file_bytes
    form = await read_form(request, cap + MULTIPART_OVERHEAD)
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "file: missing; send the JSONL as the multipart field `file`", param="file")
        raw = await upload.read(cap + 1)
    finally:
        await form.close()
    return await run_in_threadpool(finetune.upload, store, data / "files", tenant, purpose if isinstance(purpose, str)
                                   else None, upload.filename or "upload.jsonl", raw, cap)  # fmt: skip


@router.get("/v1/files")
async def list_files(tenant: MeteredTenantDep, store: StoreDep, purpose: str | None = None) -> dict:
    rows = await run_in_threadpool(store.files, tenant.name, purpose)
    return {"object": "list", "data": [finetune.file_object(r) for r in rows], "has_more": False}


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, tenant: MeteredTenantDep, store: StoreDep) -> dict:
    return finetune.file_object(await run_in_threadpool(finetune.own_file, store, file_id, tenant.name))


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, tenant: MeteredTenantDep, store: StoreDep) -> Response:
    row = await run_in_threadpool(finetune.own_file, store, file_id, tenant.name)
    return Response(await run_in_threadpool(Path(row.path).read_bytes), media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, tenant: MeteredTenantDep, store: StoreDep) -> dict:
    try:
        deleted = await run_in_threadpool(store.delete_file, file_id, tenant.name)
    except StoreError as e:  # a job that has not ended still needs it
        raise ApiError(409, str(e), param="file_id", code="file_in_use") from None
    if not deleted:
        raise finetune.not_found("file", file_id)
    return {"object": "file", "id": file_id, "deleted": True}


@router.post("/v1/fine_tuning/jobs", openapi_extra=openapi_body(finetune.CreateJob))
async def create_fine_tuning_job(request: Request, tenant: BudgetedTenantDep, store: StoreDep, cfg: ConfigDep) -> dict:
    req = finetune.parse_job(await read_body(request, cfg.gateway.max_body_bytes))
    return await run_in_threadpool(lambda: finetune.create_job(req, store=store, cfg=cfg, tenant=tenant))


@router.get("/v1/fine_tuning/jobs")
async def list_fine_tuning_jobs(
    tenant: MeteredTenantDep, store: StoreDep, after: str | None = None, limit: int = 20
) -> dict:
    return await run_in_threadpool(finetune.list_jobs, store, tenant.name, after, limit)


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def get_fine_tuning_job(job_id: str, tenant: MeteredTenantDep, store: StoreDep) -> dict:
    return finetune.job_object(await run_in_threadpool(finetune.own_job, store, job_id, tenant.name))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_fine_tuning_job(job_id: str, tenant: MeteredTenantDep, store: StoreDep) -> dict:
    return await run_in_threadpool(finetune.cancel, store, job_id, tenant.name)


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def list_fine_tuning_events(
    job_id: str, tenant: MeteredTenantDep, store: StoreDep, after: str | None = None, limit: int = 20
) -> dict:
    return await run_in_threadpool(finetune.list_events, store, job_id, tenant.name, after, limit)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def list_fine_tuning_checkpoints(job_id: str, tenant: MeteredTenantDep, store: StoreDep) -> dict:
    return await run_in_threadpool(finetune.list_checkpoints, store, job_id, tenant.name)


router.include_router(admin_router)  # after its routes: including copies the routes defined so far
