"""The tenants' limits in Redis, shared by every gateway replica: the same rules as `limits.Limiter`, one count.

Each check and each charge is one Lua script, so it runs atomically in Redis: two gateways admitting at once can
never both take the last request of a minute. The windows are sorted sets of events scored by Redis's own clock
(`TIME`), so replicas whose clocks drift still agree. A concurrency slot is a lease that expires after the longest
a request may run (`request_timeout_s`): a gateway that dies mid-request gives its slots back by itself. Spend is
kept in integer nano-dollars per UTC day and month, exact like the ledger.

Redis unreachable: requests get 503 with Retry-After (never per-process limits behind the operator's back) and
`/health` says so; redis-py reconnects on the next call, so the gateway recovers by itself when Redis returns.
The charges of requests that end while Redis is away are kept and sent when it is back.

Keys are `lf:{tenant}:...`: the braces put one tenant's keys in one Redis Cluster slot, as scripts need.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from serve.config import Limits
from serve.gateway.limits import PERIODS, WINDOW_S, Decision, Reports, budget_spent, next_reset, period_of
from serve.gateway.protocol import ApiError

log = logging.getLogger("lorafleet.serve")
NANO = 10**9

# Drop what left the window (and expired leases); KEYS: requests, tokens, token total, leases.
_EXPIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - window)
if #old > 0 then
  local gone = 0
  for _, m in ipairs(old) do gone = gone + tonumber(string.match(m, ':(%d+)$')) end
  redis.call('DECRBY', KEYS[3], gone)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local requests = redis.call('ZCARD', KEYS[1])
local tokens = tonumber(redis.call('GET', KEYS[3]) or '0')
local inflight = redis.call('ZCARD', KEYS[4])
local day = tonumber(redis.call('GET', KEYS[5]) or '0')
local month = tonumber(redis.call('GET', KEYS[6]) or '0')
"""

# KEYS: + day spend, month spend; ARGV: window ms, rpm, tpm, concurrency, day nano, month nano (0 = none),
# lease id, lease ms. Returns {ok, limit, retry ms, requests, tokens, inflight, day, month}.
ADMIT = (
    _EXPIRE
    + """
local rpm, tpm, conc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local bday, bmonth = tonumber(ARGV[5]), tonumber(ARGV[6])
local function no(limit, wait) return {0, limit, math.max(0, wait), requests, tokens, inflight, day, month} end
if conc > 0 and inflight >= conc then return no('concurrency', 1000) end
if rpm > 0 and requests >= rpm then
  local e = redis.call('ZRANGE', KEYS[1], requests - rpm, requests - rpm, 'WITHSCORES')
  return no('rpm', tonumber(e[2]) + window - now)
end
if tpm > 0 and tokens >= tpm then
  local ev, left, wait = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES'), tokens, 0
  for i = 1, #ev, 2 do  -- oldest first, as limits.Window.wait_until_below
    left = left - tonumber(string.match(ev[i], ':(%d+)$'))
    if left < tpm then wait = tonumber(ev[i + 1]) + window - now; break end
  end
  return no('tpm', wait)
end
if bday > 0 and day >= bday then return no('usd_per_day', 0) end
if bmonth > 0 and month >= bmonth then return no('usd_per_month', 0) end
redis.call('ZADD', KEYS[1], now, ARGV[7])
redis.call('PEXPIRE', KEYS[1], window * 2)
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[8]), ARGV[7])
redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[8]) * 2)
return {1, '', 0, requests + 1, tokens, inflight + 1, day, month}
"""
)

# KEYS as ADMIT; ARGV: window ms, lease id, tokens, nano-$, day ttl s, month ttl s.
RELEASE = (
    _EXPIRE
    + """
redis.call('ZREM', KEYS[4], ARGV[2])
local tokens_used = tonumber(ARGV[3])
if tokens_used > 0 then
  redis.call('ZADD', KEYS[2], now, ARGV[2] .. ':' .. tokens_used)
  redis.call('INCRBY', KEYS[3], tokens_used)
  redis.call('PEXPIRE', KEYS[2], window * 2)
  redis.call('PEXPIRE', KEYS[3], window * 2)
end
local nano = tonumber(ARGV[4])
if nano > 0 then
  redis.call('INCRBY', KEYS[5], nano)
  redis.call('EXPIRE', KEYS[5], tonumber(ARGV[5]))
  redis.call('INCRBY', KEYS[6], nano)
  redis.call('EXPIRE', KEYS[6], tonumber(ARGV[6]))
end
return 1
"""
)

PEEK = _EXPIRE + "\nreturn {1, '', 0, requests, tokens, inflight, day, month}\n"


