"""Faults in the engines: the gateway answers every client cleanly and keeps serving, with a fake engine (fast).

An engine that hangs costs the client a 504 (or a stream that ends with an error event), one that answers garbage
a 502, one killed with kill -9 mid-stream an error event for the streams it was serving, 503 + Retry-After for
new requests while it is gone, and service again (adapters loaded back) once it is up, with no gateway restart.
The same with a real vLLM engine and its supervisor: tests/serve/test_supervisor_vllm.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import httpx
import openai
import pytest

from serve.gateway.app import ServerThread, create_app
from tests.conftest import MODELS, ROOT, free_port
from tests.serve.conftest import ADMIN_KEY, KEYS, config, scrape, tenant
from tests.serve.fake_engine import wait_for

MSG = [{"role": "user", "content": "hello"}]
TINY = str(MODELS / "tiny-random-llama")
AUTH = {"Authorization": f"Bearer {KEYS['acme']}"}


def gateway(engine_url: str, adapters_root=None, **gw) -> ServerThread:
    cfg = config(
        [{"name": "fake", "model": TINY, "served_name": "fake-base", "urls": [engine_url]}],
        [tenant("acme", ["*"])],
        [{"name": "tiny-a", "path": "tiny-a", "base": "fake-base"}] if adapters_root else [],
        adapters_root=adapters_root,
        **gw,
    )
    return ServerThread(create_app(cfg), port=free_port()).start()


@pytest.fixture
def gw(fake_engine):
    # Long enough that a dropped connection is seen as a drop, not a timeout, on a loaded 2-core machine (0.5 s
    # once read a break_mid_stream as a 504 in a full `make test`); short enough for the hang cases.
    server = gateway(fake_engine.url, request_timeout_s=2)
    yield server
    fake_engine.state.fault = "none"  # lets hung handlers in the fake engine finish
    server.stop()


def call(gw: ServerThread, stream: bool, path: str = "/v1/chat/completions") -> tuple[int, bytes]:
    body = {"model": "fake-base", "max_tokens": 5, "stream": stream}
    body |= {"messages": MSG} if "chat" in path else {"prompt": "hi"}
    with httpx.stream("POST", gw.url + path, json=body, headers=AUTH, timeout=30) as r:
        return r.status_code, r.read()


def events(raw: bytes) -> list[dict | str]:
    out = []
    for event in raw.decode().split("\n\n"):
        if event.startswith("data: "):
            data = event[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error_json(raw: bytes, code: str) -> None:
    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"], err


def assert_serves_again(gw: ServerThread, fake_engine) -> None:
    fake_engine.state.fault = "none"
    assert call(gw, stream=False)[0] == 200 and call(gw, stream=True)[0] == 200
    assert httpx.get(f"{gw.url}/health").json()["status"] == "ok"
    assert wait_for(lambda: scrape(gw.url, "lorafleet_inflight_requests", tenant="acme") == 0)


# (fault, stream, status, error code, error code in the stream after a 200 head or None)
CASES = [
    ("hang", False, 504, "timeout", None),
    ("hang", True, 504, "timeout", None),  # nothing before the head: a plain 504
    ("hang_mid_stream", True, 200, None, "timeout"),
    ("garbage_json", False, 502, "bad_engine_response", None),
    ("garbage_json", True, 502, "bad_engine_response", None),
    ("garbage_sse", True, 502, "bad_engine_response", None),
    ("html_500", False, 502, "bad_engine_response", None),
    ("html_500", True, 502, "bad_engine_response", None),
    ("break_mid_stream", True, 200, None, "engine_error"),
    ("no_done", True, 200, None, "bad_engine_response"),
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("fault,stream,status,code,stream_code", CASES)
def test_faulty_engine_gets_the_client_a_clean_error_and_the_gateway_keeps_serving(
    gw, fake_engine, path, fault, stream, status, code, stream_code
):
    fake_engine.state.fault = fault
    got, raw = call(gw, stream, path)
    assert got == status, raw
    if stream_code is None:
        assert_error_json(raw, code)
    else:  # the head was out: the stream ends with an error event and [DONE], as vLLM ends a failed stream
        *_, err, done = events(raw)
        assert done == "[DONE]" and err["error"]["code"] == stream_code
    metered = 504 if "timeout" in (code, stream_code) else 502
    assert wait_for(lambda: scrape(gw.url, "lorafleet_requests_total", tenant="acme", code=str(metered)) == 1)
    if fault == "break_mid_stream":  # the two tokens the engine sent before it broke are charged
        assert scrape(gw.url, "lorafleet_tokens_total", tenant="acme", kind="completion") == 2
    assert_serves_again(gw, fake_engine)


@pytest.mark.parametrize("fault", ["break_mid_stream", "hang_mid_stream", "no_done"])
def test_openai_client_raises_on_a_stream_that_broke_off(gw, fake_engine, fault):
    fake_engine.state.fault = fault
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["acme"], max_retries=0, timeout=30)
    stream = client.chat.completions.create(model="fake-base", messages=MSG, max_tokens=5, stream=True)
    with pytest.raises(openai.APIError):  # not a short answer that passes for a whole one
        list(stream)
    assert_serves_again(gw, fake_engine)


# -- kill -9 of an engine process while it streams


class EngineProcess:
    """A fake engine in its own process, so it can be killed with SIGKILL like a crashing vLLM."""

    def __init__(self, port: int, token_delay: float):
        cmd = [sys.executable, "-m", "tests.serve.fake_engine", str(port), str(token_delay)]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout.readline().strip() == b"ready"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def ask(gw: ServerThread, model: str) -> httpx.Response:
    return httpx.post(
        f"{gw.url}/v1/chat/completions", json={"model": model, "messages": MSG, "max_tokens": 5}, headers=AUTH
    )


def read_stream(gw: ServerThread, model: str, first: threading.Event, out: list) -> None:
    body = {"model": model, "messages": MSG, "max_tokens": 400, "stream": True}
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        raw = b""
        for chunk in r.iter_raw():
            raw += chunk
            first.set()
    out.append((r.status_code, raw))


@pytest.mark.slow
def test_engine_killed_mid_stream_then_back_without_a_gateway_restart(tiny_adapter_root):
    port = free_port()
    engine = EngineProcess(port, token_delay=0.05)  # 400 tokens: 20 s if nothing happens
    server = gateway(engine.url, tiny_adapter_root)
    try:
        assert ask(server, "tiny-a").status_code == 200
        results: list = []
        firsts = [threading.Event() for _ in range(4)]
        threads = [
            threading.Thread(target=read_stream, args=(server, model, ev, results))
            for model, ev in zip(["fake-base", "tiny-a"] * 2, firsts, strict=True)
        ]
        for t in threads:
            t.start()
        assert all(ev.wait(30) for ev in firsts)  # every stream is flowing
        engine.kill()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "a client hangs on a dead engine"
        assert len(results) == 4
        for status, raw in results:
            *_, err, done = events(raw)
            assert status == 200 and done == "[DONE]" and err["error"]["code"] == "engine_error"

        down = ask(server, "tiny-a")
        assert down.status_code == 503 and down.headers["retry-after"] == "5"
        assert_error_json(down.content, "engine_unavailable")
        detail = httpx.get(f"{server.url}/health", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
        assert detail["status"] == "ok" and detail["upstreams"] == {"fake": False}
        assert detail["limits"]["backend"] == "local" and not detail["limits"]["shared"]  # and says so

        engine = EngineProcess(port, token_delay=0.0)  # the engine is back, empty: no adapter loaded
        # the gateway notices (health checks) and loads the adapter back before anyone asks for it
        assert wait_for(
            lambda: scrape(server.url, "lorafleet_adapter_loads_total", adapter="tiny-a", result="ok") == 2
        )
        listed = httpx.get(f"{server.url}/admin/adapters", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
        assert listed["adapters"][0]["loaded_on"] == ["fake"]
        for model in ("fake-base", "tiny-a"):
            assert ask(server, model).status_code == 200
        assert scrape(server.url, "lorafleet_requests_total", tenant="acme", code="502") == 4
        assert scrape(server.url, "lorafleet_inflight_requests", tenant="acme") == 0
        print("\nkill -9 mid-stream: 4 streams ended with an error event, 503 while down, back after restart")
    finally:
        server.stop()
        if engine.proc.poll() is None:
            engine.kill()
