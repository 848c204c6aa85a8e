"""The gateway in front of the real vLLM (CPU) engine of the session; one gateway for the whole module."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serve.gateway.app import ServerThread, create_app
from tests.conftest import free_port
from tests.serve.conftest import ADMIN_KEY, CAPITAL_QUESTION, KEYS, config, make_random_adapter, metric, scrape, tenant
from tests.serve.fake_engine import wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BASE = "smollm2-135m-instruct"
MSG = [{"role": "user", "content": CAPITAL_QUESTION}]
ADAPTERS = ("acme-a", "globex-a", "hot")


@pytest.fixture(scope="module")
def adapters_root(smollm2_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-adapters")
    make_random_adapter(smollm2_path, root / "acme-a", seed=1)
    for name in ADAPTERS[1:]:  # the same weights under another name are another adapter to vLLM
        shutil.copytree(root / "acme-a", root / name)
    return root


@pytest.fixture(scope="module")
def gw(vllm_engine, smollm2_path, adapters_root):
    closed = f"http://127.0.0.1:{free_port()}"
    cfg = config(
        [
            {"name": "smollm2", "model": str(smollm2_path), "served_name": BASE, "urls": [vllm_engine.spec.url]},
            {"name": "down", "model": str(smollm2_path), "served_name": "ghost-model", "urls": [closed]},
        ],
        [
            tenant("acme", [BASE, "acme-a", "hot"]),
            tenant("globex", [BASE, "globex-a", "ghost-model"]),
            tenant("tight", [BASE], rpm=2),
            tenant("single", [BASE], concurrency=1),
            tenant("meter", ["*"]),
        ],
        [{"name": n, "path": n, "base": BASE} for n in ADAPTERS],
        adapters_root=adapters_root,
        prices={BASE: {"input": 0.5, "output": 1.5}},
        max_tokens_cap=1024,
    )
    server = ServerThread(create_app(cfg), port=free_port()).start()
    yield server
    server.stop()


def client(gw, who: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS[who], max_retries=0, timeout=120)


def post(gw, who: str | None, body, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEYS.get(who, who)}"} if who else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{gw.url}/v1/chat/completions", content=content, headers=headers, timeout=120, **kw)


def test_openai_client_chat_and_streaming_through_the_gateway(gw):
    c = client(gw, "acme")
    base = c.chat.completions.create(model=BASE, messages=MSG, max_tokens=16, temperature=0)
    assert "Paris" in base.choices[0].message.content and base.usage.completion_tokens > 0

    chunks = list(c.chat.completions.create(model="acme-a", messages=MSG, max_tokens=8, temperature=0, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text and all(ch.usage is None for ch in chunks)  # the gateway's usage chunk is not shown

    *chunks, last = c.completions.create(
        model=BASE,
        prompt="The capital of France is",
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert last.usage.completion_tokens == 4 and not last.choices
    assert chunks and all(ch.usage is None for ch in chunks)  # the running usage the gateway asked for is cut out


@pytest.mark.parametrize("who", ["acme", "globex"])
def test_tenant_isolation_matrix(gw, who):
    allowed = {"acme": {BASE, "acme-a", "hot"}, "globex": {BASE, "globex-a"}}[who]
    for model in (BASE, "acme-a", "globex-a", "hot"):
        r = post(gw, who, {"model": model, "messages": MSG, "max_tokens": 1})
        assert r.status_code == (200 if model in allowed else 404), (who, model, r.text)
    assert {m.id for m in client(gw, who).models.list()} == allowed | ({"ghost-model"} if who == "globex" else set())
    for method, path in [("GET", "/admin/tenants"), ("GET", "/admin/adapters"), ("DELETE", "/admin/adapters/hot")]:
        r = httpx.request(method, gw.url + path, headers={"Authorization": f"Bearer {KEYS[who]}"})
        assert r.status_code == 401
    assert httpx.get(f"{gw.url}/admin/tenants", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200


def test_concurrent_first_requests_load_the_adapter_once(gw, vllm_engine):
    body = {"model": "hot", "messages": MSG, "max_tokens": 2}
    with ThreadPoolExecutor(4) as pool:
        codes = [r.status_code for r in pool.map(lambda _: post(gw, "acme", body), range(4))]
    assert codes == [200] * 4
    assert scrape(gw.url, "lorafleet_adapter_loads_total", adapter="hot", result="ok") == 1
    assert scrape(gw.url, "lorafleet_adapter_loads_total", adapter="hot", result="error") == 0
    held = [m["id"] for m in httpx.get(f"{vllm_engine.spec.url}/v1/models").json()["data"]]
    assert any(i.startswith("hot@") for i in held), held  # loaded as its content-named version


def test_rpm_and_concurrency_limits_answer_429_with_retry_after(gw):
    body = {"model": BASE, "messages": MSG, "max_tokens": 1}
    codes = [post(gw, "tight", body) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429] and int(codes[2].headers["retry-after"]) >= 1

    # Long enough that it is still running when the second request comes: vLLM merges the tokens a starved API
    # process has not sent yet, so a short stream (200 tokens failed once in CI) can end right after its first chunk.
    # Leaving the block hangs up, and the gateway aborts it in vLLM.
    long = {"model": BASE, "messages": MSG, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST",
        f"{gw.url}/v1/chat/completions",
        json=long,
        headers={"Authorization": f"Bearer {KEYS['single']}"},
        timeout=120,
    ) as running:
        chunks = running.iter_raw()
        next(chunks)
        second = post(gw, "single", body)
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert scrape(gw.url, "lorafleet_ratelimited_total", tenant="single", limit="concurrency") == 1


def test_metered_tokens_equal_the_usage_clients_received(gw):
    c, prompt, completion = client(gw, "meter"), 0, 0
    for model, n in [(BASE, 3), ("acme-a", 5)]:
        r = c.chat.completions.create(model=model, messages=MSG, max_tokens=n)
        prompt, completion = prompt + r.usage.prompt_tokens, completion + r.usage.completion_tokens
        *_, last = c.chat.completions.create(
            model=model, messages=MSG, max_tokens=n, stream=True, stream_options={"include_usage": True}
        )
        prompt, completion = prompt + last.usage.prompt_tokens, completion + last.usage.completion_tokens
    # a request is metered just after its last byte left: wait for all four to be counted
    assert wait_for(lambda: scrape(gw.url, "lorafleet_requests_total", tenant="meter", code="200") == 4)
    text = httpx.get(f"{gw.url}/metrics").text
    assert metric(text, "lorafleet_tokens_total", tenant="meter", kind="prompt") == prompt
    assert metric(text, "lorafleet_tokens_total", tenant="meter", kind="completion") == completion
    expected = (prompt * 0.5 + completion * 1.5) / 1e6  # adapters cost their base's price
    assert metric(text, "lorafleet_cost_usd_total", tenant="meter") == pytest.approx(expected)


def test_client_disconnect_mid_stream_aborts_the_engine_request(gw, vllm_engine):
    engine_metrics = f"{vllm_engine.spec.url}/metrics"

    def engine(name: str, **labels) -> float:
        return metric(httpx.get(engine_metrics).text, name, **labels)

    generated = engine("vllm:generation_tokens_total")
    body = {"model": BASE, "messages": MSG, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST",
        f"{gw.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEYS['acme']}"},
        timeout=120,
    ) as r:
        chunks = r.iter_raw()
        for _ in range(3):
            next(chunks)
    assert wait_for(lambda: engine("vllm:num_requests_running") == 0, timeout=120)
    # ignore_eos: a request that was not aborted stops only after all 1000 tokens
    assert engine("vllm:generation_tokens_total") - generated < 1000
    assert wait_for(lambda: scrape(gw.url, "lorafleet_requests_total", tenant="acme", code="499") == 1)


def test_engine_down_answers_503_with_retry_after(gw):
    r = post(gw, "globex", {"model": "ghost-model", "messages": MSG})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["error"]["code"] == "engine_unavailable"
    assert scrape(gw.url, "lorafleet_upstream_up", upstream="down") == 0
    assert scrape(gw.url, "lorafleet_upstream_up", upstream="smollm2") == 1


@pytest.mark.parametrize(
    "who,body,status",
    [
        (None, {"model": BASE, "messages": MSG}, 401),
        ("acme", b"{nope", 400),
        ("acme", {"model": BASE}, 400),
        ("acme", {"model": BASE, "messages": MSG, "max_tokens": 5000}, 400),
        ("acme", {"model": BASE, "messages": MSG, "temperature": "hot"}, 400),  # refused by vLLM, passed on
        ("acme", {"model": "globex-a", "messages": MSG}, 404),
    ],
)
def test_bad_input_gets_4xx_and_openai_error_json(gw, who, body, status):
    r = post(gw, who, body)
    assert r.status_code == status
    assert {"message", "type", "param", "code"} <= set(r.json()["error"])
