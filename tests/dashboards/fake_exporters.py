"""FAKE exporters for tests: the gateway's, two vLLM engines' and the harness's metrics, with made-up traffic.

Nothing here talks to a model. It serves every metric of the lorafleet metric contract (same names, labels and
kinds as serve/, loadtest/ and vLLM export them) so that a real Prometheus can scrape it and every dashboard query
and recording rule can be checked without starting vLLM. Traffic is deterministic where a test checks a figure:
billed price per token is fixed per model, and TTFT cycles through values of which exactly 80% are under 1 s.

Run it by hand to look at the dashboards' queries or to render the README pictures:
    .venv/bin/python -m tests.dashboards.fake_exporters --seconds 600 --render docs/img/
"""

from __future__ import annotations

import argparse
import math
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)

# tenant -> models it calls (adapters are served under their own model name by the gateway)
TENANTS = {"acme": ["acme-support"], "globex": ["globex-sql", "smollm2-135m-instruct"], "initech": ["gemma-3-270m"]}
# billed $ per 1M tokens (prompt + completion alike), what lorafleet:cost_usd_per_1m_tokens:by_model must recover
PRICE_PER_1M = {"acme-support": 0.20, "globex-sql": 0.25, "smollm2-135m-instruct": 0.10, "gemma-3-270m": 0.40}
# upstream -> (base model it serves, models routed to it, instance $/hour)
UPSTREAMS = {
    "smollm2": ("smollm2-135m-instruct", ["smollm2-135m-instruct", "acme-support", "globex-sql"], 1.20),
    "gemma": ("gemma-3-270m", ["gemma-3-270m"], 0.80),
}
TTFT_CYCLE = (0.2, 0.4, 0.6, 0.8, 1.5)  # 4 of 5 under the 1 s SLO bucket: attainment 0.8
SLO_ATTAINMENT = 0.8


# A scrape between two observations of one tick would see half a TTFT cycle or tokens without their cost, and a
# rate over that sample is off by a hair; ticks and scrapes take turns instead.
TICK_LOCK = threading.Lock()


class TickRegistry(CollectorRegistry):
    """A registry whose scrapes wait for the tick in progress."""

    def collect(self):
        with TICK_LOCK:
            return iter(list(super().collect()))


