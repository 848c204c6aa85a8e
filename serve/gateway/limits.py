"""Per-tenant limits: requests and tokens per minute (sliding windows), requests in flight, and $ budgets.

A sliding-window log counts exactly what happened in the last 60 s: no burst of 2x at a window edge as with
fixed windows. Tokens are only known when a request ends (the engine's `usage`), so tpm admits a request while
the tokens of the last minute are under the limit and charges its tokens when it finishes: a burst of
concurrent requests can overshoot tpm by what they use, never for longer than a minute.

Budgets are $ per UTC day and per UTC calendar month, checked before a request starts and charged when it ends:
a tenant over budget gets no new request until the period resets, and the overshoot is at most the cost of the
requests already running when the budget was reached.

This limiter keeps its state in this process: right for one gateway. Several replicas share one count through
Redis instead (`gateway.redis_url`, shared_limits.RedisLimiter, the same rules).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from serve.config import Limits

WINDOW_S = 60.0


class Window:
    """Amounts recorded over the last `span` seconds."""

    def __init__(self, span: float = WINDOW_S):
        self.span = span
        self.events: deque[tuple[float, int]] = deque()
        self.total = 0

    def _expire(self, now: float) -> None:
        while self.events and self.events[0][0] <= now - self.span:
            self.total -= self.events.popleft()[1]

    def used(self, now: float) -> int:
        self._expire(now)
        return self.total

    def add(self, now: float, amount: int = 1) -> None:
        if amount > 0:
            self.events.append((now, amount))
            self.total += amount

    def wait_until_below(self, now: float, limit: int) -> float:
        """Seconds until the total drops below `limit` (0 if it already is)."""
        self._expire(now)
        total, wait = self.total, 0.0
        for t, amount in self.events:  # oldest first: each leaves the window at t + span
            if total < limit:
                break
            total -= amount
            wait = t + self.span - now
        return max(wait, 0.0)


PERIODS = {"day": "usd_per_day", "month": "usd_per_month"}  # budget period -> its field in Limits
ADJECTIVE = {"day": "daily", "month": "monthly"}


def period_of(period: str, when: datetime) -> str:
    """The UTC day or month `when` falls in, as a key: '2026-12-01' or '2026-12'."""
    return when.strftime("%Y-%m-%d" if period == "day" else "%Y-%m")


def next_reset(period: str, when: datetime) -> datetime:
    """When the budget period holding `when` ends: the next UTC midnight, or the 1st of the next month."""
    day = when.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day + timedelta(days=1)
    month = day.replace(day=1)
    return month.replace(year=month.year + 1, month=1) if month.month == 12 else month.replace(month=month.month + 1)


@dataclass
class Decision:
    ok: bool
    limit: str | None = None  # rpm | tpm | concurrency | usd_per_day | usd_per_month when refused
    retry_after: float = 0.0
    message: str = ""
    lease: str | None = None  # the admitted request's concurrency slot (shared limits), handed back on release

    @property
    def retry_after_header(self) -> str:
        # Retry-After takes whole seconds; rounding down would invite a retry that is refused again.
        return str(max(1, math.ceil(self.retry_after)))


def budget_spent(period: str, budget: float, spent: float, when: datetime) -> Decision:
    reset = next_reset(period, when)
    message = (f"the {ADJECTIVE[period]} budget of ${budget:g} is spent (${spent:.6f}); it resets at "
               f"{reset:%Y-%m-%dT%H:%M:%SZ}")  # fmt: skip
    return Decision(False, PERIODS[period], (reset - when).total_seconds(), message)


class Reports:
    """What /metrics and /admin/tenants show, from a limiter's `usage` and `spend`."""

    def usage(self, tenant: str) -> dict[str, int]:
        raise NotImplementedError

    def spend(self, tenant: str) -> dict[str, float]:
        raise NotImplementedError

    def utilization(self, tenant: str, limits: Limits) -> dict[str, float]:
        """Share (0..1) of each per-minute limit used over the last minute; only limits that are set."""
        used = self.usage(tenant)
        out = {}
        if limits.rpm:
            out["rpm"] = min(1.0, used["rpm_used"] / limits.rpm)
        if limits.tpm:
            out["tpm"] = min(1.0, used["tpm_used"] / limits.tpm)
        return out

    def budget_utilization(self, tenant: str, limits: Limits) -> dict[str, float]:
        """Share of each set budget spent in its current period; above 1 by the overshoot."""
        spent = self.spend(tenant)
        return {
            period: spent[f"usd_this_{period}"] / getattr(limits, name)
            for period, name in PERIODS.items()
            if getattr(limits, name)
        }


