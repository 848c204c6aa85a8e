from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import httpx
import pytest

from serve.gateway.metrics import Metrics
from serve.gateway.protocol import ApiError, parse_request, rate_limited
from serve.gateway.registry import Registry, rendezvous
from serve.gateway.stream import StreamMeter, has_content, pump, usage_event
from tests.serve.conftest import config

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

# -- request parsing and errors


@pytest.mark.parametrize(
    "body,kind,param,code",
    [
        (b"{not json", "chat", None, "invalid_json"),
        (b"[1, 2]", "chat", None, "invalid_json"),
        (b"\xff\xfe", "chat", None, "invalid_json"),
        (json.dumps({"messages": CHAT["messages"]}).encode(), "chat", "model", None),
        (json.dumps({**CHAT, "model": 7}).encode(), "chat", "model", None),
        (json.dumps({"model": "m"}).encode(), "chat", "messages", None),
        (json.dumps({"model": "m", "messages": []}).encode(), "chat", "messages", None),
        (json.dumps({"model": "m", "messages": ["hi"]}).encode(), "chat", "messages", None),
        (json.dumps({"model": "m"}).encode(), "completion", "prompt", None),
        (json.dumps({**CHAT, "stream": "yes"}).encode(), "chat", "stream", None),
        (json.dumps({**CHAT, "max_tokens": 0}).encode(), "chat", "max_tokens", None),
        (json.dumps({**CHAT, "max_tokens": 2.5}).encode(), "chat", "max_tokens", None),
        (json.dumps({**CHAT, "max_tokens": True}).encode(), "chat", "max_tokens", None),
        (json.dumps({**CHAT, "max_tokens": 101}).encode(), "chat", "max_tokens", None),
        (json.dumps({**CHAT, "max_completion_tokens": 500}).encode(), "chat", "max_completion_tokens", None),
        (json.dumps({**CHAT, "stream": True, "stream_options": 3}).encode(), "chat", "stream_options", None),
    ],
)
def test_bad_requests_are_400_naming_the_field(body, kind, param, code):
    with pytest.raises(ApiError) as e:
        parse_request(body, kind, max_tokens_cap=100)
    assert (e.value.status, e.value.param, e.value.code) == (400, param, code)
    err = e.value.body()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"


def test_non_streaming_body_is_forwarded_byte_for_byte():
    raw = json.dumps({**CHAT, "max_tokens": 5, "some_vllm_extra": [1]}).encode()
    req = parse_request(raw, "chat", 100)
    assert req.body is raw and (req.model, req.stream, req.max_tokens) == ("m", False, 5)


def test_stream_asks_engine_for_usage_and_remembers_client_did_not():
    req = parse_request(json.dumps({**CHAT, "stream": True, "stream_options": {"x": 1}}).encode(), "chat", 100)
    assert json.loads(req.body)["stream_options"] == {"x": 1, "include_usage": True}
    assert req.stream and not req.client_wants_usage


