"""The four lorafleet dashboards: tenant cost, latency, fleet, benchmark run.

Queries read the gateway's `lorafleet_*` metrics, vLLM's `vllm:*` metrics, the harness's `lorafleet_bench_*`
metrics and the recording rules in `prometheus/rules/recording.yml`. Counters that may have no series yet (errors,
rate-limit rejections, adapter load failures) are written `... or <same thing> * 0` or `or on() vector(0)` so a
healthy system shows 0 instead of "No data".
"""

from __future__ import annotations

from typing import Any

from dashboards.grafana import (
    bargauge,
    custom_variable,
    dashboard,
    datasource_variable,
    query_variable,
    row,
    stat,
    table,
    target,
    timeseries,
)

# Label matchers shared by the gateway panels; Grafana expands multi-value variables into a regex.
TM = 'tenant=~"$tenant",model=~"$model"'
T = 'tenant=~"$tenant"'
M = 'model=~"$model"'
MN = 'model_name=~"$model_name"'
TG = 'target=~"$target",model=~"$model"'
RI = "$__rate_interval"

# Latency SLO thresholds must be histogram bucket bounds; the gateway's buckets include these.
SLO_BUCKETS = ["0.25", "0.5", "1", "2", "5"]
DEFAULT_TTFT_SLO = "1"  # keep equal to the le matcher in prometheus/rules/recording.yml
QUANTILES = (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99"))


def _tenant_model_vars() -> list[dict[str, Any]]:
    return [
        datasource_variable(),
        query_variable("tenant", "Tenant", "lorafleet_requests_total"),
        query_variable("model", "Model", "lorafleet_requests_total"),
    ]


def quantile_targets(metric: str, selector: str, by: str, legend: str) -> list[dict[str, Any]]:
    """p50/p95/p99 of a classic histogram, one series per `by` label set."""
    return [
        target(
            f"histogram_quantile({q}, sum by(le, {by})(rate({metric}_bucket{{{selector}}}[{RI}])))",
            f"{name} {legend}",
        )
        for name, q in QUANTILES
    ]


def request_share(codes: str, fn: str, window: str, by: str = "") -> str:
    """Share of the gateway's requests whose status code matches `codes`, via rate() or increase() over `window`."""
    agg = f"sum by({by})" if by else "sum"
    part = f'{agg}({fn}(lorafleet_requests_total{{{TM},code=~"{codes}"}}[{window}]))'
    whole = f"{agg}({fn}(lorafleet_requests_total{{{TM}}}[{window}]))"
    # No matching code yet means no series at all: fall back to whole*0 so the share reads 0, not "No data".
    return f"({part} or {whole} * 0) / {whole}"


def cost_dashboard() -> dict[str, Any]:
    spend = f"lorafleet_cost_usd_total{{{TM}}}"
    tokens = f"lorafleet_tokens_total{{{TM}}}"
    panels = [
        row("Spend"),
        stat(
            "Tenant spend rate",
            [target(f"sum(rate({spend}[{RI}])) * 3600")],
            unit="currencyUSD",
            description="What the selected tenants are billed per hour at the current request rate.",
        ),
        stat(
            "Billed in the time range",
            [target(f"sum(increase({spend}[$__range]))", instant=True)],
            unit="currencyUSD",
            description="Sum of per-request costs the gateway metered over the dashboard's time range.",
        ),
        stat(
            "Tokens in the time range",
            [target(f"sum(increase({tokens}[$__range]))", instant=True)],
            unit="short",
            description="Prompt plus completion tokens served to the selected tenants.",
        ),
        stat(
            "Fleet instance cost",
            [target("lorafleet:instance_cost_usd_per_hour:fleet")],
            unit="currencyUSD",
            description="Configured hourly price of every engine instance, busy or idle ($/hour).",
        ),
        timeseries(
            "Spend rate per tenant ($/hour)",
            [target(f"sum by(tenant)(rate({spend}[{RI}])) * 3600", "{{tenant}}")],
            unit="currencyUSD",
        ),
        bargauge(
            "Top tenants by spend (time range)",
            [target(f"topk(10, sum by(tenant)(increase({spend}[$__range])))", "{{tenant}}", instant=True)],
            unit="currencyUSD",
        ),
        row("Unit cost"),
        timeseries(
            "Billed $ per 1M tokens, by model",
            [target(f"lorafleet:cost_usd_per_1m_tokens:by_model{{{M}}}", "{{model}}")],
            unit="currencyUSD",
            description="Spend rate / token rate x 1e6 over 5 minutes (recording rule), prompt and completion "
            "tokens together.",
        ),
        timeseries(
            "Fleet $ per 1M tokens: billed vs instance cost",
            [
                target("lorafleet:cost_usd_per_1m_tokens:fleet", "billed to tenants"),
                target("lorafleet:instance_cost_usd_per_1m_tokens:fleet", "instance cost at current load"),
            ],
            unit="currencyUSD",
            description="Instance cost = configured $/hour of all engines / tokens served per hour x 1e6. It falls "
            "as the fleet gets busier; billed above instance cost means the prices cover the hardware.",
        ),
        timeseries(
            "Spend per tenant, last 24 hours",
            [target(f"lorafleet:cost_usd_24h:by_tenant{{{T}}}", "{{tenant}}")],
            unit="currencyUSD",
            description="Rolling 24-hour spend (recording rule, evaluated every minute).",
        ),
        table(
            "Spend and tokens by tenant and model (time range)",
            [
                target(f"sum by(tenant, model)(increase({spend}[$__range]))", "spend", instant=True, table=True),
                target(f"sum by(tenant, model)(increase({tokens}[$__range]))", "tokens", instant=True, table=True),
            ],
            rename={"Value #A": "spend ($)", "Value #B": "tokens"},
        ),
        row("Usage"),
        timeseries(
            "Tokens per second by tenant and kind",
            [target(f"sum by(tenant, kind)(rate({tokens}[{RI}]))", "{{tenant}} {{kind}}")],
            unit="short",
        ),
        timeseries(
            "Requests per second by status code",
            [target(f"sum by(code)(rate(lorafleet_requests_total{{{TM}}}[{RI}]))", "{{code}}")],
            unit="reqps",
        ),
    ]
    return dashboard(
        "lorafleet-cost",
        "lorafleet / Tenant cost",
        "Who spends what: billed $/hour per tenant, $ per 1M tokens per model, fleet instance cost, top tenants.",
        panels,
        _tenant_model_vars(),
    )


def latency_dashboard() -> dict[str, Any]:
    slo_le = 'le=~"${ttft_slo}|${ttft_slo}.0"'  # client_golang writes le="1", prometheus_client le="1.0"
    ttft = "lorafleet_ttft_seconds"
    reqs = f"lorafleet_requests_total{{{TM}}}"
    attainment = (
        f"sum by(tenant, model)(rate({ttft}_bucket{{{TM},{slo_le}}}[{RI}]))"
        f" / sum by(tenant, model)(rate({ttft}_count{{{TM}}}[{RI}]))"
    )
    panels = [
        row("Service level"),
        stat(
            "TTFT SLO attainment (time range)",
            [
                target(
                    f"sum(increase({ttft}_bucket{{{TM},{slo_le}}}[$__range]))"
                    f" / sum(increase({ttft}_count{{{TM}}}[$__range]))",
                    instant=True,
                )
            ],
            unit="percentunit",
            thresholds=[(0.95, "green")],
            base_color="red",
            description="Share of requests whose first token came within the SLO (the `ttft_slo` variable).",
        ),
        stat(
            "Server errors (time range)",
            [target(request_share("5..", "increase", "$__range"), instant=True)],
            unit="percentunit",
            thresholds=[(0.01, "orange"), (0.05, "red")],
            description="Share of requests answered with a 5xx code.",
        ),
        stat(
            "Rate-limited (time range)",
            [target(request_share("429", "increase", "$__range"), instant=True)],
            unit="percentunit",
            thresholds=[(0.05, "orange")],
            description="Share of requests rejected with 429 by the tenant's rpm/tpm/concurrency limits.",
        ),
        stat(
            "Requests in the time range",
            [target(f"sum(increase({reqs}[$__range]))", instant=True)],
            unit="short",
        ),
        timeseries(
            "TTFT SLO attainment by tenant and model",
            [target(attainment, "{{tenant}} / {{model}}")],
            unit="percentunit",
            max_=1,
        ),
        timeseries(
            "Error rate by tenant (5xx share)",
            [target(request_share("5..", "rate", RI, by="tenant"), "{{tenant}}")],
            unit="percentunit",
        ),
        row("Latency by tenant and model"),
        timeseries(
            "Time to first token",
            quantile_targets(ttft, TM, "tenant, model", "{{tenant}} / {{model}}"),
            unit="s",
            w=8,
        ),
        timeseries(
            "Inter-token latency",
            quantile_targets("lorafleet_itl_seconds", TM, "tenant, model", "{{tenant}} / {{model}}"),
            unit="s",
            w=8,
        ),
        timeseries(
            "End-to-end request time",
            quantile_targets("lorafleet_request_seconds", TM, "tenant, model", "{{tenant}} / {{model}}"),
            unit="s",
            w=8,
        ),
    ]
    variables = _tenant_model_vars() + [
        custom_variable(
            "ttft_slo",
            "TTFT SLO (s)",
            SLO_BUCKETS,
            DEFAULT_TTFT_SLO,
            "Time-to-first-token objective; must be one of the gateway's histogram bucket bounds.",
        )
    ]
    return dashboard(
        "lorafleet-latency",
        "lorafleet / Latency",
        "Does each tenant get fast answers: TTFT, inter-token and end-to-end p50/p95/p99, SLO attainment, errors.",
        panels,
        variables,
    )


def fleet_dashboard() -> dict[str, Any]:
    up_mappings = [
        {"type": "value", "options": {"0": {"text": "DOWN", "color": "red"}, "1": {"text": "UP", "color": "green"}}}
    ]
    panels = [
        row("Gateway"),
        stat(
            "Upstream engines",
            [target("max by(upstream)(lorafleet_upstream_up)", "{{upstream}}")],
            description="The gateway's own health check of each engine it routes to.",
            w=8,
            mappings=up_mappings,
            color_mode="background",
            thresholds=[(1, "green")],
            base_color="red",
        ),
        stat(
            "Scrape targets",
            [target('up{job=~"lorafleet-gateway|vllm"}', "{{job}} {{instance}}")],
            description="Whether Prometheus can reach the gateway and each engine's /metrics.",
            w=8,
            mappings=up_mappings,
            color_mode="background",
            thresholds=[(1, "green")],
            base_color="red",
        ),
        stat(
            "Fleet instance cost",
            [target("lorafleet:instance_cost_usd_per_hour:fleet")],
            unit="currencyUSD",
            description="Configured $/hour of all engine instances.",
            w=8,
        ),
        timeseries(
            "Gateway in-flight requests by tenant",
            [target(f"sum by(tenant)(lorafleet_inflight_requests{{{T}}})", "{{tenant}}")],
            w=8,
        ),
        timeseries(
            "Rate-limit rejections per second",
            [
                target(
                    f"sum by(tenant, limit)(rate(lorafleet_ratelimited_total{{{T}}}[{RI}])) or on() vector(0)",
                    "{{tenant}} {{limit}}",
                )
            ],
            unit="reqps",
            w=8,
        ),
        bargauge(
            "Quota utilization (share of the per-minute limit)",
            [
                target(
                    f"max by(tenant, limit)(lorafleet_quota_utilization{{{T}}})", "{{tenant}} {{limit}}", instant=True
                )
            ],
            unit="percentunit",
            max_=1,
            thresholds=[(0.75, "orange"), (0.9, "red")],
            w=8,
        ),
        row("Engines (vLLM)"),
        timeseries(
            "Requests running and waiting",
            [
                target(
                    f"sum by(instance, model_name)(vllm:num_requests_running{{{MN}}})",
                    "running {{model_name}} {{instance}}",
                ),
                target(
                    f"sum by(instance, model_name)(vllm:num_requests_waiting{{{MN}}})",
                    "waiting {{model_name}} {{instance}}",
                ),
            ],
            w=8,
        ),
        timeseries(
            "KV cache usage",
            [target(f"max by(instance, model_name)(vllm:kv_cache_usage_perc{{{MN}}})", "{{model_name}} {{instance}}")],
            unit="percentunit",
            max_=1,
            thresholds=[(0.95, "red")],
            w=8,
        ),
        timeseries(
            "Token throughput",
            [
                target(f"sum by(model_name)(rate(vllm:prompt_tokens_total{{{MN}}}[{RI}]))", "prompt {{model_name}}"),
                target(
                    f"sum by(model_name)(rate(vllm:generation_tokens_total{{{MN}}}[{RI}]))",
                    "generation {{model_name}}",
                ),
            ],
            unit="short",
            description="Tokens per second each engine processes (LoRA requests count under the base model).",
            w=8,
        ),
        timeseries(
            "Engine TTFT and inter-token latency, p90",
            [
                target(
                    f"histogram_quantile(0.9, sum by(le, model_name)(rate(vllm:time_to_first_token_seconds_bucket{{{MN}}}[{RI}])))",
                    "TTFT {{model_name}}",
                ),
                target(
                    f"histogram_quantile(0.9, sum by(le, model_name)(rate(vllm:inter_token_latency_seconds_bucket{{{MN}}}[{RI}])))",
                    "ITL {{model_name}}",
                ),
            ],
            unit="s",
            description="Measured inside the engine; the gap to the gateway's TTFT is gateway + network overhead.",
            w=8,
        ),
        timeseries(
            "Finished requests by reason",
            [
                target(
                    f"sum by(model_name, finished_reason)(rate(vllm:request_success_total{{{MN}}}[{RI}]))",
                    "{{model_name}} {{finished_reason}}",
                )
            ],
            unit="reqps",
            w=8,
        ),
        table(
            "LoRA adapters on the engines",
            [
                target(
                    "max by(instance, max_lora, running_lora_adapters, waiting_lora_adapters)(vllm:lora_requests_info)",
                    instant=True,
                    table=True,
                )
            ],
            description="vLLM reports adapters only as comma-joined labels; per-adapter latency comes from the "
            "gateway's model label.",
            hide=["Value"],  # the gauge's value is a timestamp
            w=8,
        ),
        row("Adapters"),
        timeseries(
            "Adapter loads per minute",
            [
                target(
                    f"sum by(adapter, result)(rate(lorafleet_adapter_loads_total[{RI}])) * 60",
                    "{{adapter}} {{result}}",
                )
            ],
            w=8,
        ),
        bargauge(
            "Adapter load failures (time range)",
            [
                target(
                    'sum by(adapter)(increase(lorafleet_adapter_loads_total{result="error"}[$__range])) or on() vector(0)',
                    "{{adapter}}",
                    instant=True,
                )
            ],
            thresholds=[(1, "red")],
            w=8,
        ),
        bargauge(
            "Mean adapter load time (since gateway start)",
            [
                target(
                    "sum by(adapter)(lorafleet_adapter_load_seconds_sum) / sum by(adapter)(lorafleet_adapter_load_seconds_count)",
                    "{{adapter}}",
                    instant=True,
                )
            ],
            unit="s",
            w=8,
        ),
    ]
    variables = [
        datasource_variable(),
        query_variable("tenant", "Tenant", "lorafleet_inflight_requests"),
        query_variable("model_name", "Engine model", "vllm:num_requests_running"),
    ]
    return dashboard(
        "lorafleet-fleet",
        "lorafleet / Fleet",
        "Is the fleet healthy and busy: engine queues, KV cache, throughput, adapters, rate limits, upstream health.",
        panels,
        variables,
    )


def bench_dashboard() -> dict[str, Any]:
    by = "target, model"
    legend = "{{target}} {{model}}"
    panels = [
        row("Load"),
        timeseries(
            "Offered vs completed rate",
            [
                target('sum by(target)(lorafleet_bench_target_rate{target=~"$target"})', "offered {{target}}"),
                target(f"sum by(target)(rate(lorafleet_bench_requests_total{{{TG}}}[{RI}]))", "completed {{target}}"),
            ],
            unit="reqps",
            description="Completed falling behind offered means the target saturated.",
        ),
        timeseries(
            "Requests per second by status",
            [
                target(
                    f"sum by(target, status)(rate(lorafleet_bench_requests_total{{{TG}}}[{RI}]))",
                    "{{target}} {{status}}",
                )
            ],
            unit="reqps",
        ),
        timeseries(
            "In-flight requests (client side)",
            [target('sum by(target)(lorafleet_bench_inflight{target=~"$target"})', "{{target}}")],
        ),
        timeseries(
            "Client queue delay",
            quantile_targets("lorafleet_bench_queue_delay_seconds", 'target=~"$target"', "target", "{{target}}"),
            unit="s",
            description="Time a scheduled request waited for a free client slot; non-zero means the harness, not "
            "the target, limited the rate (coordinated omission).",
        ),
        row("Latency seen by the client"),
        timeseries(
            "Time to first token", quantile_targets("lorafleet_bench_ttft_seconds", TG, by, legend), unit="s", w=8
        ),
        timeseries(
            "Inter-token latency", quantile_targets("lorafleet_bench_itl_seconds", TG, by, legend), unit="s", w=8
        ),
        timeseries(
            "End-to-end latency", quantile_targets("lorafleet_bench_e2e_seconds", TG, by, legend), unit="s", w=8
        ),
        row("Throughput"),
        timeseries(
            "Output tokens per second",
            [target(f"sum by({by})(rate(lorafleet_bench_output_tokens_total{{{TG}}}[{RI}]))", legend)],
        ),
        timeseries(
            "Prompt tokens per second",
            [target(f"sum by({by})(rate(lorafleet_bench_prompt_tokens_total{{{TG}}}[{RI}]))", legend)],
        ),
        stat(
            "Requests in the time range",
            [target(f"sum(increase(lorafleet_bench_requests_total{{{TG}}}[$__range]))", instant=True)],
            w=12,
        ),
        stat(
            "Output tokens in the time range",
            [target(f"sum(increase(lorafleet_bench_output_tokens_total{{{TG}}}[$__range]))", instant=True)],
            w=12,
        ),
    ]
    variables = [
        datasource_variable(),
        query_variable("target", "Target", "lorafleet_bench_requests_total"),
        query_variable("model", "Model", "lorafleet_bench_requests_total"),
    ]
    return dashboard(
        "lorafleet-bench",
        "lorafleet / Benchmark run",
        "A `lorafleet bench` run live: offered vs achieved load, client-side latency quantiles, token throughput.",
        panels,
        variables,
    )


def all_dashboards() -> dict[str, dict[str, Any]]:
    """File stem -> dashboard JSON, in the order the README lists them."""
    return {
        "tenant-cost": cost_dashboard(),
        "latency": latency_dashboard(),
        "fleet": fleet_dashboard(),
        "benchmark": bench_dashboard(),
    }
