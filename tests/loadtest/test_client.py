"""One streamed request against the fake server: timings, token counting, request fields, errors, preflight."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from loadtest.client import PreflightError, RequestRecord, build_body, endpoint, preflight, stream_request
from loadtest.config import Target

from .conftest import MODELS


def target(fake, api="chat", **kw) -> Target:
    data = {"name": "fake-t", "base_url": fake.base_url, "model": "base-model", "api": api}
    return Target(**{**data, "price": {"usd_per_hour": 1}, **kw})


def send(fake, api="chat", max_tokens=8, force=True, model="base-model", headers=None) -> RequestRecord:
    t = target(fake, api)
    prompt = [{"role": "user", "content": "one two three"}] if api == "chat" else "one two three"
    body = build_body(t, model, prompt, max_tokens, force_output_len=force)

    async def go():
        async with httpx.AsyncClient(timeout=30) as client:
            rec = RequestRecord(model=model, scheduled=0.0)
            return await stream_request(client, endpoint(t), headers or {}, body, rec, time.perf_counter())

    return asyncio.run(go())


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_timings_from_known_delays(fake, api):
    fake.settings.ttft_s, fake.settings.itl_s, fake.settings.tokens_per_chunk = 0.3, 0.1, 2
    r = send(fake, api, max_tokens=8)  # 8 tokens in 4 chunks: TTFT 0.3, then 3 gaps of 0.1
    assert r.ok, r.error
    # Generous bounds: a loaded machine only adds delay, never removes it.
    assert 0.28 <= r.ttft < 1.5
    assert len(r.itl) == 3 and all(0.08 <= g < 1.0 for g in r.itl)
    assert 0.55 <= r.e2e < 3.0
    assert r.tpot == pytest.approx((r.e2e - r.ttft) / 7)
    assert 0.03 <= r.tpot < 0.3


def test_ttft_waits_for_content_not_the_role_chunk(fake):
    # The fake sends the role chunk at once and the first content after 0.3 s, as vLLM does.
    fake.settings.ttft_s = 0.3
    assert send(fake).ttft >= 0.28


def test_output_tokens_come_from_usage_not_from_chunks(fake):
    fake.settings.tokens_per_chunk = 2
    r = send(fake, max_tokens=10)
    assert r.tokens_from_usage
    assert r.output_tokens == 10  # 5 chunks of 2 tokens
    assert len(r.itl) == 4
    assert r.prompt_tokens == 3


def test_without_usage_tokens_fall_back_to_chunks_and_say_so(fake):
    fake.settings.send_usage = False
    r = send(fake, max_tokens=10)
    assert not r.tokens_from_usage and r.output_tokens == 5


def test_a_response_that_is_not_a_stream_is_an_error(fake):
    fake.settings.streams = False
    r = send(fake)
    assert (r.ok, r.status) == (False, "error") and "not an event stream" in r.error


@pytest.mark.parametrize("force, expected_tokens", [(True, 32), (False, 16)])
def test_force_output_len_sends_vllm_extensions(fake, force, expected_tokens):
    fake.settings.natural_tokens = 16
    r = send(fake, max_tokens=32, force=force)
    body = fake.app.bodies[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    if force:
        assert body["ignore_eos"] is True and body["min_tokens"] == 32
    else:
        assert "ignore_eos" not in body and "min_tokens" not in body
    assert r.output_tokens == expected_tokens


@pytest.mark.parametrize(
    "setup, status, text",
    [
        (lambda s: setattr(s, "fail_every", 1), "500", "injected failure"),
        (lambda s: setattr(s, "api_key", "right"), "401", "invalid API key"),
        (lambda s: None, "404", "does not exist"),  # unknown model
    ],
)
def test_http_errors_are_recorded_not_raised(fake, setup, status, text):
    setup(fake.settings)
    model = "nope" if status == "404" else "base-model"
    r = send(fake, model=model)
    assert (r.ok, r.status) == (False, status)
    assert text in r.error


def test_connection_errors_are_recorded_not_raised(fake):
    url = fake.base_url
    fake.stop()
    t = Target(name="x", base_url=url, model="base-model", price={"usd_per_hour": 1})

    async def go():
        async with httpx.AsyncClient(timeout=5) as client:
            rec = RequestRecord(model="base-model", scheduled=0.0)
            return await stream_request(client, endpoint(t), {}, build_body(t, "base-model", [], 4), rec, 0.0)

    r = asyncio.run(go())
    assert r.status == "error" and "Connect" in r.error


def _preflight(t: Target, models: set[str]) -> str:
    with pytest.raises(PreflightError) as e:
        asyncio.run(preflight([t], {t.name: models}))
    return str(e.value)


def test_preflight_passes_when_every_model_is_served(fake):
    assert asyncio.run(preflight([target(fake)], {"fake-t": set(MODELS)})) is None  # raises PreflightError if not


def test_preflight_connection_refused_names_the_target(fake):
    url = fake.base_url
    fake.stop()
    t = Target(name="gone", base_url=url, model="m", price={"usd_per_hour": 1})
    msg = _preflight(t, {"m"})
    assert "'gone'" in msg and "cannot connect" in msg


def test_preflight_bad_key_names_the_target(fake):
    fake.settings.api_key = "right"
    msg = _preflight(target(fake, api_key="wrong"), {"base-model"})
    assert "'fake-t'" in msg and "rejected (HTTP 401)" in msg


def test_preflight_per_model_keys_are_each_checked(fake):
    fake.settings.api_key = "right"
    good = target(fake, api_key="right")
    asyncio.run(preflight([good], {"fake-t": {"manifest"}}))
    msg = _preflight(target(fake, api_key="right", model_keys={"drugs": "wrong"}), {"manifest", "drugs"})
    assert "'fake-t'" in msg and "drugs" in msg and "401" in msg


def test_preflight_wrong_base_url_names_the_target(fake):
    t = Target(name="no-v1", base_url=fake.base_url[:-3], model="m", price={"usd_per_hour": 1})
    msg = _preflight(t, {"m"})
    assert "'no-v1'" in msg and "404" in msg and "/v1" in msg


def test_preflight_missing_model_names_target_and_model(fake):
    msg = _preflight(target(fake), {"manifest", "legal"})
    assert "'fake-t'" in msg and "['legal']" in msg and "manifest" in msg


def test_preflight_lists_every_bad_target(fake):
    ok = target(fake)
    bad = Target(name="bad", base_url=fake.base_url, model="zzz", price={"usd_per_hour": 1})
    with pytest.raises(PreflightError) as e:
        asyncio.run(preflight([ok, bad, bad.model_copy(update={"name": "bad2"})], {}))
    assert "'bad'" in str(e.value) and "'bad2'" in str(e.value) and "'fake-t'" not in str(e.value)
