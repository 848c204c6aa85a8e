"""The FastAPI app around a Gateway (gateway.py): its routes, its error handlers, its OpenAPI document, and a way
to run it with uvicorn in a thread."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serve.config import ServeConfig
from serve.engines.supervisor import Supervisor
from serve.gateway import routes
from serve.gateway.gateway import Gateway
from serve.gateway.protocol import ApiError, error_body, openapi_components
from serve.store.store import StoreUnavailable

__all__ = ["Gateway", "ServerThread", "create_app", "uvicorn_config"]  # Gateway: importable from here as before

log = logging.getLogger("lorafleet.serve")


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI-style JSON; nothing a client sends can crash the gateway."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(_: Request, e: StoreUnavailable) -> JSONResponse:
        # The database is away (restarting, network): nothing was written, so a retry is safe.
        log.warning("%s", e)
        return ApiError(503, f"{e}; retry shortly", "server_error", code="store_unavailable",
                        headers={"Retry-After": "2"}).response()  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in err["loc"] if p != "body") or None
        return JSONResponse(error_body(f"{param}: {err['msg']}", "invalid_request_error", param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)


def create_app(
    cfg: ServeConfig, adapter_paths: dict[str, Path] | None = None, supervisor: Supervisor | None = None
) -> FastAPI:
    """The gateway app. `adapter_paths` (checked adapter folders by name) defaults to the config's adapters."""
    gateway = Gateway(cfg, adapter_paths, supervisor)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="lorafleet gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gateway = gateway
    app.include_router(routes.router)
    _install_error_handlers(app)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """GET /openapi.json, with the request bodies the routes read themselves (FastAPI cannot see them)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(openapi_components())
        app.openapi_schema = schema
    return app.openapi_schema


def uvicorn_config(app: FastAPI, host: str, port: int) -> uvicorn.Config:
    # httptools + uvloop: the fastest parser and loop uvicorn has; access logs cost CPU per request.
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )


class ServerThread:
    """Run the gateway with uvicorn in a background thread (tests, benchmarks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8080):
        self.app, self.host, self.port = app, host, port
        self.server = uvicorn.Server(uvicorn_config(app, host, port))  # off the main thread: no signal handlers
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="lorafleet-gateway")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def gateway(self) -> Gateway:
        return self.app.state.gateway

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
