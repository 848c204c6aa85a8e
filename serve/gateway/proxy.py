"""Forward one completion request to an engine, stream the answer back, and meter it.

Admission (key, body, model, limits) refuses a request before any engine sees it. The answer is passed on as
the bytes the engine sent (see stream.py). Closing the upstream response when the client goes away closes the
engine connection, which makes vLLM abort the request.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import httpx
from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from serve.config import GatewayConfig, Price, TenantConfig
from serve.gateway.limits import Limiter
from serve.gateway.metrics import Metrics
from serve.gateway.protocol import (
    ApiError,
    Kind,
    ProxyRequest,
    model_not_found,
    parse_request,
    rate_limited,
    unauthorized,
    unavailable,
)
from serve.gateway.registry import Model, Registry, Replica
from serve.gateway.stream import SSE_HEADERS, StreamMeter, bad_upstream, pump, stream_error
from serve.gateway.tenants import UNKNOWN, Tenant, TenantStore, bearer_key

log = logging.getLogger("lorafleet.serve")

PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
CLIENT_CLOSED = 499  # the code nginx uses for "the client closed the connection before the answer ended"


@dataclass
class Context:
    """One admitted request on its way through."""

    tenant: Tenant
    model: Model
    request: ProxyRequest
    t0: float
    code: int = 0
    completed: bool = False
    replica: Replica | None = None
    usage: dict | None = None
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)


async def read_body(request: Request, cap: int) -> bytes:
    """The request body, refusing (413) more than `cap` bytes without reading them all."""
    too_large = ApiError(413, f"request body exceeds {cap} bytes", code="request_too_large")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > cap:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(CLIENT_CLOSED, "the client closed the connection while sending the request") from None
    return b"".join(chunks)


def engine_json(status: int, body: bytes) -> dict:
    """An engine's whole (non-streamed) answer, which vLLM always sends as a JSON object."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        obj = None
    if not isinstance(obj, dict):
        raise bad_upstream(f"the engine answered {status} with a body that is not a JSON object: {body[:100]!r}")
    return obj


def as_api_error(e: Exception, model: str) -> ApiError:
    """What the client is told when an exchange fails: 504 on a timeout, 502 on a broken engine, 500 on a bug."""
    if isinstance(e, ApiError):
        if e.status == 502:
            log.warning("request to %s: %s", model, e.message)
        return e
    if isinstance(e, httpx.TimeoutException):
        log.warning("request to %s timed out: %r", model, e)
        return ApiError(
            504, f"the engine sent nothing for too long ({type(e).__name__})", "server_error", code="timeout"
        )
    if isinstance(e, httpx.HTTPError):
        log.warning("request to %s failed: %r", model, e)
        return ApiError(502, f"the engine connection failed: {e!r}", "server_error", code="engine_error")
    log.exception("request to %s failed", model)
    return ApiError(500, f"internal error: {type(e).__name__}", "server_error")