def _engine_of(model: str) -> str:
    return next(up for up, (_, models, _) in UPSTREAMS.items() if model in models)


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = TickRegistry()
        tm = ["tenant", "model"]
        self.requests = Counter("lorafleet_requests", "requests", [*tm, "code"], registry=r)
        self.tokens = Counter("lorafleet_tokens", "tokens", [*tm, "kind"], registry=r)
        self.cost = Counter("lorafleet_cost_usd", "billed USD", tm, registry=r)
        self.ttft = Histogram("lorafleet_ttft_seconds", "ttft", tm, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lorafleet_itl_seconds", "itl", tm, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("lorafleet_request_seconds", "e2e", tm, buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_loads = Counter("lorafleet_adapter_loads", "loads", ["adapter", "result"], registry=r)
        self.alias_requests = Counter("lorafleet_alias_requests", "by version", ["alias", "version"], registry=r)
        self.adapter_load_s = Histogram("lorafleet_adapter_load_seconds", "load s", ["adapter"], registry=r)
        self.ratelimited = Counter("lorafleet_ratelimited", "429s", ["tenant", "limit"], registry=r)
        self.upstream_up = Gauge("lorafleet_upstream_up", "up", ["upstream"], registry=r)
        self.inflight = Gauge("lorafleet_inflight_requests", "inflight", ["tenant"], registry=r)
        self.quota = Gauge("lorafleet_quota_utilization", "quota", ["tenant", "limit"], registry=r)
        self.budget = Gauge("lorafleet_budget_utilization", "budget", ["tenant", "period"], registry=r)
        self.price = Gauge("lorafleet_price_usd_per_hour", "price", ["upstream", "model"], registry=r)
        self.state_up = Gauge("lorafleet_state_up", "state up", ["part"], registry=r)
        self.state_up.labels("store").set(1)
        for upstream, (_, models, usd_per_hour) in UPSTREAMS.items():
            self.upstream_up.labels(upstream).set(1)
            for model in models:
                self.price.labels(upstream, model).set(usd_per_hour)
        for adapter, seconds in (("acme-support", 0.8), ("globex-sql", 1.1)):
            self.adapter_loads.labels(adapter, "ok").inc()
            self.adapter_load_s.labels(adapter).observe(seconds)
        self.adapter_loads.labels("broken-adapter", "error").inc()

    def request(self, tenant: str, model: str, step: int, prompt: int, completion: int) -> None:
        code = "200"
        if step % 50 == 7:
            code = "500"
        elif tenant == "globex" and step % 10 == 3:
            code = "429"
            self.ratelimited.labels(tenant, "tpm").inc()
        self.requests.labels(tenant, model, code).inc()
        if code != "200":
            return
        self.tokens.labels(tenant, model, "prompt").inc(prompt)
        self.tokens.labels(tenant, model, "completion").inc(completion)
        self.cost.labels(tenant, model).inc((prompt + completion) * PRICE_PER_1M[model] / 1e6)
        # A whole cycle per request keeps the SLO share exact in any window; scaling by 0.8-1.2 with the load
        # moves the quantiles but keeps every value on its side of 1 s.
        scale = 0.8 + 0.4 * (completion - 40) / 40
        for ttft in TTFT_CYCLE:
            self.ttft.labels(tenant, model).observe(ttft * scale)
        self.itl.labels(tenant, model).observe((0.015 + 0.01 * (step % 4)) * scale)
        self.e2e.labels(tenant, model).observe(0.5 + completion * 0.03 * scale)


class EngineMetrics:
    """One vLLM engine's series, named and labelled as vllm/v1/metrics/loggers.py does."""

    def __init__(self, model_name: str) -> None:
        r = self.registry = TickRegistry()
        lab = ["model_name", "engine"]
        self.labels = (model_name, "0")
        self.running = Gauge("vllm:num_requests_running", "running", lab, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "waiting", lab, registry=r)
        self.kv = Gauge("vllm:kv_cache_usage_perc", "kv", lab, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "prompt", lab, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "gen", lab, registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "ttft", lab, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "itl", lab, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "e2e", lab, buckets=LATENCY_BUCKETS, registry=r)
        self.success = Counter("vllm:request_success", "ok", [*lab, "finished_reason"], registry=r)
        lora = ["max_lora", "waiting_lora_adapters", "running_lora_adapters"]
        self.lora_info = Gauge("vllm:lora_requests_info", "lora", lora, registry=r)

    def step(self, load: float, prompt: int, completion: int, adapters: list[str]) -> None:
        self.running.labels(*self.labels).set(round(8 * load))
        self.waiting.labels(*self.labels).set(max(0, round(12 * load) - 8))
        self.kv.labels(*self.labels).set(min(0.98, 0.15 + 0.7 * load))
        self.prompt_tokens.labels(*self.labels).inc(prompt)
        self.generation_tokens.labels(*self.labels).inc(completion)
        self.ttft.labels(*self.labels).observe(0.1 + 0.8 * load)
        self.itl.labels(*self.labels).observe(0.015 + 0.03 * load)
        self.e2e.labels(*self.labels).observe(0.8 + 2.0 * load)
        self.success.labels(*self.labels, "length").inc()
        self.success.labels(*self.labels, "stop").inc(2)
        # vLLM sets this info gauge to the wall clock, one series per adapter set.
        self.lora_info.labels("4", "", ",".join(adapters)).set(time.time())


class BenchMetrics:
    def __init__(self) -> None:
        r = self.registry = TickRegistry()
        tm = ["target", "model"]
        self.requests = Counter("lorafleet_bench_requests", "requests", [*tm, "status"], registry=r)
        self.ttft = Histogram("lorafleet_bench_ttft_seconds", "ttft", tm, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lorafleet_bench_itl_seconds", "itl", tm, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("lorafleet_bench_e2e_seconds", "e2e", tm, buckets=LATENCY_BUCKETS, registry=r)
        self.output_tokens = Counter("lorafleet_bench_output_tokens", "out", tm, registry=r)
        self.prompt_tokens = Counter("lorafleet_bench_prompt_tokens", "in", tm, registry=r)
        self.inflight = Gauge("lorafleet_bench_inflight", "inflight", ["target"], registry=r)
        self.target_rate = Gauge("lorafleet_bench_target_rate", "offered req/s", ["target"], registry=r)
        self.queue_delay = Histogram("lorafleet_bench_queue_delay_seconds", "queue", ["target"], registry=r)

    def step(self, target: str, model: str, load: float, step: int, tick_seconds: float, slow: float) -> None:
        """`slow`: latency factor of this target (a larger model answers later)."""
        n = 1 + round(2 * load)  # requests finished this tick; the offered rate matches them
        self.target_rate.labels(target).set(n / tick_seconds)
        self.inflight.labels(target).set(round(16 * load * slow))
        self.requests.labels(target, model, "ok").inc(n)
        if step % 20 == 0:
            self.requests.labels(target, model, "error").inc()
        for _ in range(n):
            self.ttft.labels(target, model).observe((0.15 + 1.2 * load) * slow)
            self.itl.labels(target, model).observe((0.02 + 0.04 * load) * slow)
            self.e2e.labels(target, model).observe((1.0 + 3.0 * load) * slow)
            self.queue_delay.labels(target).observe(max(0.0, load - 0.7) * slow)
        self.output_tokens.labels(target, model).inc(64 * n)
        self.prompt_tokens.labels(target, model).inc(120 * n)


@dataclass
class _Server:
    httpd: object
    url: str


class FakeFleet:
    """Starts the fake exporters on free ports and feeds them traffic from a background thread."""

    def __init__(self, tick_seconds: float = 0.25, host: str = "127.0.0.1") -> None:
        self.tick_seconds, self.host = tick_seconds, host
        self.gateway = GatewayMetrics()
        self.engines = {up: EngineMetrics(base) for up, (base, _, _) in UPSTREAMS.items()}
        self.bench = BenchMetrics()
        self._servers: list[_Server] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fake-fleet")
        self.steps = 0

    def _serve(self, registry: CollectorRegistry) -> str:
        httpd, _ = start_http_server(0, addr=self.host, registry=registry)
        url = f"http://{self.host}:{httpd.server_port}/metrics"
        self._servers.append(_Server(httpd, url))
        return url

    def start(self) -> FakeFleet:
        self.gateway_url = self._serve(self.gateway.registry).removesuffix("/metrics")
        self.engine_metrics_urls = [self._serve(e.registry) for e in self.engines.values()]
        self.bench_metrics_url = self._serve(self.bench.registry)
        self.tick()  # series exist before the first scrape
        self._thread.start()
        return self

    def tick(self) -> None:
        """One step of made-up traffic; load swings slowly so the rendered panels show a shape."""
        with TICK_LOCK:
            self._tick()

    def _tick(self) -> None:
        step = self.steps
        load = 0.5 + 0.4 * math.sin(step / 40)
        for tenant, models in TENANTS.items():
            g = self.gateway
            g.inflight.labels(tenant).set(round(6 * load) + len(tenant) % 3)
            g.quota.labels(tenant, "rpm").set(round(min(1.0, 0.3 + 0.6 * load + 0.1 * (tenant == "globex")), 3))
            g.quota.labels(tenant, "tpm").set(round(0.5 * load, 3))
            g.budget.labels(tenant, "day").set(round(0.9 * load, 3))
            for model in models:
                g.request(tenant, model, step, prompt=100 + step % 30, completion=40 + round(40 * load))
        for i, (upstream, engine) in enumerate(self.engines.items()):
            adapters = [m for m in UPSTREAMS[upstream][1] if m != UPSTREAMS[upstream][0]]
            engine_load = 0.5 + 0.4 * math.sin(step / 40 + 1.5 * i)  # engines peak at different times
            engine.step(engine_load, prompt=300 - 100 * i, completion=round(150 * engine_load), adapters=adapters)
        for target, model, slow in (("gateway", "acme-support", 1.0), ("gemma-direct", "gemma-3-270m", 1.6)):
            self.bench.step(target, model, load, step, self.tick_seconds, slow)
        self.steps += 1

    def _run(self) -> None:
        while not self._stop.wait(self.tick_seconds):
            self.tick()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for s in self._servers:
            s.httpd.shutdown()
            s.httpd.server_close()

    def scrape_targets(self) -> dict[str, list[str]]:
        return {
            "lorafleet-gateway": [f"{self.gateway_url}/metrics"],
            "vllm": list(self.engine_metrics_urls),
            "lorafleet-bench": [self.bench_metrics_url],
        }

    def __enter__(self) -> FakeFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    from dashboards.localprom import LocalPrometheus, scrape_config
    from tests.conftest import free_port

    parser = argparse.ArgumentParser(description="Fake lorafleet exporters scraped by a local Prometheus.")
    parser.add_argument("--seconds", type=float, default=300, help="how long to run before rendering/exiting")
    parser.add_argument("--render", type=Path, help="render the dashboards' PNGs into this folder at the end")
    args = parser.parse_args(argv)
    with FakeFleet() as fleet, tempfile.TemporaryDirectory() as tmp:
        config = scrape_config(fleet.scrape_targets(), scrape_interval="2s", evaluation_interval="2s")
        with LocalPrometheus(config, Path(tmp), free_port()) as prom:
            print(f"Prometheus at {prom.url}; fake gateway at {fleet.gateway_url}; running {args.seconds:.0f} s")
            time.sleep(args.seconds)  # a demo that must accumulate history; nothing to poll
            if args.render:
                from dashboards.render import render_all

                # Leave out the first minute, where 1-minute rates are still ramping up.
                for path in render_all(prom.url, args.render, minutes=max(1.0, args.seconds / 60 - 1)):
                    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
