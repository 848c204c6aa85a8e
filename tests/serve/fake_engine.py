"""A stand-in for a vLLM OpenAI server, byte-compatible where the gateway looks: SSE events in vLLM's compact
JSON, the final usage event (choices == []), runtime LoRA loading, 404 for an adapter it does not hold, and
aborting a stream when the client goes away. Lets the gateway's logic be tested in milliseconds.

`FakeState.fault` makes it misbehave the ways a real engine can: hang, answer garbage, break off a stream.
`python -m tests.serve.fake_engine PORT` runs one as its own process, for tests that kill -9 it."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from serve.gateway.app import ServerThread
from serve.gateway.protocol import ChatCompletionRequest, CompletionRequest

Fault = Literal[
    "none",
    "hang",  # accept the request, never answer
    "hang_mid_stream",  # stream two tokens, then go silent
    "break_mid_stream",  # stream two tokens, then drop the connection
    "garbage_json",  # 200 with a body that is not JSON
    "garbage_sse",  # 200 event stream that is not SSE
    "no_done",  # a stream that ends cleanly but without usage and [DONE]
    "html_500",  # a 500 from some proxy in between: HTML, not JSON
]


@dataclass
class FakeState:
    base: str = "fake-base"
    loaded: set[str] = field(default_factory=set)
    load_calls: int = 0
    load_delay: float = 0.0
    token_delay: float = 0.0
    running: int = 0
    aborted: int = 0
    generated: int = 0  # completion tokens streamed, finished or not
    requests: int = 0
    bodies: list[dict] = field(default_factory=list)
    fault: Fault = "none"


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


def continuous_usage(body: dict) -> bool:
    options = body.get("stream_options") or {}
    return bool(options.get("include_usage") and options.get("continuous_usage_stats"))


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

    def invalid(e: ValidationError) -> JSONResponse:
        # vLLM validates with pydantic and answers 400 (it never crashes on a bad field)
        err = e.errors()[0]
        message = f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
        return JSONResponse(
            {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}, status_code=400
        )

    async def complete(request: Request, kind: str):
        body = await request.json()
        state.requests += 1
        state.bodies.append(body)
        if state.fault != "none":
            return await faulty(body, kind)
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
        temperature = body.get("temperature")
        if isinstance(temperature, int | float) and temperature < 0:  # what vLLM's own validation answers
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
        try:
            (ChatCompletionRequest if kind == "chat" else CompletionRequest).model_validate(body)
        except ValidationError as e:
            return invalid(e)
        n = body.get("max_completion_tokens") or body.get("max_tokens") or 5
        prompt = len(json.dumps(body.get("messages") or body.get("prompt"))) // 4
        usage = {"prompt_tokens": prompt, "total_tokens": prompt + n, "completion_tokens": n}
        if not body.get("stream"):
            await asyncio.sleep(state.token_delay * n)
            state.generated += n
            text = "".join(f"t{i} " for i in range(n))
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": text}}
                if kind == "chat"
                else {"index": 0, "text": text}
            )
            return JSONResponse(
                {"id": "x", "object": "chat.completion", "model": model, "choices": [choice], "usage": usage}
            )

        options = body.get("stream_options") or {}
        continuous = options.get("include_usage") and options.get("continuous_usage_stats")

        def running(done: int) -> dict | None:  # vLLM's continuous_usage_stats: usage so far on every chunk
            return (
                {"prompt_tokens": prompt, "total_tokens": prompt + done, "completion_tokens": done}
                if continuous
                else None
            )

        async def events():
            state.running += 1
            finished = False
            try:
                if kind == "chat":
                    yield _chunk(
                        kind, model, [{"index": 0, "delta": {"role": "assistant", "content": ""}}], running(0)
                    )
                for i in range(n):
                    await asyncio.sleep(state.token_delay)
                    delta = {"content": f"t{i} "} if kind == "chat" else None
                    choice = {"index": 0, "delta": delta} if delta else {"index": 0, "text": f"t{i} "}
                    if i == n - 1:
                        choice["finish_reason"] = "length"
                    state.generated += 1
                    yield _chunk(kind, model, [choice], running(i + 1))
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield _chunk(kind, model, [], usage)
                yield b"data: [DONE]\n\n"
                finished = True
            finally:
                state.running -= 1
                if not finished:
                    state.aborted += 1

        return StreamingResponse(events(), media_type="text/event-stream")

    async def hang() -> None:
        # until the test clears the fault: a hung handler must not outlive the test that hung it
        while state.fault != "none":
            await asyncio.sleep(0.05)

    async def faulty(body: dict, kind: str) -> Response:
        fault, model = state.fault, body["model"]
        if fault == "hang":
            await hang()
            return JSONResponse({"error": {"message": "hung", "type": "x", "param": None, "code": 500}}, 500)
        if fault == "garbage_json":
            return PlainTextResponse("<html>surprise</html>" if not body.get("stream") else "event: ???\n\nnope\n\n")
        if fault == "html_500":
            return Response("<html><body>502 Bad Gateway</body></html>", status_code=500, media_type="text/html")
        if fault == "garbage_sse":
            return StreamingResponse(iter([b"data: not json at all\n\n", b"data: [DONE]\n\n"]))

        async def events():
            state.running += 1
            try:
                for i in range(2):
                    choice = {"index": 0, "text": f"t{i} ", "delta": {"content": f"t{i} "}}
                    running = {"prompt_tokens": 1, "total_tokens": i + 2, "completion_tokens": i + 1}
                    state.generated += 1
                    yield _chunk(kind, model, [choice], running if continuous_usage(body) else None)
                if fault == "hang_mid_stream":
                    await hang()
                if fault == "break_mid_stream":
                    raise ConnectionAbortedError("fake engine: drop the connection mid-stream")
            finally:
                state.running -= 1

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


if __name__ == "__main__":  # a fake engine in its own process, for tests that kill it
    port, delay = int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    engine = FakeEngine(port).start()
    engine.state.token_delay = delay
    print("ready", flush=True)
    engine.server.thread.join()