def test_stream_with_client_usage_is_untouched():
    raw = json.dumps({**CHAT, "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = parse_request(raw, "chat", 100)
    assert req.body is raw and req.client_wants_usage


def test_rate_limit_error_carries_retry_after():
    resp = rate_limited("rpm", "7").response()
    assert resp.status_code == 429 and resp.headers["retry-after"] == "7"
    assert json.loads(resp.body)["error"]["code"] == "rate_limit_exceeded"


# -- SSE metering


def ev(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


ROLE = ev({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
TOK = [ev({"choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}) for i in range(3)]
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
USAGE_EV = ev({"id": "x", "choices": [], "usage": USAGE})
DONE = b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    "event,content",
    [
        (ROLE, False),
        (TOK[0], True),
        (ev({"choices": [{"text": "a"}]}), True),
        (ev({"choices": [{"text": ""}]}), False),
        (DONE, False),
        (USAGE_EV, False),
        (b"data: {broken\n\n", False),
        (b": keep-alive\n\n", False),
    ],
)
def test_has_content(event, content):
    assert has_content(event) is content


def test_usage_event_only_matches_the_final_usage_chunk():
    assert usage_event(USAGE_EV) == USAGE
    with_usage = ev({"choices": [{"delta": {"content": "a"}}], "usage": USAGE})  # continuous usage stats
    assert usage_event(with_usage) is None and usage_event(DONE) is None


@pytest.mark.parametrize("keep", [True, False])
def test_meter_strips_usage_only_when_the_client_did_not_ask(keep):
    meter = StreamMeter(keep_usage=keep)
    blocks = [ROLE, TOK[0], TOK[1], TOK[2] + USAGE_EV + DONE]
    out = b"".join(meter.feed(b, float(i)) for i, b in enumerate(blocks))
    full = b"".join(blocks)
    assert out == (full if keep else full.replace(USAGE_EV, b""))
    assert meter.usage == USAGE


def test_meter_times_first_content_not_the_role_chunk_and_gaps_after():
    meter = StreamMeter(keep_usage=False)
    for t, block in [(1.0, ROLE), (2.0, TOK[0]), (2.5, TOK[1]), (4.0, TOK[2]), (4.1, USAGE_EV + DONE)]:
        meter.feed(block, t)
    assert meter.first == 2.0
    assert meter.gaps == [0.5, 1.5]  # the usage/[DONE] tail is not a token gap


def test_pump_reassembles_events_split_across_reads():
    stream = ROLE + TOK[0] + TOK[1] + USAGE_EV + DONE
    cuts = [5, 17, len(ROLE) + 3, len(stream) - len(DONE) - 40, len(stream) - 2]  # mid-line, mid-JSON, mid-usage

    async def body():
        last = 0
        for cut in [*cuts, len(stream)]:
            yield stream[last:cut]
            last = cut

    sent = []

    async def send(message):
        sent.append(message)

    meter = StreamMeter(keep_usage=False)
    asyncio.run(pump(httpx.Response(200, content=body()), send, meter))
    assert meter.ended
    assert b"".join(m["body"] for m in sent) == stream.replace(USAGE_EV, b"")
    assert sent[-1]["more_body"] is False and meter.usage == USAGE
    # every piece sent on holds whole events only
    assert all(m["body"].endswith(b"\n\n") for m in sent if m["body"])


# -- routing


def test_rendezvous_is_stable_and_balanced():
    names = ["r0", "r1", "r2", "r3"]
    firsts = Counter(rendezvous(f"adapter-{i}", names)[0] for i in range(2000))
    assert rendezvous("a", names) == rendezvous("a", list(reversed(names)))
    assert set(firsts) == set(names) and min(firsts.values()) > 350  # 500 expected each


def test_rendezvous_moves_only_the_keys_of_a_removed_replica():
    names = ["r0", "r1", "r2", "r3"]
    keys = [f"adapter-{i}" for i in range(500)]
    before = {k: rendezvous(k, names)[0] for k in keys}
    after = {k: rendezvous(k, ["r0", "r1", "r3"])[0] for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == "r2"}


def _registry(replicas: int = 3) -> Registry:
    cfg = config(
        [{"name": "e", "model": "tiny-random-llama", "served_name": "base", "port": 9001, "replicas": replicas}],
        [],
        [{"name": "a1", "path": "a1", "base": "base"}],
    )
    return Registry(cfg, Metrics(), {"a1": Path("/tmp/a1")})


def test_route_keeps_an_adapter_on_its_replica_and_puts_down_ones_last():
    reg = _registry()
    adapter = reg.resolve("a1")
    first = reg.route(adapter)
    assert [r.name for r in first] == rendezvous("a1", ["e-0", "e-1", "e-2"])
    reg.mark(first[0], False)
    again = reg.route(adapter)
    assert again[-1] is first[0] and again[0] is first[1]


def test_route_sends_base_requests_to_the_least_busy_replica():
    reg = _registry()
    r0, r1, r2 = reg.groups["e"]
    r0.inflight, r1.inflight, r2.inflight = 5, 1, 3
    assert [r.name for r in reg.route(reg.resolve("base"))] == ["e-1", "e-2", "e-0"]