class ProxyResponse(Response):
    """Runs the upstream exchange as the response, and cancels it if the client disconnects first."""

    def __init__(self, proxy: Proxy, ctx: Context):
        self.proxy, self.ctx = proxy, ctx
        self.status_code, self.raw_headers, self.background = 200, [], None

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                await self.proxy.exchange(self.ctx, send)
                tg.cancel_scope.cancel()

            tg.start_soon(run)
            # The body has been read, so the next message is the disconnect (or the end after our last send).
            while (await receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()


async def _send_error(send, err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Proxy:
    """Admits, forwards and meters completion requests. Built once per gateway, before its event loop runs."""

    def __init__(
        self,
        *,
        settings: GatewayConfig,
        price: Callable[[str, str | None, TenantConfig | None], Price],
        tenants: TenantStore,
        limiter: Limiter,
        registry: Registry,
        metrics: Metrics,
        get_client: Callable[[], httpx.AsyncClient],
    ):
        """`get_client` returns the shared engine client, which exists only once the event loop runs."""
        self.settings, self.price = settings, price
        self.tenants, self.limiter, self.registry, self.m = tenants, limiter, registry, metrics
        self.get_client = get_client

    # -- admission: everything that can refuse a request before an engine sees it

    async def handle(self, request: Request, kind: Kind) -> Response:
        tenant_label = model_label = UNKNOWN
        try:
            tenant = self.tenants.authenticate(bearer_key(request.headers.get("authorization")))
            if tenant is None:
                raise unauthorized()
            tenant_label = tenant.name
            cap = self.settings
            raw = await read_body(request, cap.max_body_bytes)
            preq = parse_request(raw, kind, cap.max_tokens_cap, cap.max_n)
            model = self.registry.resolve(preq.model)
            if model is None or not tenant.may_use(model.name):
                # labelled as an unknown model: /metrics must not tell a prober which names exist
                raise model_not_found(preq.model)
            model_label = model.name
            decision = self.limiter.admit(tenant.name, tenant.limits)
            if not decision.ok:
                self.m.ratelimited.labels(tenant.name, decision.limit).inc()
                raise rate_limited(decision.limit, decision.retry_after_header)
        except ApiError as e:
            self.m.requests.labels(tenant_label, model_label, str(e.status)).inc()
            return e.response()
        self.m.inflight.labels(tenant.name).inc()
        return ProxyResponse(self, Context(tenant, model, preq, time.perf_counter()))

    # -- the exchange with an engine

    async def open(self, ctx: Context) -> httpx.Response:
        """Send the request to the first replica that takes it; fail over on connection errors (nothing has
        been sent to the client yet). Raises ApiError 503 when no replica is reachable."""
        reg, client = self.registry, self.get_client()
        url_path = PATHS[ctx.request.kind]
        for replica in reg.route(ctx.model):
            for attempt in range(2):
                try:
                    await reg.ensure_loaded(ctx.model, replica)
                    req = client.build_request(
                        "POST",
                        replica.url + url_path,
                        content=ctx.request.body,
                        headers={"content-type": "application/json"},
                    )
                    resp = await client.send(req, stream=True)
                except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                    log.warning("engine %s unreachable (%s); trying the next one", replica.name, e)
                    reg.mark_unreachable(replica)
                    break
                except httpx.TimeoutException as e:
                    raise ApiError(
                        504, f"the engine did not answer in time ({e})", "server_error", code="timeout"
                    ) from None
                if resp.status_code == 404 and ctx.model.kind == "lora" and attempt == 0:
                    # The engine lost the adapter (restarted behind our back): load it again, once.
                    await resp.aclose()
                    reg.forget_loaded(replica, ctx.model.name)
                    continue
                if resp.status_code == 503:
                    await resp.aclose()
                    break
                if replica.up is not True:
                    reg.mark(replica, True)
                ctx.replica = replica
                replica.inflight += 1
                return resp
        raise unavailable(f"no engine for {ctx.model.name!r} is reachable; retry shortly", self.settings.retry_after_s)

    async def exchange(self, ctx: Context, send) -> None:
        upstream, started = None, False
        try:
            upstream = await self.open(ctx)
            ctx.code = upstream.status_code
            if ctx.request.stream and upstream.status_code == 200:
                meter = StreamMeter(keep_usage=ctx.request.client_wants_usage)
                head = {"type": "http.response.start", "status": 200, "headers": SSE_HEADERS}
                try:
                    await pump(upstream, send, meter, head)
                finally:
                    started = meter.head_sent
                    # The usage event follows the last token: a client that hangs up after it got everything.
                    ctx.completed = meter.ended or meter.usage is not None
                    ctx.usage, ctx.gaps = meter.usage, meter.gaps
                    ctx.ttft = meter.first - ctx.t0 if meter.first is not None else None
            else:
                body = await upstream.aread()
                answer = engine_json(upstream.status_code, body)
                if upstream.status_code == 200 and isinstance(answer.get("usage"), dict):
                    ctx.usage = answer["usage"]
                ctype = upstream.headers.get("content-type", "application/json").encode()
                headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
                started = True
                ctx.completed = True
                await send({"type": "http.response.start", "status": upstream.status_code, "headers": headers})
                await send({"type": "http.response.body", "body": body, "more_body": False})
        except Exception as e:  # a broken engine connection or a bug must cost one request, not the gateway
            err = as_api_error(e, ctx.model.name)
            ctx.code = err.status
            if not started:
                await _send_error(send, err)
            else:
                await send({"type": "http.response.body", "body": stream_error(err), "more_body": False})
        finally:
            if upstream is not None:
                with anyio.CancelScope(shield=True):
                    await upstream.aclose()  # mid-stream this closes the engine connection: vLLM aborts
            self.finish(ctx)

    # -- metering

    def finish(self, ctx: Context) -> None:
        tenant, model, m = ctx.tenant.name, ctx.model.name, self.m
        code = ctx.code if ctx.completed or ctx.code not in (0, 200) else CLIENT_CLOSED
        usage = ctx.usage or {}
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        self.limiter.release(tenant, prompt + completion)
        if ctx.replica is not None:
            ctx.replica.inflight -= 1
        m.inflight.labels(tenant).dec()
        m.requests.labels(tenant, model, str(code)).inc()
        m.request_seconds.labels(tenant, model).observe(time.perf_counter() - ctx.t0)
        if ctx.ttft is not None:
            m.ttft.labels(tenant, model).observe(ctx.ttft)
        if ctx.gaps:
            itl = m.itl.labels(tenant, model)
            for gap in ctx.gaps:
                itl.observe(gap)
        ctx.tenant.usage.requests += 1
        if prompt or completion:
            cost = self.price(model, ctx.model.base, ctx.tenant.config).cost(prompt, completion)
            m.tokens.labels(tenant, model, "prompt").inc(prompt)
            m.tokens.labels(tenant, model, "completion").inc(completion)
            m.cost.labels(tenant, model).inc(cost)
            u = ctx.tenant.usage
            u.prompt_tokens, u.completion_tokens, u.cost_usd = (
                u.prompt_tokens + prompt,
                u.completion_tokens + completion,
                u.cost_usd + cost,
            )
