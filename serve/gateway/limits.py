"""Per-tenant limits: requests and tokens per minute (sliding windows) and requests in flight.

A sliding-window log counts exactly what happened in the last 60 s: no burst of 2x at a window edge as with
fixed windows. Tokens are only known when a request ends (the engine's `usage`), so tpm admits a request while
the tokens of the last minute are under the limit and charges its tokens when it finishes: a burst of
concurrent requests can overshoot tpm by what they use, never for longer than a minute.

State lives in this process: several gateway replicas would need a shared store (Redis) to share limits.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

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


@dataclass
class Decision:
    ok: bool
    limit: str | None = None  # rpm | tpm | concurrency when refused
    retry_after: float = 0.0

    @property
    def retry_after_header(self) -> str:
        # Retry-After takes whole seconds; rounding down would invite a retry that is refused again.
        return str(max(1, math.ceil(self.retry_after)))


@dataclass
class _State:
    requests: Window = field(default_factory=Window)
    tokens: Window = field(default_factory=Window)
    inflight: int = 0


class Limiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
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
        s.requests.add(now)
        s.inflight += 1
        return Decision(True)

    def release(self, tenant: str, tokens: int = 0) -> None:
        s = self._state(tenant)
        s.inflight = max(0, s.inflight - 1)
        s.tokens.add(self.clock(), tokens)

    def inflight(self, tenant: str) -> int:
        return self._state(tenant).inflight

    def usage(self, tenant: str) -> dict[str, int]:
        now, s = self.clock(), self._state(tenant)
        return {"rpm_used": s.requests.used(now), "tpm_used": s.tokens.used(now), "inflight": s.inflight}

    def utilization(self, tenant: str, limits: Limits) -> dict[str, float]:
        """Share (0..1) of each per-minute limit used over the last minute; only limits that are set."""
        used = self.usage(tenant)
        out = {}
        if limits.rpm:
            out["rpm"] = min(1.0, used["rpm_used"] / limits.rpm)
        if limits.tpm:
            out["tpm"] = min(1.0, used["tpm_used"] / limits.tpm)
        return out
