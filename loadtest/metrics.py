"""The harness's client-side Prometheus series (`lorafleet_bench_*`), served while a run is going.

vLLM labels its own series by base model only, so per-adapter latency as a client sees it comes from here.
Label values come from the config (target names, model names), never from responses: cardinality stays bounded.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from loadtest.client import RequestRecord

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 20, 40, 80)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 300)
QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class BenchMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        # A private registry: several runs in one process (tests) must not collide on names.
        self.registry = registry or CollectorRegistry()
        r = self.registry
        tm = ["target", "model"]
        self.requests = Counter(
            "lorafleet_bench_requests_total", "Requests finished, by status", [*tm, "status"], registry=r
        )
        self.ttft = Histogram(
            "lorafleet_bench_ttft_seconds", "Time to first token", tm, buckets=TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram("lorafleet_bench_itl_seconds", "Inter-token latency", tm, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("lorafleet_bench_e2e_seconds", "End-to-end latency", tm, buckets=E2E_BUCKETS, registry=r)
        self.output_tokens = Counter("lorafleet_bench_output_tokens", "Output tokens (from usage)", tm, registry=r)
        self.prompt_tokens = Counter("lorafleet_bench_prompt_tokens", "Prompt tokens (from usage)", tm, registry=r)
        self.inflight = Gauge("lorafleet_bench_inflight", "Requests in flight", ["target"], registry=r)
        self.queue_delay = Histogram(
            "lorafleet_bench_queue_delay_seconds",
            "Client-side delay between the scheduled and the actual send time",
            ["target"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.target_rate = Gauge(
            "lorafleet_bench_target_rate",
            "Offered load of the current step (req/s or concurrency)",
            ["target"],
            registry=r,
        )
        self._server = None

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        self._server, _ = start_http_server(port, addr=addr, registry=self.registry)

    @property
    def port(self) -> int | None:
        return self._server.server_port if self._server else None

    def close(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def observe(self, target: str, rec: RequestRecord) -> None:
        self.requests.labels(target, rec.model, rec.status).inc()
        self.queue_delay.labels(target).observe(rec.queue_delay)
        if not rec.ok:
            return
        if rec.ttft is not None:
            self.ttft.labels(target, rec.model).observe(rec.ttft)
        if rec.e2e is not None:
            self.e2e.labels(target, rec.model).observe(rec.e2e)
        itl = self.itl.labels(target, rec.model)
        for gap in rec.itl:
            itl.observe(gap)
        self.output_tokens.labels(target, rec.model).inc(rec.output_tokens)
        self.prompt_tokens.labels(target, rec.model).inc(rec.prompt_tokens)
