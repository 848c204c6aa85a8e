"""Limits shared by several gateways through a real Redis (started by the test run): one count, not one per
gateway; slots of a dead gateway come back; exact nano-dollar budgets; Redis away gives 503 and the gateway
recovers by itself when it returns."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lorafleet.core.net import free_port
from lorafleet.services import RedisServer
from serve.config import Limits
from serve.gateway.app import ServerThread, create_app
from serve.gateway.protocol import ApiError
from serve.gateway.shared_limits import RedisLimiter
from tests.serve.conftest import ADMIN_KEY, KEYS, config, scrape, tenant

MSG = [{"role": "user", "content": "hello there"}]

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def run(coro):
    return asyncio.run(coro)


async def _admits(limiters, limits, n_each):
    decisions = []
    for _ in range(n_each):
        for lim in limiters:  # interleaved, as two gateways taking turns
            decisions.append(await lim.acquire("acme", limits))
    return decisions


def test_rpm_is_one_count_across_gateways(redis):
    async def go():
        a, b = RedisLimiter(redis.url, lease_s=60), RedisLimiter(redis.url, lease_s=60)
        try:
            decisions = await _admits([a, b], Limits(rpm=30), 25)
        finally:
            await a.close()
            await b.close()
        return decisions

    decisions = run(go())
    assert sum(d.ok for d in decisions) == 30  # per-process limits would have let 50 through
    refused = [d for d in decisions if not d.ok]
    assert {d.limit for d in refused} == {"rpm"} and all(55 < d.retry_after <= 60 for d in refused)


def test_a_fine_tuning_charge_read_by_two_gateways_is_charged_once(redis):
    async def go():
        a, b = RedisLimiter(redis.url, lease_s=60), RedisLimiter(redis.url, lease_s=60)
        try:
            firsts = [await a.charge_once("usage-7", "acme", 0.25), await b.charge_once("usage-7", "acme", 0.25)]
            await a.refresh(["acme"])
            return firsts, a.spend("acme"), (await b.acquire("acme", Limits(usd_per_day=0.2))).ok
        finally:
            await a.close()
            await b.close()

    firsts, spend, admitted = run(go())
    assert firsts == [True, False] and spend["usd_this_day"] == 0.25 and not admitted


def test_concurrency_slots_are_shared_and_a_dead_gateways_slots_expire(redis):
    async def go():
        a, b = RedisLimiter(redis.url, lease_s=60), RedisLimiter(redis.url, lease_s=0.5)
        try:
            first = await a.acquire("acme", Limits(concurrency=2))
            assert first.ok and (await b.acquire("acme", Limits(concurrency=2))).ok
            full = await a.acquire("acme", Limits(concurrency=2))
            assert not full.ok and full.limit == "concurrency"
            a.release("acme", lease=first.lease)
            await asyncio.gather(*a._tasks)
            assert (await b.acquire("acme", Limits(concurrency=2))).ok  # a's slot came back
            # b "dies" holding two slots: its leases (0.5 s here, request_timeout_s in a gateway) run out
            assert not (await a.acquire("acme", Limits(concurrency=2))).ok
            await asyncio.sleep(0.7)
            assert (await a.acquire("acme", Limits(concurrency=2))).ok
        finally:
            await a.close()
            await b.close()

    run(go())


def test_tokens_and_budgets_are_charged_once_and_exactly(redis):
    async def go():
        a, b = RedisLimiter(redis.url, lease_s=60), RedisLimiter(redis.url, lease_s=60)
        limits = Limits(tpm=100, usd_per_day=0.000001)
        try:
            for lim in (a, b):
                d = await lim.acquire("acme", limits)
                lim.release("acme", tokens=60, cost_usd=0.0000006, lease=d.lease)  # 600 nano-$ each
                await asyncio.gather(*lim._tasks)
            over = await a.acquire("acme", limits)
            assert not over.ok and over.limit == "tpm" and 55 < over.retry_after <= 60
            await b.refresh(["acme"])
            assert b.usage("acme")["tpm_used"] == 120
            assert b.spend("acme")["usd_this_day"] == 0.0000012  # integer nano-dollars: no float drift
            broke = await b.acquire("acme", Limits(usd_per_day=0.000001))
            assert not broke.ok and broke.limit == "usd_per_day" and "daily budget of $1e-06 is spent" in broke.message
            assert b.budget_utilization("acme", Limits(usd_per_day=0.000001)) == {"day": pytest.approx(1.2)}
        finally:
            await a.close()
            await b.close()

    run(go())


def test_redis_away_gives_503_keeps_the_charges_and_recovers(tmp_path):
    server = RedisServer(tmp_path / "r")  # not started yet: nothing listens on its port

    async def go():
        lim = RedisLimiter(server.url, lease_s=60, timeout_s=0.5)
        await lim.start()
        assert lim.health() | {"error": ""} == {"backend": "redis", "shared": True, "up": False, "error": ""}
        with pytest.raises(ApiError) as e:
            await lim.acquire("acme", Limits(rpm=10))
        assert e.value.status == 503 and e.value.code == "limits_unavailable"
        assert e.value.headers["Retry-After"] == "2"
        server.start()
        try:
            d = await lim.acquire("acme", Limits(rpm=10))  # back by itself: no restart, no reconnect call
            assert d.ok and lim.health()["up"]
            server.stop()
            lim.release("acme", tokens=7, cost_usd=0.000002, lease=d.lease)  # ends while Redis is away
            await asyncio.gather(*lim._tasks)
            assert len(lim.pending) == 1 and not lim.health()["up"]
            server.start()
            await lim.refresh(["acme"])  # the missed charge is sent first
            assert lim.pending == [] and lim.usage("acme")["tpm_used"] == 7
            assert lim.spend("acme")["usd_this_day"] == 0.000002
        finally:
            await lim.close()
            server.stop()

    run(go())


# -- two gateways, one Redis, one fake engine


def _gateway(fake_engine, redis_url: str, rpm: int) -> ServerThread:
    engine = {"name": "fake", "model": "fake", "served_name": "fake-base", "urls": [fake_engine.url]}
    cfg = config([engine], [tenant("acme", ["fake-base"], rpm=rpm)], redis_url=redis_url, store_poll_s=0.2)
    return ServerThread(create_app(cfg), port=free_port()).start()


def _chat(gw) -> httpx.Response:
    body = {"model": "fake-base", "messages": MSG, "max_tokens": 2}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEYS['acme']}"})


def test_two_gateways_hammered_at_once_admit_the_limit_once(fake_engine, redis):
    gateways = [_gateway(fake_engine, redis.url, rpm=60) for _ in range(2)]
    try:
        # 160 requests, more than the 120 two unshared limits would admit, whatever the machine's speed (well
        # inside the 60 s window: seconds here)
        def hammer(i: int) -> list[int]:
            return [_chat(gateways[i % 2]).status_code for _ in range(20)]

        with ThreadPoolExecutor(8) as pool:
            codes = [c for cs in pool.map(hammer, range(8)) for c in cs]
        assert codes.count(200) == 60, f"{codes.count(200)} accepted of {len(codes)}"  # not 60 per gateway
        assert set(codes) == {200, 429}
        health = httpx.get(f"{gateways[0].url}/health", headers=ADMIN).json()
        assert health["status"] == "ok" and health["limits"] == {"backend": "redis", "shared": True, "up": True}
    finally:
        for gw in gateways:
            gw.stop()


def test_a_gateway_whose_redis_goes_away_says_so_and_comes_back(fake_engine, tmp_path):
    server = RedisServer(tmp_path / "r").start()
    gw = _gateway(fake_engine, server.url, rpm=1000)
    try:
        assert _chat(gw).status_code == 200
        server.stop()
        down = _chat(gw)
        assert down.status_code == 503 and down.headers["retry-after"] == "2"
        assert down.json()["error"]["code"] == "limits_unavailable"  # never per-process limits instead
        assert httpx.get(f"{gw.url}/health").json() == {"status": "degraded"}
        assert scrape(gw.url, "lorafleet_state_up", part="limits") == 0
        server.start()
        assert _chat(gw).status_code == 200  # recovered by itself
        assert httpx.get(f"{gw.url}/health").json() == {"status": "ok"}
    finally:
        gw.stop()
        server.stop()
