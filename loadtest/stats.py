"""Step summaries, the SLO check and the sweep's stop rule: pure functions over request records."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from loadtest.client import RequestRecord
from loadtest.config import Slo

PERCENTILES = (50, 90, 99)


def dist(values: Sequence[float]) -> dict[str, float | None]:
    """mean and p50/p90/p99 of a sample (None when empty)."""
    if len(values) == 0:
        return {"n": 0, "mean": None, **{f"p{p}": None for p in PERCENTILES}}
    a = np.asarray(values, dtype=float)
    out: dict[str, Any] = {"n": int(a.size), "mean": float(a.mean())}
    for p, v in zip(PERCENTILES, np.percentile(a, PERCENTILES), strict=True):
        out[f"p{p}"] = float(v)
    return out


def tokens_after(r: RequestRecord, since: float) -> int:
    """The output tokens of a request streamed at or after `since` (seconds from the step's start).

    Token times are the text chunks' arrival times (first chunk at TTFT, then the ITL gaps); the usage count is
    spread evenly over them, which is exact for a server that streams a token per chunk (vLLM does)."""
    if r.ttft is None or not r.output_tokens:
        return 0
    first = r.sent + r.ttft
    if first >= since:
        return r.output_tokens
    times = first + np.cumsum([0.0, *r.itl])
    return round(r.output_tokens * float(np.mean(times >= since)))


def summarize(records: Sequence[RequestRecord], duration_s: float, since: float = 0.0) -> dict[str, Any]:
    """Throughput and latency figures of a set of requests that ran over `duration_s` seconds.

    `since` > 0 (a ramp-up): the figures cover the window from `since` to the end; latencies and request counts
    are those of the requests sent in it, throughput counts every token streamed in it (the ramp's requests
    included), over the window's length."""
    out_tok = sum(tokens_after(r, since) for r in records if r.ok)  # the ramp's requests stream into the window too
    records = [r for r in records if r.scheduled >= since]
    ok = [r for r in records if r.ok]
    in_tok = sum(r.prompt_tokens for r in ok)
    dur = max(duration_s - since, 1e-9)
    with_ttft = [r for r in ok if r.ttft is not None]
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "error_rate": (len(records) - len(ok)) / len(records) if records else 0.0,
        "duration_s": duration_s - since,
        "ramp_up_s": since,
        "req_per_s": len(ok) / dur,
        "input_tokens": in_tok,
        "output_tokens": out_tok,
        "input_tok_per_s": in_tok / dur,
        "output_tok_per_s": out_tok / dur,
        "tokens_from_usage": all(r.tokens_from_usage for r in ok),
        "ttft": dist([r.ttft for r in with_ttft]),
        "itl": dist([g for r in ok for g in r.itl]),
        "tpot": dist([r.tpot for r in ok if r.tpot is not None]),
        "e2e": dist([r.e2e for r in ok if r.e2e is not None]),
        "queue_delay": dist([r.queue_delay for r in records]),
        # What a user arriving on schedule saw: an overloaded client must not hide latency.
        "ttft_incl_queue": dist([r.ttft + r.queue_delay for r in with_ttft]),
        "e2e_incl_queue": dist([r.e2e + r.queue_delay for r in ok if r.e2e is not None]),
        "error_kinds": _error_kinds(records),
    }


def _error_kinds(records: Sequence[RequestRecord]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for r in records:
        if not r.ok:
            kinds[r.status] = kinds.get(r.status, 0) + 1
    return kinds


def summarize_step(records: Sequence[RequestRecord], duration_s: float, since: float = 0.0) -> dict[str, Any]:
    """The whole step (from `since`: see summarize), plus the same figures per model (adapter) of the mix."""
    out = summarize(records, duration_s, since)
    models = sorted({r.model for r in records})
    out["per_model"] = {m: summarize([r for r in records if r.model == m], duration_s, since) for m in models}
    return out


def check_slo(summary: dict[str, Any], slo: Slo) -> dict[str, Any]:
    """Does a step meet the SLO? Latency limits use the client-queue-inclusive figures."""
    checks = {
        "ttft_p90_s": (slo.ttft_p90_s, summary["ttft_incl_queue"]["p90"]),
        "tpot_p90_s": (slo.tpot_p90_s, summary["tpot"]["p90"]),
        "e2e_p90_s": (slo.e2e_p90_s, summary["e2e_incl_queue"]["p90"]),
        "max_error_rate": (slo.max_error_rate, summary["error_rate"]),
    }
    result: dict[str, Any] = {}
    for name, (limit, value) in checks.items():
        if limit is None:
            continue
        ok = value is not None and value <= limit
        result[name] = {"limit": limit, "value": value, "ok": ok}
    if summary["ok"] == 0:
        result["completed"] = {"limit": 1, "value": 0, "ok": False}
    return {"met": all(c["ok"] for c in result.values()), "checks": result}


def stop_reason(steps: Sequence[dict[str, Any]], min_gain: float) -> str | None:
    """Why a sweep should stop after its latest step: 'slo_broken', 'saturated' or None (go on)."""
    last = steps[-1]
    if not last["slo"]["met"]:
        return "slo_broken"
    if len(steps) > 1:
        best = max(s["output_tok_per_s"] for s in steps[:-1])
        if last["output_tok_per_s"] < best * (1 + min_gain):
            return "saturated"
    return None