@dataclass
class _State:
    requests: Window = field(default_factory=Window)
    tokens: Window = field(default_factory=Window)
    inflight: int = 0
    spent: dict[str, tuple[str, float]] = field(default_factory=dict)  # period -> (its key, $ spent in it)


class Limiter(Reports):
    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        """`clock` times the per-minute windows; `wall` (epoch seconds) places spend in UTC days and months."""
        self.clock, self.wall = clock, wall
        self.states: dict[str, _State] = {}

    def _state(self, tenant: str) -> _State:
        state = self.states.get(tenant)
        if state is None:
            state = self.states[tenant] = _State()
        return state

    def admit(self, tenant: str, limits: Limits) -> Decision:
        """Check every limit; if all pass, count the request and take a concurrency slot (give it back with
        `release`)."""
        now, s = self.clock(), self._state(tenant)
        if limits.concurrency is not None and s.inflight >= limits.concurrency:
            # A slot frees when a running request ends: usually soon, so ask for the shortest retry.
            return Decision(False, "concurrency", 1.0)
        if limits.rpm is not None and s.requests.used(now) >= limits.rpm:
            return Decision(False, "rpm", s.requests.wait_until_below(now, limits.rpm))
        if limits.tpm is not None and s.tokens.used(now) >= limits.tpm:
            return Decision(False, "tpm", s.tokens.wait_until_below(now, limits.tpm))
        over = self._over_budget(s, limits)
        if over is not None:
            return over
        s.requests.add(now)
        s.inflight += 1
        return Decision(True)

    def _over_budget(self, s: _State, limits: Limits) -> Decision | None:
        if limits.usd_per_day is None and limits.usd_per_month is None:
            return None  # the common case, on every request: no clock, no dates
        when = datetime.fromtimestamp(self.wall(), UTC)
        for period, name in PERIODS.items():
            budget = getattr(limits, name)
            spent = self._spent(s, period, when)
            if budget is not None and spent >= budget:
                return budget_spent(period, budget, spent, when)
        return None

    @staticmethod
    def _spent(s: _State, period: str, when: datetime) -> float:
        key, usd = s.spent.get(period, ("", 0.0))
        return usd if key == period_of(period, when) else 0.0

    async def acquire(self, tenant: str, limits: Limits) -> Decision:
        """`admit`, as the proxy calls every limiter (the shared one asks Redis)."""
        return self.admit(tenant, limits)

    def release(self, tenant: str, tokens: int = 0, cost_usd: float = 0.0, lease: str | None = None) -> None:
        """End a request: give its concurrency slot back and charge its tokens and cost."""
        s = self._state(tenant)
        s.inflight = max(0, s.inflight - 1)
        s.tokens.add(self.clock(), tokens)
        if cost_usd:
            when = datetime.fromtimestamp(self.wall(), UTC)
            for period in PERIODS:
                s.spent[period] = (period_of(period, when), self._spent(s, period, when) + cost_usd)

    async def charge_once(self, key: str, tenant: str, cost_usd: float) -> bool:
        """Add a cost that came from elsewhere (a fine-tuning job in the ledger) to the tenant's budgets; True:
        this limiter is the one that charged it (here, always: it is this gateway's own)."""
        if cost_usd:
            s, when = self._state(tenant), datetime.fromtimestamp(self.wall(), UTC)
            for period in PERIODS:
                s.spent[period] = (period_of(period, when), self._spent(s, period, when) + cost_usd)
        return True

    def spend(self, tenant: str) -> dict[str, float]:
        """$ spent in the current UTC day and month."""
        s, when = self._state(tenant), datetime.fromtimestamp(self.wall(), UTC)
        return {f"usd_this_{period}": round(self._spent(s, period, when), 9) for period in PERIODS}

    def inflight(self, tenant: str) -> int:
        return self._state(tenant).inflight

    def usage(self, tenant: str) -> dict[str, int]:
        now, s = self.clock(), self._state(tenant)
        return {"rpm_used": s.requests.used(now), "tpm_used": s.tokens.used(now), "inflight": s.inflight}

    async def start(self) -> None:
        pass

    async def refresh(self, tenants: list[str]) -> None:
        pass

    async def close(self) -> None:
        pass

    def health(self) -> dict:
        return {"backend": "local", "shared": False,
                "note": "limits are counted in this gateway process only; set gateway.redis_url to share them"}  # fmt: skip