class RedisLimiter(Reports):
    """Drop-in for `limits.Limiter` when `gateway.redis_url` is set; reports come from the last answer Redis gave
    (each admission, plus a refresh every `store_poll_s`)."""

    def __init__(self, url: str, lease_s: float, timeout_s: float = 1.0, wall=None):
        self.url, self.lease_ms = url, int(lease_s * 1000)
        # Fail fast: a request must not hang on a Redis that is gone; redis-py reconnects on the next call.
        self.redis = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                       retry=Retry(NoBackoff(), 0), decode_responses=True)  # fmt: skip
        self._admit, self._release = self.redis.register_script(ADMIT), self.redis.register_script(RELEASE)
        self._peek = self.redis.register_script(PEEK)
        self.wall = wall or (lambda: datetime.now(UTC).timestamp())
        self.up: bool | None = None
        self.error = ""
        self.seen: dict[str, list[int]] = {}  # tenant -> [requests, tokens, inflight, day nano, month nano]
        self.pending: list[tuple] = []  # charges Redis did not take yet (it was away)
        self._tasks: set[asyncio.Task] = set()

    def _keys(self, tenant: str, when: datetime) -> list[str]:
        p = f"lf:{{{tenant}}}:"
        return [p + "rq", p + "tk", p + "tkt", p + "cc", p + "usd:" + period_of("day", when),
                p + "usd:" + period_of("month", when)]  # fmt: skip

    def _mark(self, up: bool, error: Exception | None = None) -> None:
        if up != self.up:
            (log.info if up else log.error)("redis %s: %s", "reachable" if up else "unreachable", error or self.url)
        self.up, self.error = up, "" if up else f"{type(error).__name__}: {error}"

    def unavailable(self) -> ApiError:
        return ApiError(503, "the shared limit store (Redis) is unreachable, so no request can be checked against "
                        "the tenant's limits; retry shortly", "server_error", code="limits_unavailable",
                        headers={"Retry-After": "2"})  # fmt: skip

    async def acquire(self, tenant: str, limits: Limits) -> Decision:
        when = datetime.fromtimestamp(self.wall(), UTC)
        lease = uuid.uuid4().hex
        budgets = [round((getattr(limits, PERIODS[p]) or 0) * NANO) for p in PERIODS]
        args = [int(WINDOW_S * 1000), limits.rpm or 0, limits.tpm or 0, limits.concurrency or 0, *budgets, lease,
                self.lease_ms]  # fmt: skip
        try:
            ok, limit, wait_ms, *seen = await self._admit(keys=self._keys(tenant, when), args=args)
        except RedisError as e:
            self._mark(False, e)
            raise self.unavailable() from None
        self._mark(True)
        self.seen[tenant] = [int(x) for x in seen]
        if ok:
            return Decision(True, lease=lease)
        if limit.startswith("usd_"):
            return self._over_budget(tenant, limit, limits, when)
        return Decision(False, limit, int(wait_ms) / 1000)

    def _over_budget(self, tenant: str, limit: str, limits: Limits, when: datetime) -> Decision:
        period = next(p for p, name in PERIODS.items() if name == limit)
        return budget_spent(period, getattr(limits, limit), self.spend(tenant)[f"usd_this_{period}"], when)

    def release(self, tenant: str, tokens: int = 0, cost_usd: float = 0.0, lease: str | None = None) -> None:
        """End a request (called on the event loop): the charge is sent to Redis in the background."""
        charge = (tenant, lease or "", int(tokens), round(cost_usd * NANO), self.wall())
        task = asyncio.get_running_loop().create_task(self._charge(charge))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def charge_once(self, key: str, tenant: str, cost_usd: float) -> bool:
        """Add a cost from the ledger (a fine-tuning job) to the shared budgets once, whichever gateway reads it
        first: the key is claimed in Redis before the charge. True for that gateway. Raises while Redis is away."""
        if not await self.redis.set(f"lorafleet:charged:{key}", 1, nx=True, ex=40 * 86400):
            return False
        if cost_usd:
            await self._charge((tenant, "", 0, round(cost_usd * NANO), self.wall()))
        return True

    async def _charge(self, charge: tuple) -> None:
        tenant, lease, tokens, nano, at = charge
        when = datetime.fromtimestamp(at, UTC)
        ttl = {p: int((next_reset(p, when) - when).total_seconds()) + 3600 for p in PERIODS}
        try:
            await self._release(keys=self._keys(tenant, when), args=[int(WINDOW_S * 1000), lease, tokens, nano,
                                                                     ttl["day"], ttl["month"]])  # fmt: skip
        except RedisError as e:
            self._mark(False, e)
            self.pending.append(charge)  # sent again by `refresh` once Redis answers
            return
        self._mark(True)

    async def refresh(self, tenants: list[str]) -> None:
        """Read every tenant's counts (for /metrics and /admin/tenants) and send the charges Redis missed."""
        pending, self.pending = self.pending, []
        for charge in pending:
            await self._charge(charge)
        when = datetime.fromtimestamp(self.wall(), UTC)
        try:
            for t in tenants:
                *_, r, tk, inf, d, m = await self._peek(keys=self._keys(t, when), args=[int(WINDOW_S * 1000)])
                self.seen[t] = [int(r), int(tk), int(inf), int(d), int(m)]
        except RedisError as e:
            self._mark(False, e)
            return
        self._mark(True)

    async def start(self) -> None:
        try:
            await self.redis.ping()
            self._mark(True)
        except RedisError as e:  # the gateway still starts; requests get 503 until Redis answers
            self._mark(False, e)

    async def close(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.redis.aclose()

    def health(self) -> dict:
        out = {"backend": "redis", "shared": True, "up": bool(self.up)}
        return out | ({"error": self.error} if not self.up and self.error else {})

    # -- reports, from the last counts Redis gave

    def _seen(self, tenant: str) -> list[int]:
        return self.seen.get(tenant, [0, 0, 0, 0, 0])

    def inflight(self, tenant: str) -> int:
        return self._seen(tenant)[2]

    def usage(self, tenant: str) -> dict[str, int]:
        r, tk, inf, _, _ = self._seen(tenant)
        return {"rpm_used": r, "tpm_used": tk, "inflight": inf}

    def spend(self, tenant: str) -> dict[str, float]:
        _, _, _, day, month = self._seen(tenant)
        return {"usd_this_day": round(day / NANO, 9), "usd_this_month": round(month / NANO, 9)}
