from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from serve.gateway.metrics import Metrics
from serve.gateway.protocol import ApiError, parse_request, rate_limited
from serve.gateway.registry import Registry, rendezvous
from serve.gateway.stream import StreamMeter, has_content, pump, split_usage, usage_event
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


def test_stream_asks_engine_for_running_usage_and_remembers_client_did_not():
    req = parse_request(json.dumps({**CHAT, "stream": True, "stream_options": {"x": 1}}).encode(), "chat", 100)
    assert json.loads(req.body)["stream_options"] == {"x": 1, "include_usage": True, "continuous_usage_stats": True}
    assert req.stream and not req.client_wants_usage and not req.client_wants_running_usage


def test_stream_with_client_final_usage_still_asks_for_running_usage():
    raw = json.dumps({**CHAT, "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = parse_request(raw, "chat", 100)
    assert json.loads(req.body)["stream_options"]["continuous_usage_stats"] is True
    assert req.client_wants_usage and not req.client_wants_running_usage


def test_stream_with_client_running_usage_is_untouched():
    options = {"include_usage": True, "continuous_usage_stats": True}
    raw = json.dumps({**CHAT, "stream": True, "n": 3, "stream_options": options, "max_tokens": 9}).encode()
    req = parse_request(raw, "chat", 100)
    assert req.body is raw and req.client_wants_usage and req.client_wants_running_usage and req.n == 3


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


def running_ev(index: int, done: int, prompt: int = 7, kind: str = "chat") -> bytes:
    """A chunk as vLLM sends it with continuous_usage_stats: choices, then the running usage, then more fields."""
    choice = {"index": index, "delta": {"content": "a"}} if kind == "chat" else {"index": index, "text": "a"}
    usage = {"prompt_tokens": prompt, "total_tokens": prompt + done, "completion_tokens": done}
    return ev({"id": "x", "choices": [choice], "usage": usage, "system_fingerprint": None})


def test_split_usage_cuts_out_exactly_the_running_usage():
    event = running_ev(2, 5).rstrip(b"\n")
    stripped, usage, index = split_usage(event)
    assert usage == {"prompt_tokens": 7, "total_tokens": 12, "completion_tokens": 5} and index == 2
    assert json.loads(stripped[6:]) == {"id": "x", "choices": [{"index": 2, "delta": {"content": "a"}}],
                                        "system_fingerprint": None}  # fmt: skip
    assert split_usage(TOK[0].rstrip(b"\n")) == (TOK[0].rstrip(b"\n"), None, 0)


def test_split_usage_reads_nested_or_unusual_usage_by_parsing():
    obj = {"choices": [{"delta": {}, "index": 1}], "usage": {"prompt_tokens": 3, "prompt_tokens_details": {"x": 1}}}
    stripped, usage, index = split_usage(ev(obj).rstrip(b"\n"))
    assert usage == obj["usage"] and index == 1 and json.loads(stripped[6:]) == {"choices": obj["choices"]}


def test_an_aborted_stream_is_charged_the_running_usage_of_its_last_chunk():
    meter = StreamMeter(keep_usage=False)
    out = b"".join(meter.feed(running_ev(0, i), float(i)) for i in range(4))
    assert b'"usage"' not in out and out.count(b"data: ") == 4  # the client did not ask: cut out, chunks kept
    assert meter.usage is None
    assert meter.charged() == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_running_usage_passes_through_when_the_client_asked_for_it():
    meter = StreamMeter(keep_usage=True, keep_running=True)
    blocks = [running_ev(0, 1), running_ev(0, 2) + USAGE_EV + DONE]
    assert b"".join(meter.feed(b, 0.0) for b in blocks) == b"".join(blocks)
    assert meter.charged() == USAGE  # the final usage event wins


@pytest.mark.parametrize(
    "n,events,want",
    [
        # chat, n=3: the choices share the one prompt
        (3, [(0, 4, 7), (1, 2, 7), (2, 5, 7), (0, 6, 7)], (7, 6 + 2 + 5)),
        # completions, two prompts x n=2: choice i belongs to prompt i // n
        (2, [(0, 1, 5), (1, 3, 5), (2, 2, 9), (3, 4, 9)], (5 + 9, 1 + 3 + 2 + 4)),
    ],
)
def test_charged_sums_every_choice_and_each_prompt_once(n, events, want):
    meter = StreamMeter(keep_usage=False, n=n)
    for index, done, prompt in events:
        meter.feed(running_ev(index, done, prompt, kind="completion"), 0.0)
    charged = meter.charged()
    assert (charged["prompt_tokens"], charged["completion_tokens"]) == want


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
    asyncio.run(pump(body(), send, meter))
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
