"""The gateway end to end over HTTP, in front of a fake engine: fast, no vLLM."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serve.gateway.app import ServerThread, create_app
from tests.conftest import MODELS, free_port
from tests.serve.conftest import ADMIN_KEY, KEYS, config, scrape, tenant
from tests.serve.fake_engine import FakeEngine, wait_for

MSG = [{"role": "user", "content": "hello there"}]
TINY = str(MODELS / "tiny-random-llama")
BUDGET = 0.0005  # $ per day: about six 40-token answers at the fake's price


def engine(urls: list[str], name: str = "fake", served: str = "fake-base") -> dict:
    return {"name": name, "model": TINY, "served_name": served, "urls": urls}


def tenants() -> list[dict]:
    return [
        tenant("acme", ["fake-base", "tiny-a"]),
        tenant("globex", ["fake-base"]),
        tenant("tight", ["*"], rpm=2),
        tenant("single", ["*"], concurrency=1),
        tenant("meter", ["*"]),
        tenant("budget", ["*"], usd_per_day=BUDGET),
    ]


def start_gateway(cfg) -> ServerThread:
    return ServerThread(create_app(cfg), port=free_port()).start()


@pytest.fixture
def gw(fake_engine, tiny_adapter_root):
    cfg = config(
        [engine([fake_engine.url])],
        tenants(),
        [{"name": "tiny-a", "path": "tiny-a", "base": "fake-base"}],
        adapters_root=tiny_adapter_root,
        prices={"fake-base": {"input": 1.0, "output": 2.0}},
        max_tokens_cap=64,
        max_body_bytes=4096,
    )
    server = start_gateway(cfg)
    yield server
    server.stop()


def client(gw: ServerThread, who: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS[who], max_retries=0)


def post(gw: ServerThread, who: str | None, body, path: str = "/v1/chat/completions", **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEYS.get(who, who)}"} if who else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(gw.url + path, content=content, headers=headers, timeout=30, **kw)


def test_openai_client_chat_stream_and_completions(gw, fake_engine):
    c = client(gw)
    r = c.chat.completions.create(model="fake-base", messages=MSG, max_tokens=3)
    assert r.choices[0].message.content == "t0 t1 t2 " and r.usage.completion_tokens == 3

    chunks = list(c.chat.completions.create(model="fake-base", messages=MSG, max_tokens=4, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "t0 t1 t2 t3 "
    assert all(ch.usage is None and ch.choices for ch in chunks)  # the usage on every chunk was stripped...
    asked = {"include_usage": True, "continuous_usage_stats": True}
    assert fake_engine.state.bodies[-1]["stream_options"] == asked  # ...after being asked for

    chunks = list(
        c.completions.create(
            model="fake-base", prompt="hi", max_tokens=2, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage.completion_tokens == 2 and not chunks[-1].choices


def test_models_list_shows_only_what_the_tenant_may_use(gw):
    assert sorted(m.id for m in client(gw, "acme").models.list()) == ["fake-base", "tiny-a"]
    assert [m.id for m in client(gw, "globex").models.list()] == ["fake-base"]
    assert client(gw, "acme").models.retrieve("tiny-a").id == "tiny-a"
    with pytest.raises(openai.NotFoundError):
        client(gw, "globex").models.retrieve("tiny-a")
    assert httpx.get(f"{gw.url}/v1/models").status_code == 401


def test_another_tenants_adapter_looks_exactly_like_an_unknown_model(gw):
    theirs = post(gw, "globex", {"model": "tiny-a", "messages": MSG})
    unknown = post(gw, "globex", {"model": "tiny-b", "messages": MSG})
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["error"]["message"].replace("tiny-a", "X") == unknown.json()["error"]["message"].replace(
        "tiny-b", "X"
    )


def test_concurrent_first_requests_share_one_adapter_load(gw, fake_engine):
    fake_engine.state.load_delay = 0.3  # all requests arrive while the first load is running
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: post(gw, "acme", {"model": "tiny-a", "messages": MSG}).status_code, range(6)))
    assert codes == [200] * 6
    assert fake_engine.state.load_calls == 1
    assert scrape(gw.url, "lorafleet_adapter_loads_total", adapter="tiny-a", result="ok") == 1
    assert scrape(gw.url, "lorafleet_adapter_load_seconds_count", adapter="tiny-a") == 1


def test_engine_down_gives_503_with_retry_after_then_adapters_come_back(gw, fake_engine):
    assert post(gw, "acme", {"model": "tiny-a", "messages": MSG}).status_code == 200
    port = fake_engine.port
    fake_engine.stop()
    down = post(gw, "acme", {"model": "tiny-a", "messages": MSG})
    assert down.status_code == 503 and down.headers["retry-after"] == "5"
    assert down.json()["error"]["code"] == "engine_unavailable"
    assert scrape(gw.url, "lorafleet_upstream_up", upstream="fake") == 0

    fresh = FakeEngine(port).start()  # a restarted engine holds no adapters
    try:
        assert post(gw, "acme", {"model": "tiny-a", "messages": MSG}).status_code == 200
        assert "tiny-a" in adapters_in(fresh)
        assert wait_for(lambda: scrape(gw.url, "lorafleet_upstream_up", upstream="fake") == 1)
    finally:
        fresh.stop()


def test_fails_over_to_a_live_replica_before_the_first_byte(fake_engine):
    dead = f"http://127.0.0.1:{free_port()}"
    server = start_gateway(config([engine([dead, fake_engine.url])], [tenant("acme", ["fake-base"])]))
    try:
        for _ in range(4):
            r = post(server, "acme", {"model": "fake-base", "messages": MSG, "stream": True})
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        assert scrape(server.url, "lorafleet_upstream_up", upstream="fake-0") == 0
    finally:
        server.stop()


def test_client_disconnect_mid_stream_aborts_the_engine_request(gw, fake_engine):
    fake_engine.state.token_delay = 0.05  # 60 tokens: 3 s if nobody hangs up
    body = {"model": "fake-base", "messages": MSG, "max_tokens": 60, "stream": True}
    with httpx.stream(
        "POST", f"{gw.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEYS['acme']}"}
    ) as r:
        chunks = r.iter_raw()
        next(chunks), next(chunks)
    assert wait_for(lambda: fake_engine.state.running == 0)
    assert fake_engine.state.aborted == 1
    assert wait_for(lambda: scrape(gw.url, "lorafleet_requests_total", tenant="acme", code="499") == 1)
    assert scrape(gw.url, "lorafleet_inflight_requests", tenant="acme") == 0


def tenant_usage(gw: ServerThread, who: str) -> dict:
    report = httpx.get(f"{gw.url}/admin/tenants", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    return next(t for t in report["tenants"] if t["name"] == who)["usage"]


def test_a_stream_the_client_abandons_is_charged_what_the_engine_generated(gw, fake_engine):
    """Closing the connection before the last chunk must not make the answer free (or dodge tpm)."""
    fake_engine.state.token_delay = 0.05
    body = {"model": "fake-base", "messages": MSG, "max_tokens": 60, "stream": True}
    with httpx.stream(
        "POST", f"{gw.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEYS['meter']}"}
    ) as r:
        for i, line in enumerate(r.iter_lines()):
            assert '"usage"' not in line  # asked of the engine for metering, never shown to this client
            if i == 20:  # ten chunks: the role and nine tokens
                break
    assert wait_for(lambda: scrape(gw.url, "lorafleet_requests_total", tenant="meter", code="499") == 1)
    generated, usage = fake_engine.state.generated, tenant_usage(gw, "meter")
    # Charged up to the last chunk the engine sent before the abort; a chunk still on the wire may be missed.
    assert 9 <= usage["completion_tokens"] <= generated < 60
    assert generated - usage["completion_tokens"] <= 1
    assert usage["prompt_tokens"] > 0 and usage["cost_usd"] > 0
    assert usage["tpm_used"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_a_whole_answer_whose_client_left_is_generated_and_charged(gw, fake_engine):
    fake_engine.state.token_delay = 0.05  # 40 tokens: 2 s
    body = {"model": "fake-base", "messages": MSG, "max_tokens": 40}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{gw.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEYS['meter']}"},
            timeout=0.5,
        )
    assert wait_for(lambda: scrape(gw.url, "lorafleet_requests_total", tenant="meter", code="499") == 1)
    assert fake_engine.state.generated == 40 and tenant_usage(gw, "meter")["completion_tokens"] == 40


def test_daily_budget_refuses_with_insufficient_quota_and_overshoots_by_at_most_the_running_requests(gw, fake_engine):
    fake_engine.state.token_delay = 0.01
    c = client(gw, "budget")

    def ask(_):
        try:
            r = c.chat.completions.create(model="fake-base", messages=MSG, max_tokens=40)
            return (r.usage.prompt_tokens * 1 + r.usage.completion_tokens * 2) / 1e6  # the fake's price
        except openai.RateLimitError as e:
            return e

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(40)))
    costs, refused = [g for g in got if isinstance(g, float)], [g for g in got if not isinstance(g, float)]
    assert costs and refused, "the budget was never reached, or nothing was served"
    err = refused[0].body
    assert refused[0].status_code == 429 and err["type"] == err["code"] == "insufficient_quota"
    assert "daily budget of $0.0005 is spent" in err["message"] and "resets at" in err["message"]
    assert 0 < int(refused[0].response.headers["retry-after"]) <= 86400
    spent = tenant_usage(gw, "budget")["usd_this_day"]
    assert spent == pytest.approx(sum(costs))
    overshoot = spent - BUDGET
    print(
        f"\nbudget ${BUDGET}: spent ${spent:.6f}, overshoot ${overshoot:.6f} = {overshoot / max(costs):.1f} requests"
    )
    # Admission stops at the budget; what overshoots is the request that crossed it and the (at most 7) others
    # already running then.
    assert 0 <= overshoot <= 8 * max(costs)
    assert scrape(gw.url, "lorafleet_ratelimited_total", tenant="budget", limit="usd_per_day") == len(refused)
    assert scrape(gw.url, "lorafleet_budget_utilization", tenant="budget", period="day") == pytest.approx(
        spent / BUDGET
    )


def test_metered_tokens_and_cost_equal_the_usage_clients_received(gw):
    c, prompt, completion = client(gw, "meter"), 0, 0
    for n in (1, 3, 5):
        r = c.chat.completions.create(model="fake-base", messages=MSG, max_tokens=n)
        prompt, completion = prompt + r.usage.prompt_tokens, completion + r.usage.completion_tokens
        *_, last = c.chat.completions.create(
            model="fake-base", messages=MSG, max_tokens=n, stream=True, stream_options={"include_usage": True}
        )
        prompt, completion = prompt + last.usage.prompt_tokens, completion + last.usage.completion_tokens
    labels = {"tenant": "meter", "model": "fake-base"}
    # a request is metered just after its last byte left: wait for all six to be counted
    assert wait_for(lambda: scrape(gw.url, "lorafleet_requests_total", code="200", **labels) == 6)
    assert scrape(gw.url, "lorafleet_tokens_total", kind="prompt", **labels) == prompt
    assert scrape(gw.url, "lorafleet_tokens_total", kind="completion", **labels) == completion
    assert scrape(gw.url, "lorafleet_cost_usd_total", **labels) == pytest.approx((prompt * 1 + completion * 2) / 1e6)
    assert scrape(gw.url, "lorafleet_ttft_seconds_count", **labels) == 3  # streams only
    report = httpx.get(f"{gw.url}/admin/tenants", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    usage = next(t for t in report["tenants"] if t["name"] == "meter")["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["requests"]) == (prompt, completion, 6)


def test_rpm_limit_gives_429_with_retry_after(gw):
    codes = [post(gw, "tight", {"model": "fake-base", "messages": MSG}) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert 1 <= int(codes[2].headers["retry-after"]) <= 60
    assert codes[2].json()["error"]["type"] == "rate_limit_error"
    assert scrape(gw.url, "lorafleet_ratelimited_total", tenant="tight", limit="rpm") == 1
    assert scrape(gw.url, "lorafleet_quota_utilization", tenant="tight", limit="rpm") == 1.0


def test_concurrency_limit_gives_429_while_a_request_runs(gw, fake_engine):
    fake_engine.state.token_delay = 0.05
    body = {"model": "fake-base", "messages": MSG, "max_tokens": 40, "stream": True}
    with httpx.stream(
        "POST", f"{gw.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEYS['single']}"}
    ) as running:
        chunks = running.iter_raw()  # keep a reference: a collected iterator closes the connection
        next(chunks)
        second = post(gw, "single", {"model": "fake-base", "messages": MSG})
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert scrape(gw.url, "lorafleet_ratelimited_total", tenant="single", limit="concurrency") == 1


@pytest.mark.parametrize(
    "who,body,path,status,code",
    [
        (None, {"model": "fake-base", "messages": MSG}, "/v1/chat/completions", 401, "invalid_api_key"),
        ("sk-wrong", {"model": "fake-base", "messages": MSG}, "/v1/chat/completions", 401, "invalid_api_key"),
        ("acme", b'{"model": "fake-base", "messages": [', "/v1/chat/completions", 400, "invalid_json"),
        ("acme", {"messages": MSG}, "/v1/chat/completions", 400, None),
        ("acme", {"model": "fake-base"}, "/v1/chat/completions", 400, None),
        ("acme", {"model": "fake-base", "messages": MSG, "max_tokens": 65}, "/v1/chat/completions", 400, None),
        ("acme", {"model": "ghost", "messages": MSG}, "/v1/chat/completions", 404, "model_not_found"),
        (
            "acme",
            {"model": "fake-base", "messages": MSG, "pad": "x" * 5000},
            "/v1/chat/completions",
            413,
            "request_too_large",
        ),
        ("acme", {"model": "fake-base", "prompt": "hi"}, "/v1/nowhere", 404, None),
        ("acme", b"", "/v1/chat/completions", 400, "invalid_json"),
        ("acme", b"null", "/v1/chat/completions", 400, "invalid_json"),
        ("acme", {"model": {"a": 1}, "messages": MSG}, "/v1/chat/completions", 400, None),
        ("acme", {"model": "fake-base", "prompt": 5}, "/v1/completions", 400, None),
    ],
)
def test_bad_input_gets_the_right_status_and_openai_error_json(gw, who, body, path, status, code):
    r = post(gw, who, body, path)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["code"] == code


def test_chunked_upload_over_the_cap_is_413(gw):
    def body():
        yield b'{"model": "fake-base", "messages": [], "pad": "'
        for _ in range(10):
            yield b"x" * 1000

    r = httpx.post(
        f"{gw.url}/v1/chat/completions", content=body(), headers={"Authorization": f"Bearer {KEYS['acme']}"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_wrong_method_is_json_too(gw):
    r = httpx.get(f"{gw.url}/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_engine_errors_pass_through_unchanged(gw):
    r = post(gw, "acme", {"model": "fake-base", "messages": MSG, "temperature": -1})
    assert r.status_code == 400 and r.json() == {
        "error": {
            "message": "temperature must be >= 0",
            "type": "BadRequestError",
            "param": "temperature",
            "code": 400,
        }
    }


def test_adapter_the_engine_lost_is_loaded_again(gw, fake_engine):
    assert post(gw, "acme", {"model": "tiny-a", "messages": MSG}).status_code == 200
    fake_engine.state.loaded.clear()  # e.g. restarted between two health checks: the gateway did not notice
    assert post(gw, "acme", {"model": "tiny-a", "messages": MSG}).status_code == 200
    assert fake_engine.state.load_calls == 2


# -- admin API


def admin(gw: ServerThread, method: str, path: str, key: str | None = ADMIN_KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, gw.url + path, headers=headers, timeout=30, **kw)


@pytest.mark.parametrize("key", [None, KEYS["acme"], "sk-wrong"])
@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/admin/tenants"),
        ("GET", "/admin/adapters"),
        ("POST", "/admin/adapters"),
        ("DELETE", "/admin/adapters/tiny-a"),
    ],
)
def test_admin_api_refuses_anything_but_the_admin_key(gw, key, method, path):
    r = admin(gw, method, path, key, json={"name": "x", "path": "tiny-a", "base": "fake-base"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def adapters_in(engine) -> set[str]:
    """The adapters an engine holds, by name (it knows each as `name@digest`)."""
    return {n.split("@", 1)[0] for n in engine.state.loaded}


def test_re_registering_a_name_with_new_files_never_serves_the_old_weights(gw, tiny_adapter_root, fake_engine):
    import shutil

    folder = tiny_adapter_root / "tiny-c"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(tiny_adapter_root / "tiny-a", folder)
    body = {"name": "tiny-c", "path": "tiny-c", "base": "fake-base", "tenants": ["acme"]}
    first = admin(gw, "POST", "/admin/adapters", json=body).json()["version"]
    assert post(gw, "acme", {"model": "tiny-c", "messages": MSG}).status_code == 200
    assert admin(gw, "DELETE", "/admin/adapters/tiny-c").status_code == 200
    fake_engine.state.loaded.add(first)  # an engine that kept the old weights (vLLM evicts lazily)
    (folder / "adapter_config.json").write_text((folder / "adapter_config.json").read_text() + " ")  # retrained

    second = admin(gw, "POST", "/admin/adapters", json=body).json()["version"]
    assert second != first
    assert post(gw, "acme", {"model": "tiny-c", "messages": MSG}).status_code == 200
    assert fake_engine.state.bodies[-1]["model"] == second  # the new files, under their own name
    admin(gw, "DELETE", "/admin/adapters/tiny-c")
    shutil.rmtree(folder)


def test_register_use_and_delete_an_adapter(gw, tiny_adapter_root, fake_engine):
    import shutil

    if not (tiny_adapter_root / "tiny-b").exists():
        shutil.copytree(tiny_adapter_root / "tiny-a", tiny_adapter_root / "tiny-b")
    r = admin(
        gw,
        "POST",
        "/admin/adapters",
        json={"name": "tiny-b", "path": "tiny-b", "base": "fake-base", "tenants": ["globex"]},
    )
    assert r.status_code == 201, r.text
    version = r.json()["version"]
    assert version.startswith("tiny-b@")  # the engine hears the content-named version, never the bare name
    assert post(gw, "globex", {"model": "tiny-b", "messages": MSG}).status_code == 200
    assert post(gw, "acme", {"model": "tiny-b", "messages": MSG}).status_code == 404
    assert version in fake_engine.state.loaded
    listed = admin(gw, "GET", "/admin/adapters").json()["adapters"]
    assert {"name": "tiny-b", "loaded_on": ["fake"]}.items() <= next(
        a for a in listed if a["name"] == "tiny-b"
    ).items()

    again = admin(gw, "POST", "/admin/adapters", json={"name": "tiny-b", "path": "tiny-b", "base": "fake-base"})
    assert again.status_code == 409
    assert admin(gw, "DELETE", "/admin/adapters/tiny-b").status_code == 200
    assert wait_for(lambda: version not in fake_engine.state.loaded)  # unloaded once its requests ended
    assert post(gw, "globex", {"model": "tiny-b", "messages": MSG}).status_code == 404
    assert admin(gw, "DELETE", "/admin/adapters/tiny-b").status_code == 404
    assert admin(gw, "DELETE", "/admin/adapters/fake-base").status_code == 400


def test_register_refuses_paths_outside_the_root_and_bad_adapters(gw, tiny_adapter_root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tiny_adapter_root / "escape").unlink(missing_ok=True)
    os.symlink(outside, tiny_adapter_root / "escape")
    broken = tiny_adapter_root / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text("{}")
    cases = {
        "../outside": "path",
        str(outside): "path",
        "escape": "path",
        "missing": "path",
        "broken": "path",
    }
    for path, param in cases.items():
        r = admin(gw, "POST", "/admin/adapters", json={"name": "x1", "path": path, "base": "fake-base"})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["param"] == param
    bad = [
        ({"name": "x1", "path": "tiny-a", "base": "nope"}, "base"),
        ({"name": "x1", "path": "tiny-a", "base": "fake-base", "tenants": ["who"]}, "tenants"),
        ({"name": "bad name", "path": "tiny-a", "base": "fake-base"}, "name"),
        ({"path": "tiny-a", "base": "fake-base"}, "name"),
    ]
    for body, param in bad:
        r = admin(gw, "POST", "/admin/adapters", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert admin(gw, "POST", "/admin/adapters", content=b"{oops").status_code == 400
