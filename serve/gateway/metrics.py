"""The gateway's Prometheus metrics. The names are a contract with dashboards/ and loadtest/: keep them exact.

Each gateway has its own CollectorRegistry, so several gateways (tests) can live in one process. Label values
come from the config (tenants, models, engines) or from small fixed sets; a request for a model or with a key
the gateway does not know is labelled "unknown", so clients cannot grow the series count.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from serve.gateway.limits import Limiter
    from serve.gateway.tenants import TenantStore

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2, 5)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


JOB_PARTS = re.compile(r":ftjob-[0-9a-f]+|:ckpt-step-\d+")


def model_label(name: str) -> str:
    """A model as its metrics name it: a fine-tuned model without its job id and checkpoint, so /metrics names no
    job and its label set does not grow with every job (tests/serve/test_attacks.py)."""
    return JOB_PARTS.sub("", name) if "ftjob-" in name else name


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        tm = ["tenant", "model"]
        self.requests = Counter("lorafleet_requests", "Requests by HTTP status", [*tm, "code"], registry=r)
        self.tokens = Counter("lorafleet_tokens", "Tokens from the engine's usage", [*tm, "kind"], registry=r)
        self.cost = Counter("lorafleet_cost_usd", "Cost at the configured price", tm, registry=r)
        self.ttft = Histogram(
            "lorafleet_ttft_seconds", "Time to first content", tm, buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "lorafleet_itl_seconds", "Gap between streamed chunks", tm, buckets=ITL_BUCKETS, registry=r
        )
        self.request_seconds = Histogram(
            "lorafleet_request_seconds", "Whole request at the gateway", tm, buckets=LATENCY_BUCKETS, registry=r
        )
        self.alias_requests = Counter(
            "lorafleet_alias_requests",
            "Requests to an alias, by the version it sent them to",
            ["alias", "version"],
            registry=r,
        )
        self.adapter_loads = Counter(
            "lorafleet_adapter_loads", "Adapter loads into an engine", ["adapter", "result"], registry=r
        )
        self.adapter_load_seconds = Histogram(
            "lorafleet_adapter_load_seconds", "Adapter load time", ["adapter"], buckets=LOAD_BUCKETS, registry=r
        )
        self.ratelimited = Counter(
            "lorafleet_ratelimited", "Requests refused by a limit", ["tenant", "limit"], registry=r
        )
        self.upstream_up = Gauge("lorafleet_upstream_up", "1 if the engine answers /health", ["upstream"], registry=r)
        self.inflight = Gauge("lorafleet_inflight_requests", "Requests in flight", ["tenant"], registry=r)
        self.quota = Gauge(
            "lorafleet_quota_utilization", "Share of a per-minute limit used", ["tenant", "limit"], registry=r
        )
        self.budget = Gauge(
            "lorafleet_budget_utilization",
            "Share of a $ budget spent in its current UTC period (above 1 by the overshoot)",
            ["tenant", "period"],
            registry=r,
        )
        self.price = Gauge(
            "lorafleet_price_usd_per_hour", "What an engine costs to run", ["upstream", "model"], registry=r
        )
        self.state_up = Gauge(
            "lorafleet_state_up",
            "1 if the state this gateway depends on answered last time: part=store (its database), part=limits "
            "(the shared-limits Redis, only when configured)",
            ["part"],
            registry=r,
        )

    def refresh_state(self, store_up: bool, limits: dict) -> None:
        self.state_up.labels("store").set(1 if store_up else 0)
        if limits["shared"]:
            self.state_up.labels("limits").set(1 if limits["up"] else 0)

    def refresh_quota(self, tenants: TenantStore, limiter: Limiter) -> None:
        """Per-minute utilization decays with time, and budgets reset at midnight, not with requests: compute
        them when scraped."""
        for t in tenants.tenants.values():
            for limit, share in limiter.utilization(t.name, t.limits).items():
                self.quota.labels(t.name, limit).set(share)
            for period, share in limiter.budget_utilization(t.name, t.limits).items():
                self.budget.labels(t.name, period).set(share)

    def render(self) -> bytes:
        return generate_latest(self.registry)
