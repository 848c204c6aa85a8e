"""Server-sent events as vLLM streams them: cut at event boundaries, metered, passed on as the engine's bytes.

On 2 CPU cores every microsecond the gateway spends is taken from the engine, so the stream is passed through
as the bytes the engine sent: the gateway cuts it at SSE event boundaries, parses JSON only until the first
content arrives (TTFT) and for the final usage event, and never re-serializes a chunk.

Billing must not depend on the client reading to the end: the gateway asks the engine for its running usage on
every chunk (vLLM's `stream_options.continuous_usage_stats`), reads it from the chunk's bytes, and cuts it out
again unless the client asked for it. A stream that is aborted or breaks off is charged the usage of the last
chunk the engine sent.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterable

from serve.gateway.protocol import ApiError

USAGE_MARK = b'"choices":[]'  # vLLM's final usage event is the only one with no choices (compact JSON)
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # keep nginx & co from buffering the stream
]
RUNNING_USAGE = b',"usage":{'  # vLLM's compact JSON puts a chunk's running usage after its choices
CHOICE_INDEX = b'"choices":[{"index":'
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


def split_usage(event: bytes) -> tuple[bytes, dict | None, int]:
    """A chunk event's running usage (continuous_usage_stats), the event without it, and its choice index.

    Reads the flat usage object out of the bytes (no parse of the whole chunk); anything else falls back to JSON."""
    start = event.rfind(RUNNING_USAGE)
    if start < 0:
        return event, None, 0
    open_at = start + len(RUNNING_USAGE) - 1
    end = event.find(b"}", open_at)
    usage = _flat_object(event[open_at : end + 1]) if end > 0 else None
    index = _choice_index(event)
    if usage is None or index is None:
        return _split_usage_parsed(event)
    return event[:start] + event[end + 1 :], usage, index


def _flat_object(raw: bytes) -> dict | None:
    if b"{" in raw[1:]:
        return None  # nested: not the shape vLLM sends on a chunk
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _choice_index(event: bytes) -> int | None:
    at = event.find(CHOICE_INDEX)
    if at < 0:
        return None
    digits = event[at + len(CHOICE_INDEX) : at + len(CHOICE_INDEX) + 12].split(b",", 1)[0]
    return int(digits) if digits.isdigit() else None


def _split_usage_parsed(event: bytes) -> tuple[bytes, dict | None, int]:
    payload = _payload(event)
    try:
        obj = json.loads(payload) if payload else None
    except (ValueError, RecursionError):
        obj = None
    if not isinstance(obj, dict) or not isinstance(obj.get("usage"), dict):
        return event, None, 0
    choices = obj.get("choices") or [{}]
    index = choices[0].get("index", 0) if isinstance(choices[0], dict) else 0
    usage = obj.pop("usage")
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode(), usage, index if isinstance(index, int) else 0


class StreamMeter:
    """Watches blocks of complete SSE events go by: first content time, gaps between chunks, final usage.

    `feed` returns the block to send on; it drops the usage event when the client did not ask for it (the
    gateway asked the engine for it, for metering)."""

    def __init__(self, keep_usage: bool, keep_running: bool = False, n: int = 1):
        self.keep_usage, self.keep_running, self.n = keep_usage, keep_running, n
        self.first: float | None = None
        self.last = 0.0
        self.gaps: list[float] = []
        self.usage: dict | None = None  # the engine's final usage event
        self.running: dict[int, dict] = {}  # choice index -> the running usage of its last chunk
        self.ended = False  # the engine's stream ended with [DONE]
        self.head_sent = False  # the client has the response head: errors now go into the stream

    def feed(self, block: bytes, now: float) -> bytes:
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
            stripped, running, index = split_usage(event)
            if running is not None:
                self.running[index] = running
                if not self.keep_running:
                    event = stripped
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

    def charged(self) -> dict | None:
        """The usage to charge: the engine's final usage, or, for a stream that ended before it (aborted, broken),
        the running usage of each choice's last chunk. Choices of one prompt share its prompt tokens."""
        if self.usage is not None:
            return self.usage
        if not self.running:
            return None
        prompts = {i // self.n: u.get("prompt_tokens") or 0 for i, u in self.running.items()}
        prompt, completion = sum(prompts.values()), sum(u.get("completion_tokens") or 0 for u in self.running.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def pump(chunks: AsyncIterable[bytes], send, meter: StreamMeter, head: dict | None = None) -> None:
    """Pass an SSE stream (the engine's body as it comes, in chunks cut anywhere) on, cut at event boundaries so
    the meter sees whole events.

    The response head goes out with the first event, once that event is JSON data: an engine that answers
    garbage costs the client a 502, not a 200 full of garbage. A stream that breaks off before `data: [DONE]`
    raises, for the caller to end it with an error event (a silently short answer would pass for a whole one)."""
    carry, last = b"", b""
    async for chunk in chunks:
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


def stream_error(err: ApiError) -> bytes:
    """The end of a stream that broke after its head was sent, as vLLM ends one: an error event, then [DONE].
    The OpenAI clients raise on it."""
    return b"data: " + json.dumps(err.body()).encode() + b"\n\n" + DONE
