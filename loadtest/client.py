"""One streamed OpenAI request, timed; and the preflight check of every target before a run.

Timings follow `vllm bench serve`: TTFT is the first chunk that carries text, ITL the gaps between chunks
with text, TPOT = (e2e - TTFT) / (output_tokens - 1). Token counts come from the server's final `usage`
chunk, never from the number of chunks: a server may pack several tokens into one chunk.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtest.config import Target
from lorafleet.core.errors import UserError


class PreflightError(UserError):
    """One or more targets are unreachable or misconfigured; the message names each one."""


@dataclass
class RequestRecord:
    """One request's raw timings, in seconds from the start of its load step (perf_counter clock)."""

    model: str
    scheduled: float  # when the arrival process wanted it sent
    sent: float = 0.0  # when it was actually sent; sent - scheduled is client-side queueing
    ttft: float | None = None  # from `sent`
    e2e: float | None = None  # from `sent`
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    tokens_from_usage: bool = False
    status: str = "ok"  # "ok", the HTTP status code, or "error"
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def queue_delay(self) -> float:
        return max(0.0, self.sent - self.scheduled)

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies, and a long step has tens of thousands of records.
        d = dict(self.__dict__)
        d["itl"] = [round(x, 6) for x in self.itl]
        d["queue_delay"] = self.queue_delay
        d["tpot"] = self.tpot
        return d


class ClientPool:
    """Many small httpx clients instead of one big one.

    httpcore's pool scans all its connections on every request and every release, so with one client per
    step the client, not the server, sets the pace past a few dozen concurrent streams (measured against the
    fake: 92 req/s at 64 streams on one client, about 600 with 4 streams per client). Each request leases the
    least busy client; a new client is opened when all have `per_client` requests in flight.
    """

    def __init__(self, timeout_s: float, per_client: int = 4):
        self.timeout = httpx.Timeout(timeout_s, connect=10.0)
        self.per_client = per_client
        self.clients: list[httpx.AsyncClient] = []
        self.busy: list[int] = []
        # Loading the CA bundle costs ~25 ms of CPU: once per pool, not once per client opened mid-step.
        self.ssl = httpx.create_ssl_context()

    def _new(self) -> int:
        # No pool limit: an open loop must never queue inside the client where the timings cannot see it.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self.clients.append(httpx.AsyncClient(timeout=self.timeout, limits=limits, verify=self.ssl))
        self.busy.append(0)
        return len(self.clients) - 1

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[httpx.AsyncClient]:
        i = min(range(len(self.busy)), key=self.busy.__getitem__, default=None)
        if i is None or self.busy[i] >= self.per_client:
            i = self._new()
        self.busy[i] += 1
        try:
            yield self.clients[i]
        finally:
            self.busy[i] -= 1

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()
        self.clients, self.busy = [], []

    async def __aenter__(self) -> ClientPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def quiet(progress: bool) -> bool | None:
    """tqdm's `disable`: no bars when asked, nor when stderr is not a terminal (None lets tqdm decide)."""
    return None if progress else True


def auth_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def endpoint(target: Target) -> str:
    return f"{target.base_url}/{'chat/completions' if target.api == 'chat' else 'completions'}"


def build_body(
    target: Target,
    model: str,
    prompt: Any,
    max_tokens: int,
    *,
    force_output_len: bool = False,
    temperature: float = 0.0,
    stream: bool = True,
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature}
    body["messages" if target.api == "chat" else "prompt"] = prompt
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if force_output_len:
        # vLLM extensions: without them throughput "at 64 output tokens" is whatever length the model chose.
        body["ignore_eos"] = True
        body["min_tokens"] = max_tokens
    return body


def _chunk_text(obj: dict[str, Any]) -> str:
    text = ""
    for choice in obj.get("choices") or ():
        delta = choice.get("delta")
        if delta is not None:
            text += delta.get("content") or delta.get("reasoning_content") or ""
        else:
            text += choice.get("text") or ""
    return text


