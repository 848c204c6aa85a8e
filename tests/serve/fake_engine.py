"""A stand-in for a vLLM OpenAI server, byte-compatible where the gateway looks: SSE events in vLLM's compact
JSON, the final usage event (choices == []), runtime LoRA loading, 404 for an adapter it does not hold, and
aborting a stream when the client goes away. Lets the gateway's logic be tested in milliseconds."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from serve.app import ServerThread


@dataclass
class FakeState:
    base: str = "fake-base"
    loaded: set[str] = field(default_factory=set)
    load_calls: int = 0
    load_delay: float = 0.0
    token_delay: float = 0.0
    running: int = 0
    aborted: int = 0
    requests: int = 0
    bodies: list[dict] = field(default_factory=list)


def _chunk(kind: str, model: str, choices: list, usage: dict | None = None) -> bytes:
    obj = {
        "id": "x",
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": 1,
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def make_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health():
        return PlainTextResponse("")

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(f'vllm:num_requests_running{{model_name="{state.base}"}} {state.running}\n')

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request):
        body = await request.json()
        state.load_calls += 1
        await asyncio.sleep(state.load_delay)
        if body["lora_name"] in state.loaded:
            return JSONResponse({"error": {"message": "has already been loaded"}}, status_code=400)
        state.loaded.add(body["lora_name"])
        return PlainTextResponse("Success")

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request):
        state.loaded.discard((await request.json())["lora_name"])
        return PlainTextResponse("Success")

    async def complete(request: Request, kind: str):
        body = await request.json()
        state.requests += 1
        state.bodies.append(body)
        model = body["model"]
        if model != state.base and model not in state.loaded:
            return JSONResponse(
                {
                    "error": {
                        "message": f"The model `{model}` does not exist.",
                        "type": "NotFoundError",
                        "param": "model",
                        "code": 404,
                    }
                },
                status_code=404,
            )
        if (body.get("temperature") or 0) < 0:  # what vLLM's own validation answers
            return JSONResponse(
                {
                    "error": {
                        "message": "temperature must be >= 0",
                        "type": "BadRequestError",
                        "param": "temperature",
                        "code": 400,
                    }
                },
                status_code=400,
            )
        n = body.get("max_tokens") or 5
        prompt = len(json.dumps(body.get("messages") or body.get("prompt"))) // 4
        usage = {"prompt_tokens": prompt, "total_tokens": prompt + n, "completion_tokens": n}
        if not body.get("stream"):
            text = "".join(f"t{i} " for i in range(n))
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": text}}
                if kind == "chat"
                else {"index": 0, "text": text}
            )
            return JSONResponse(
                {"id": "x", "object": "chat.completion", "model": model, "choices": [choice], "usage": usage}
            )

        async def events():
            state.running += 1
            finished = False
            try:
                if kind == "chat":
                    yield _chunk(kind, model, [{"index": 0, "delta": {"role": "assistant", "content": ""}}])
                for i in range(n):
                    await asyncio.sleep(state.token_delay)
                    delta = {"content": f"t{i} "} if kind == "chat" else None
                    choice = {"index": 0, "delta": delta} if delta else {"index": 0, "text": f"t{i} "}
                    if i == n - 1:
                        choice["finish_reason"] = "length"
                    yield _chunk(kind, model, [choice])
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield _chunk(kind, model, [], usage)
                yield b"data: [DONE]\n\n"
                finished = True
            finally:
                state.running -= 1
                if not finished:
                    state.aborted += 1

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, "completion")

    return app


class FakeEngine:
    def __init__(self, port: int, base: str = "fake-base"):
        self.state = FakeState(base=base)
        self.port = port
        self.server = ServerThread(make_app(self.state), port=port)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> FakeEngine:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll until `predicate()` is true; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
