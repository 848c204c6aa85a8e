from __future__ import annotations

from datetime import datetime

import pytest

from serve.config import Limits, TenantConfig
from serve.gateway.limits import Decision, Limiter, Window
from serve.gateway.tenants import TenantStore, bearer_key, hash_key, key_matches

# -- keys and tenants


def test_hash_key_is_sha256_hex_with_prefix():
    # sha256("abc") is a published test vector
    assert hash_key("abc") == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize(
    "header,key",
    [
        ("Bearer sk-1", "sk-1"),
        ("bearer sk-1", "sk-1"),
        ("Bearer  sk-1 ", "sk-1"),
        ("Basic sk-1", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_key(header, key):
    assert bearer_key(header) == key


@pytest.fixture
def store() -> TenantStore:
    return TenantStore(
        [
            TenantConfig(name="acme", api_key_hashes=[hash_key("a1"), hash_key("a2")], models=["m1"]),
            TenantConfig(name="globex", api_key_hashes=[hash_key("g1")], models=["*"]),
        ]
    )


@pytest.mark.parametrize(
    "key,tenant",
    [("a1", "acme"), ("a2", "acme"), ("g1", "globex"), ("A1", None), ("a1 ", None), ("", None), (None, None)],
)
def test_authenticate(store, key, tenant):
    found = store.authenticate(key)
    assert (found.name if found else None) == tenant


def test_key_matches_only_its_hash():
    assert key_matches("a1", hash_key("a1")) and not key_matches("a1", hash_key("a2"))


def test_allow_lists_grant_and_revoke(store):
    acme, globex = store.tenants["acme"], store.tenants["globex"]
    assert acme.may_use("m1") and not acme.may_use("m2") and globex.may_use("anything")
    store.grant("m2", ["acme"])
    assert acme.may_use("m2")
    store.revoke("m2")
    assert not acme.may_use("m2")


# -- limits


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_window_forgets_after_its_span():
    w, clock = Window(60), Clock()
    w.add(clock.t, 3)
    clock.t += 30
    w.add(clock.t, 2)
    assert w.used(clock.t) == 5
    clock.t += 30  # the first event is exactly 60 s old: out of the window
    assert w.used(clock.t) == 2


@pytest.mark.parametrize(
    "events,limit,wait",
    [
        ([(0, 1), (10, 1), (20, 1)], 3, 40.0),  # full: wait until the oldest leaves (t=60), now t=20
        ([(0, 1), (10, 1), (20, 1)], 2, 50.0),  # over by one: two must leave, the second at t=70
        ([(0, 5), (20, 1)], 3, 40.0),  # one big event holds the window
        ([(0, 1)], 5, 0.0),  # under the limit: no wait
    ],
)
def test_window_wait_until_below(events, limit, wait):
    w = Window(60)
    for t, amount in events:
        w.add(t, amount)
    assert w.wait_until_below(20, limit) == pytest.approx(wait)


def test_rpm_refuses_then_admits_when_the_oldest_request_leaves():
    clock = Clock()
    lim, limits = Limiter(clock), Limits(rpm=2)
    assert lim.admit("t", limits).ok
    clock.t += 10
    assert lim.admit("t", limits).ok
    d = lim.admit("t", limits)
    assert (d.ok, d.limit, d.retry_after) == (False, "rpm", pytest.approx(50.0))
    clock.t += 50
    assert lim.admit("t", limits).ok


def test_refused_requests_do_not_count_against_rpm():
    clock = Clock()
    lim, limits = Limiter(clock), Limits(rpm=1)
    lim.admit("t", limits)
    for _ in range(5):
        assert not lim.admit("t", limits).ok
    clock.t += 60
    assert lim.admit("t", limits).ok


def test_tpm_counts_tokens_charged_at_release():
    clock = Clock()
    lim, limits = Limiter(clock), Limits(tpm=100)
    assert lim.admit("t", limits).ok
    lim.release("t", tokens=60)
    assert lim.admit("t", limits).ok  # 60 < 100: still admitted
    lim.release("t", tokens=60)
    clock.t += 5
    d = lim.admit("t", limits)
    assert (d.ok, d.limit, d.retry_after) == (False, "tpm", pytest.approx(55.0))
    clock.t += 55
    assert lim.admit("t", limits).ok


def test_concurrency_slot_is_given_back_on_release():
    lim, limits = Limiter(Clock()), Limits(concurrency=2)
    assert lim.admit("t", limits).ok and lim.admit("t", limits).ok
    d = lim.admit("t", limits)
    assert (d.ok, d.limit) == (False, "concurrency")
    lim.release("t")
    assert lim.admit("t", limits).ok and lim.inflight("t") == 2


def test_tenants_are_limited_separately_and_unset_limits_are_unlimited():
    lim = Limiter(Clock())
    assert lim.admit("a", Limits(rpm=1)).ok
    assert not lim.admit("a", Limits(rpm=1)).ok
    assert lim.admit("b", Limits(rpm=1)).ok
    assert all(lim.admit("c", Limits()).ok for _ in range(1000))


def test_utilization_is_the_share_of_each_set_limit():
    lim, limits = Limiter(Clock()), Limits(rpm=4, tpm=1000)
    lim.admit("t", limits)
    lim.release("t", 250)
    assert lim.utilization("t", limits) == {"rpm": 0.25, "tpm": 0.25}
    assert lim.utilization("t", Limits(concurrency=3)) == {}


@pytest.mark.parametrize("seconds,header", [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.01, "2"), (49.5, "50")])
def test_retry_after_header_rounds_up_to_whole_seconds(seconds, header):
    assert Decision(False, "rpm", seconds).retry_after_header == header


# -- $ budgets (a fake wall clock walks across UTC midnights and month ends)


class Wall:
    def __init__(self, iso: str):
        self.t = datetime.fromisoformat(iso).timestamp()

    def __call__(self) -> float:
        return self.t

    def go(self, iso: str) -> None:
        self.t = datetime.fromisoformat(iso).timestamp()


def test_daily_budget_refuses_once_spent_and_resets_at_utc_midnight():
    wall = Wall("2026-12-01T22:00:00+00:00")
    lim, limits = Limiter(wall=wall), Limits(usd_per_day=1.0)
    for _ in range(3):
        assert lim.admit("t", limits).ok
        lim.release("t", 10, 0.4)  # 1.2 spent: the third request overshot by what it cost
    d = lim.admit("t", limits)
    assert (d.ok, d.limit, d.retry_after) == (False, "usd_per_day", 2 * 3600)
    assert "daily budget of $1 is spent ($1.200000)" in d.message and "2026-12-02T00:00:00Z" in d.message
    assert lim.budget_utilization("t", limits) == {"day": pytest.approx(1.2)}
    wall.go("2026-12-01T23:59:59+00:00")
    assert not lim.admit("t", limits).ok
    wall.go("2026-12-02T00:00:00+00:00")
    assert lim.admit("t", limits).ok and lim.spend("t")["usd_this_day"] == 0
    assert lim.spend("t")["usd_this_month"] == pytest.approx(1.2)  # the month goes on


@pytest.mark.parametrize(
    "now,reset",
    [("2026-12-31T10:00:00+00:00", "2027-01-01T00:00:00Z"), ("2026-02-28T23:00:00+00:00", "2026-03-01T00:00:00Z")],
)
def test_monthly_budget_resets_on_the_first_of_the_next_month(now, reset):
    wall = Wall(now)
    lim, limits = Limiter(wall=wall), Limits(usd_per_month=5.0)
    assert lim.admit("t", limits).ok
    lim.release("t", 0, 5.0)
    d = lim.admit("t", limits)
    assert (d.ok, d.limit) == (False, "usd_per_month") and reset in d.message
    wall.go(reset.replace("Z", "+00:00"))
    assert lim.admit("t", limits).ok


def test_budgets_are_per_tenant_and_unset_budgets_are_unlimited():
    lim = Limiter(wall=Wall("2026-12-01T12:00:00+00:00"))
    lim.admit("a", Limits(usd_per_day=0.5))
    lim.release("a", 0, 0.5)
    assert not lim.admit("a", Limits(usd_per_day=0.5)).ok
    assert lim.admit("b", Limits(usd_per_day=0.5)).ok and lim.admit("a", Limits()).ok
    assert lim.budget_utilization("a", Limits()) == {}