async def stream_request(
    client: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    body: dict[str, Any],
    rec: RequestRecord,
    t0: float,
) -> RequestRecord:
    """Send one streaming request and fill `rec`; errors are recorded in it, never raised."""
    start = time.perf_counter()
    rec.sent = start - t0
    chunks, events, last = 0, 0, start
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                rec.status = str(resp.status_code)
                rec.error = (await resp.aread())[:300].decode(errors="replace")
                return rec
            buf = b""
            async for data in resp.aiter_bytes():
                now = time.perf_counter()
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    events += 1
                    if payload == b"[DONE]":
                        continue
                    obj = json.loads(payload)
                    if "error" in obj and "choices" not in obj:
                        rec.status, rec.error = "error", str(obj["error"])[:300]
                        return rec
                    if obj.get("usage"):
                        rec.output_tokens = int(obj["usage"].get("completion_tokens") or 0)
                        rec.prompt_tokens = int(obj["usage"].get("prompt_tokens") or 0)
                        rec.tokens_from_usage = True
                    if _chunk_text(obj):
                        if rec.ttft is None:
                            rec.ttft = now - start
                        else:
                            rec.itl.append(now - last)
                        last = now
                        chunks += 1
        rec.e2e = time.perf_counter() - start
        if events == 0:
            rec.status, rec.error = "error", "the response was not an event stream (no `data:` lines)"
            return rec
        if not rec.tokens_from_usage:
            # The server ignored stream_options.include_usage: fall back to chunks and say so in the report.
            rec.output_tokens = chunks
    except (httpx.HTTPError, json.JSONDecodeError, UnicodeDecodeError) as e:
        rec.status, rec.error = "error", f"{type(e).__name__}: {e}"[:300]
    return rec


async def post_json(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict[str, Any]
) -> tuple[dict[str, Any] | None, str | None]:
    """A non-streamed request: (response JSON, None) or (None, error text)."""
    try:
        resp = await client.post(url, json=body, headers=headers)
    except httpx.HTTPError as e:
        return None, f"{type(e).__name__}: {e}"[:300]
    if resp.status_code != 200:
        return None, f"HTTP {resp.status_code}: {resp.text[:300]}"
    try:
        return resp.json(), None
    except ValueError as e:
        return None, f"invalid JSON: {e}"


async def check_target(client: httpx.AsyncClient, target: Target, models: set[str]) -> str | None:
    """What is wrong with one target (its name first), or None when it serves every model we will ask for.

    Each API key in use is checked against the models sent with it: a tenant key may see only its own adapters.
    """
    by_key: dict[str | None, set[str]] = {}
    for m in models or {target.model}:
        by_key.setdefault(target.key(m), set()).add(m)
    for key, wanted in by_key.items():
        problem = await _check_key(client, target, key, wanted)
        if problem:
            return problem
    return None


async def _check_key(client: httpx.AsyncClient, target: Target, key: str | None, models: set[str]) -> str | None:
    url = f"{target.base_url}/models"
    where = f"target {target.name!r} ({url})"
    try:
        resp = await client.get(url, headers=auth_headers(key))
    except httpx.ConnectError as e:
        return f"{where}: cannot connect ({e}); is the server running and is base_url right?"
    except httpx.TimeoutException:
        return f"{where}: timed out; is the server up?"
    except httpx.HTTPError as e:
        return f"{where}: {type(e).__name__}: {e}"
    if resp.status_code in (401, 403):
        which = "no API key" if not key else "the API key for " + ", ".join(sorted(models))
        return f"{where}: {which} rejected (HTTP {resp.status_code}); set api_key, api_key_env or model_keys"
    if resp.status_code == 404:
        return f"{where}: not found (HTTP 404); base_url must be the OpenAI API root, e.g. http://host:8080/v1"
    if resp.status_code != 200:
        return f"{where}: HTTP {resp.status_code}: {resp.text[:200]}"
    try:
        served = {m["id"] for m in resp.json()["data"]}
    except (ValueError, KeyError, TypeError):
        return f"{where}: the response is not an OpenAI model list"
    missing = sorted(models - served)
    if missing:
        return f"{where}: does not serve {missing}; it serves {sorted(served)}"
    return None


async def preflight(targets: list[Target], models: dict[str, set[str]], timeout_s: float = 10.0) -> None:
    """Check all targets before any load is sent; raise PreflightError listing every problem found."""
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        problems = [await check_target(client, t, models.get(t.name, set())) for t in targets]
    problems = [p for p in problems if p]
    if problems:
        raise PreflightError("preflight failed:\n  " + "\n  ".join(problems))
