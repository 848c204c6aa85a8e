"""A FAKE OpenAI-compatible streaming server, for tests and the headroom benchmark only. It runs no model.

It answers /v1/models, /v1/chat/completions and /v1/completions (streamed or not) with filler words after
deterministic delays (TTFT, then ITL between chunks), packs `tokens_per_chunk` tokens into each chunk (so a
client that counts chunks as tokens is caught), puts `usage` in a final chunk, and can fail every n-th request.
A raw ASGI app rather than FastAPI: it has to stay far faster than the harness it measures.

    python -m loadtest.fake_openai --port 8099 --ttft 0.05 --itl 0.01
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn


@dataclass
class FakeSettings:
    models: list[str] = field(default_factory=lambda: ["fake-model"])
    api_key: str | None = None  # when set, requests need "Authorization: Bearer <api_key>"
    ttft_s: float = 0.0  # delay before the first chunk with content
    itl_s: float = 0.0  # delay between content chunks
    tokens_per_chunk: int = 2
    natural_tokens: int = 16  # output length when not forced by ignore_eos/min_tokens (capped by max_tokens)
    fail_every: int = 0  # every n-th generation request answers fail_status (0 = never)
    fail_status: int = 500
    send_usage: bool = True  # honour stream_options.include_usage
    streams: bool = True  # False: answer with one JSON body even when asked to stream (a broken server)
    capacity: int = 0  # at most this many generations at once, the rest wait (0 = unlimited): a saturating server
    answer: Callable[[dict[str, Any]], str] | None = None  # the text to answer a request with (default filler)


def _prompt_words(body: dict[str, Any]) -> int:
    if "messages" in body:
        return sum(len(str(m.get("content", "")).split()) for m in body["messages"])
    return len(str(body.get("prompt", "")).split())


class FakeOpenAI:
    """The ASGI app. `settings` may be changed between requests; `bodies` logs every generation request."""

    def __init__(self, settings: FakeSettings | None = None, keep_bodies: bool = True):
        self.settings = settings or FakeSettings()
        self.keep_bodies = keep_bodies
        self.bodies: list[dict[str, Any]] = []
        self.count = 0
        self._slots: asyncio.Semaphore | None = None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            msg = await receive()
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        s = self.settings
        headers = dict(scope["headers"])
        if s.api_key and headers.get(b"authorization", b"").decode() != f"Bearer {s.api_key}":
            return await _json(send, 401, {"error": {"message": "invalid API key", "type": "auth"}})
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/v1/models":
            return await _json(send, 200, {"object": "list", "data": [{"id": m, "object": "model"} for m in s.models]})
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            return await _json(send, 404, {"error": {"message": f"no route {method} {path}"}})
        body = json.loads(raw)
        if self.keep_bodies:
            self.bodies.append(body)
        if body.get("model") not in s.models:
            return await _json(send, 404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
        self.count += 1
        if s.fail_every and self.count % s.fail_every == 0:
            return await _json(send, s.fail_status, {"error": {"message": "injected failure"}})
        if not s.capacity:
            return await self._generate(send, body, chat=path.endswith("chat/completions"))
        if self._slots is None:  # created lazily: it must belong to the server's event loop
            self._slots = asyncio.Semaphore(s.capacity)
        async with self._slots:
            await self._generate(send, body, chat=path.endswith("chat/completions"))

    async def _generate(self, send: Callable, body: dict[str, Any], chat: bool) -> None:
        s = self.settings
        max_tokens = int(body.get("max_tokens") or 16)
        if s.answer is not None:
            # One "token" per word, whitespace kept, so the text arrives exactly as written.
            words = re.findall(r"\s*\S+\s*", s.answer(body))
        else:
            forced = body.get("ignore_eos") or body.get("min_tokens")
            words = ["word "] * (max_tokens if forced else min(s.natural_tokens, max_tokens))
        k = max(1, s.tokens_per_chunk)
        pieces = ["".join(words[i : i + k]) for i in range(0, len(words), k)]
        usage = {"prompt_tokens": _prompt_words(body), "completion_tokens": len(words)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        model = body["model"]
        if not body.get("stream") or not s.streams:
            await asyncio.sleep(s.ttft_s + s.itl_s * max(0, len(pieces) - 1))
            text = "".join(pieces).strip()
            choice = {"index": 0, "finish_reason": "stop"}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            return await _json(
                send, 200, {"object": "completion", "model": model, "choices": [choice], "usage": usage}
            )
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
        )

        def event(piece: str | None, finish: str | None = None) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": ""} if piece is None and finish is None else {}
                if piece is not None:
                    delta = {"content": piece}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish}
            obj = {"id": "fake", "object": "chunk", "created": int(time.time()), "model": model, "choices": [choice]}
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        async def emit(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        if chat:
            await emit(event(None))  # vLLM's first chunk: the role, no content yet
        for i, piece in enumerate(pieces):
            delay = s.ttft_s if i == 0 else s.itl_s
            if delay:
                await asyncio.sleep(delay)
            await emit(event(piece))
        await emit(event(None, "length"))
        if s.send_usage and (body.get("stream_options") or {}).get("include_usage"):
            obj = {"id": "fake", "object": "chunk", "model": model, "choices": [], "usage": usage}
            await emit(b"data: " + json.dumps(obj).encode() + b"\n\n")
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def _json(send: Callable, status: int, obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class FakeServer:
    """Runs a FakeOpenAI on a free loopback port in a background thread: `with FakeServer(settings) as srv:`."""

    def __init__(self, settings: FakeSettings | None = None, keep_bodies: bool = True):
        self.app = FakeOpenAI(settings, keep_bodies)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(self.app, lifespan="off", log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def settings(self) -> FakeSettings:
        return self.app.settings

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = 10.0) -> FakeServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake OpenAI server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8099)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--ttft", type=float, default=0.0)
    p.add_argument("--itl", type=float, default=0.0)
    p.add_argument("--models", default="fake-model", help="comma-separated model names")
    p.add_argument("--api-key", default=None)
    p.add_argument("--tokens-per-chunk", type=int, default=2)
    args = p.parse_args(argv)
    settings = FakeSettings(
        models=args.models.split(","),
        api_key=args.api_key,
        ttft_s=args.ttft,
        itl_s=args.itl,
        tokens_per_chunk=args.tokens_per_chunk,
    )
    app = FakeOpenAI(settings, keep_bodies=False)
    uvicorn.run(app, host=args.host, port=args.port, lifespan="off", log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
