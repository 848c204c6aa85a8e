"""Forward one completion request to an engine, stream the answer back, and meter it.

On 2 CPU cores every microsecond the gateway spends is taken from the engine, so the stream is passed through
as the bytes the engine sent: the gateway cuts it at SSE event boundaries, parses JSON only until the first
content arrives (TTFT) and for the final usage event, and never re-serializes a chunk. Closing the upstream
response when the client goes away closes the engine connection, which makes vLLM abort the request.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import httpx
from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

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
from serve.gateway.registry import Model, Replica
from serve.gateway.tenants import UNKNOWN, Tenant, bearer_key

if TYPE_CHECKING:
    from serve.gateway.app import Gateway

log = logging.getLogger("lorafleet.serve")

USAGE_MARK = b'"choices":[]'  # vLLM's final usage event is the only one with no choices (compact JSON)
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # keep nginx & co from buffering the stream
]
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
CLIENT_CLOSED = 499  # the code nginx uses for "the client closed the connection before the answer ended"
DONE = b"data: [DONE]\n\n"
MAX_EVENT_BYTES = 1 << 20  # an SSE event this long is not one vLLM sends: stop buffering it


def _payload(event: bytes) -> bytes | None:
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            return line[5:].strip()
    return None


def has_content(event: bytes) -> bool:
    """Whether an SSE event carries generated text (the first one of a chat stream carries only the role)."""
    payload = _payload(event)
    if not payload or not payload.startswith(b"{"):
        return False
    try:
        obj = json.loads(payload)
    except ValueError:
        return False
    for choice in obj.get("choices") or []:
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
            return True
    return False


def usage_event(event: bytes) -> dict | None:
    """The usage of a final usage event (choices == [] and a usage object), else None."""
    payload = _payload(event)
    try:
        obj = json.loads(payload) if payload and payload.startswith(b"{") else None
    except ValueError:
        return None
    if isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict):
        return obj["usage"]
    return None


class StreamMeter:
    """Watches blocks of complete SSE events go by: first content time, gaps between chunks, final usage.

    `feed` returns the block to send on; it drops the usage event when the client did not ask for it (the
    gateway asked the engine for it, for metering)."""

    def __init__(self, keep_usage: bool):
        self.keep_usage = keep_usage
        self.first: float | None = None
        self.last = 0.0
        self.gaps: list[float] = []
        self.usage: dict | None = None
        self.ended = False  # the engine's stream ended with [DONE]
        self.head_sent = False  # the client has the response head: errors now go into the stream

    def feed(self, block: bytes, now: float) -> bytes:
        if self.first is not None and USAGE_MARK not in block:
            # The common case once tokens flow: no parsing, no copy.
            self.gaps.append(now - self.last)
            self.last = now
            return block
        kept, content = [], False
        for event in block.split(b"\n\n"):
            if not event:
                continue
            usage = usage_event(event) if USAGE_MARK in event else None
            if usage is not None:
                self.usage = usage
                if self.keep_usage:
                    kept.append(event)
                continue
            kept.append(event)
            if not content and _payload(event) != b"[DONE]":
                content = self.first is not None or has_content(event)
        if content:
            if self.first is None:
                self.first = now
            else:
                self.gaps.append(now - self.last)
            self.last = now
        return b"".join(e + b"\n\n" for e in kept)


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


async def pump(upstream: httpx.Response, send, meter: StreamMeter, head: dict | None = None) -> None:
    """Pass an SSE stream on, cut at event boundaries so the meter sees whole events.

    The response head goes out with the first event, once that event is JSON data: an engine that answers
    garbage costs the client a 502, not a 200 full of garbage. A stream that breaks off before `data: [DONE]`
    raises, for the caller to end it with an error event (a silently short answer would pass for a whole one)."""
    carry, last = b"", b""
    async for chunk in upstream.aiter_raw():
        if carry:
            chunk = carry + chunk
        end = chunk.rfind(b"\n\n")
        if end < 0:  # no complete event yet
            if len(chunk) > MAX_EVENT_BYTES:
                raise bad_upstream(f"the engine sent {len(chunk)} bytes without an SSE event boundary")
            carry = chunk
            continue
        end += 2
        carry = chunk[end:]
        block = chunk[:end] if carry else chunk
        if not last:
            _check_first_event(block)
            if head is not None:
                await send(head)
                meter.head_sent = True
        last = block
        block = meter.feed(block, time.perf_counter())
        if block:
            await send({"type": "http.response.body", "body": block, "more_body": True})
    if not last.endswith(DONE):
        raise bad_upstream("the engine's stream ended before data: [DONE]")
    meter.ended = True
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _check_first_event(block: bytes) -> None:
    event = block.split(b"\n\n", 1)[0]
    payload = _payload(event)
    try:
        ok = payload is not None and isinstance(json.loads(payload), dict)
    except (ValueError, RecursionError):
        ok = False
    if not ok:
        raise bad_upstream(f"the engine's stream does not start with a JSON data event: {event[:100]!r}")


def bad_upstream(message: str) -> ApiError:
    """The engine answered something vLLM never sends: the gateway cannot vouch for it."""
    return ApiError(502, message, "server_error", code="bad_engine_response")


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


def stream_error(err: ApiError) -> bytes:
    """The end of a stream that broke after its head was sent, as vLLM ends one: an error event, then [DONE].
    The OpenAI clients raise on it."""
    return b"data: " + json.dumps(err.body()).encode() + b"\n\n" + DONE


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
    def __init__(self, gateway: Gateway):
        self.gw = gateway
        self.m = gateway.metrics

    # -- admission: everything that can refuse a request before an engine sees it

    async def handle(self, request: Request, kind: Kind) -> Response:
        gw, tenant_label, model_label = self.gw, UNKNOWN, UNKNOWN
        try:
            tenant = gw.tenants.authenticate(bearer_key(request.headers.get("authorization")))
            if tenant is None:
                raise unauthorized()
            tenant_label = tenant.name
            cap = gw.cfg.gateway
            raw = await read_body(request, cap.max_body_bytes)
            preq = parse_request(raw, kind, cap.max_tokens_cap, cap.max_n)
            model = gw.registry.resolve(preq.model)
            if model is None or not tenant.may_use(model.name):
                # labelled as an unknown model: /metrics must not tell a prober which names exist
                raise model_not_found(preq.model)
            model_label = model.name
            decision = gw.limiter.admit(tenant.name, tenant.limits)
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
        reg, client = self.gw.registry, self.gw.client
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
        raise unavailable(
            f"no engine for {ctx.model.name!r} is reachable; retry shortly", self.gw.cfg.gateway.retry_after_s
        )

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
        self.gw.limiter.release(tenant, prompt + completion)
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
            cost = self.gw.cfg.price(model, ctx.model.base, ctx.tenant.config).cost(prompt, completion)
            m.tokens.labels(tenant, model, "prompt").inc(prompt)
            m.tokens.labels(tenant, model, "completion").inc(completion)
            m.cost.labels(tenant, model).inc(cost)
            u = ctx.tenant.usage
            u.prompt_tokens, u.completion_tokens, u.cost_usd = (
                u.prompt_tokens + prompt,
                u.completion_tokens + completion,
                u.cost_usd + cost,
            )
