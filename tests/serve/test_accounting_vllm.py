"""Metering under concurrent load on the real engine: what the gateway charges equals what the engine generated
(to the token for whole answers, bar a race in vLLM named below for abandoned ones), while a third of the clients
hang up mid-stream at random points (logged 499, aborted in vLLM, charged the tokens generated up to the abort).
"Generated" is the engine's own count: vLLM's prompt and generation token counters, read before and after. ACCOUNTING_REQUESTS=200 runs the figure the closing note quotes.
"""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from serve.gateway.app import ServerThread, create_app
from tests.conftest import LIVE_ADAPTERS, free_port
from tests.serve.conftest import ADMIN_KEY, KEYS, config, metric, tenant
from tests.serve.fake_engine import wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BASE = "smollm2-135m-instruct"
PRICE = {"input": 0.5, "output": 1.5}  # $ per 1M tokens; adapters cost their base's price
OWN = {"acme": LIVE_ADAPTERS["acme"], "globex": LIVE_ADAPTERS["globex"]}


@pytest.fixture(scope="module")
def gw(vllm_engine, live_gateway, smollm2_path):
    """A gateway of its own (metrics from zero) over the session engine, with the live gateway's adapters."""
    cfg = config(
        [{"name": "smollm2", "model": str(smollm2_path), "served_name": BASE, "urls": [vllm_engine.spec.url]}],
        [tenant(t, [BASE, a]) for t, a in OWN.items()],
        [{"name": a, "path": a, "base": BASE} for a in OWN.values()],
        adapters_root=live_gateway.gateway.adapters_root,
        prices={BASE: PRICE},
    )
    server = ServerThread(create_app(cfg), port=free_port()).start()
    yield server
    server.stop()


@dataclass
class Job:
    tenant: str
    model: str
    kind: str  # chat | completion
    stream: bool
    cancel_after: int | None  # close the stream once the client has seen this many generated tokens
    max_tokens: int


@dataclass
class Outcome:
    job: Job
    status: int
    usage: dict | None  # what the client received


def jobs(n: int = int(os.environ.get("ACCOUNTING_REQUESTS", 36)), seed: int = 7) -> list[Job]:
    rng, out = random.Random(seed), []
    for i in range(n):
        who = ("acme", "globex")[i % 2]
        cancel = rng.randint(1, 30) if i % 3 == 2 else None
        stream = cancel is not None or i % 3 == 1
        # A cancelled request must still be generating when its client hangs up: many tokens, no early EOS, and
        # the hang-up counted in tokens, not chunks. vLLM merges the tokens of a request whose chunks its API
        # server has not sent yet into one chunk: on a busy machine 200 tokens came in under 30 chunks, and in a CI
        # run two streams of 1500 tokens ended (logged 200) before their client had read its 1-30 chunks. Counted
        # in tokens (the running usage on every chunk), the client hangs up at most a merged chunk past its cut,
        # still about 1450 tokens before the end.
        out.append(
            Job(
                who,
                rng.choice([BASE, OWN[who]]),
                rng.choice(["chat", "completion"]),
                stream,
                cancel,
                1500 if cancel else rng.randint(4, 24),
            )
        )
    return out


def run(gw: ServerThread, job: Job) -> Outcome:
    body = {"model": job.model, "max_tokens": job.max_tokens, "stream": job.stream, "temperature": 0.8}
    if job.cancel_after:
        body["ignore_eos"] = True
    if job.stream:
        # a cancelling client reads the running usage (continuous_usage_stats) to know how far the engine got
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": bool(job.cancel_after)}
    if job.kind == "chat":
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": f"Tell me about {job.model}."}]
    else:
        path, body["prompt"] = "/v1/completions", f"A short note on {job.model}:"
    headers = {"Authorization": f"Bearer {KEYS[job.tenant]}"}
    if not job.stream:
        r = httpx.post(gw.url + path, json=body, headers=headers, timeout=300)
        return Outcome(job, r.status_code, r.json().get("usage"))
    usage = None
    with httpx.stream("POST", gw.url + path, json=body, headers=headers, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
            if job.cancel_after and usage and usage["completion_tokens"] >= job.cancel_after:
                return Outcome(job, 499, None)  # leaving the block closes the connection mid-stream
    return Outcome(job, r.status_code, usage)


def engine_counts(url: str) -> tuple[float, float, float]:
    """vLLM's prompt and generation tokens so far, and its running requests."""
    text = httpx.get(f"{url}/metrics").text
    return (
        metric(text, "vllm:prompt_tokens_total"),
        metric(text, "vllm:generation_tokens_total"),
        metric(text, "vllm:num_requests_running"),
    )


def test_metered_tokens_and_cost_equal_what_the_engine_generated_with_cancellations(gw, vllm_engine):
    url = vllm_engine.spec.url
    assert wait_for(lambda: engine_counts(url)[2] == 0, timeout=120)  # nothing left over from earlier tests
    prompt0, generated0, _ = engine_counts(url)
    plan = jobs()
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda j: run(gw, j), plan))
    done = [o for o in outcomes if o.status == 200]
    cancelled = [o for o in outcomes if o.job.cancel_after]
    assert len(done) + len(cancelled) == len(plan), [o.status for o in outcomes]
    assert cancelled and all(o.usage for o in done)

    # every request, cancelled ones included, is over in the engine and logged by the gateway
    assert wait_for(lambda: engine_counts(url)[2] == 0, timeout=120)
    assert wait_for(
        lambda: metric(httpx.get(f"{gw.url}/metrics").text, "lorafleet_requests_total") == len(plan), timeout=30
    )
    prompt1, generated1, _ = engine_counts(url)
    text = httpx.get(f"{gw.url}/metrics").text
    assert metric(text, "lorafleet_requests_total", code="200") == len(done)
    assert metric(text, "lorafleet_requests_total", code="499") == len(cancelled)  # abandoned: logged as 499
    report = {
        t["name"]: t["usage"]
        for t in httpx.get(f"{gw.url}/admin/tenants", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()[
            "tenants"
        ]
    }
    metered_p = metric(text, "lorafleet_tokens_total", kind="prompt")
    metered_c = metric(text, "lorafleet_tokens_total", kind="completion")
    received_c = sum(o.usage["completion_tokens"] for o in done)
    print(
        f"\naccounting: {len(plan)} requests (c=8), {len(done)} completed, {len(cancelled)} cancelled mid-stream; "
        f"metered - generated: prompt {metered_p - (prompt1 - prompt0):+.0f}, completion "
        f"{metered_c - (generated1 - generated0):+.0f} (of {generated1 - generated0:.0f}; "
        f"{metered_c - received_c:.0f} of them for cancelled streams)"
    )
    assert metered_p == prompt1 - prompt0  # every request got at least one chunk: its prompt was charged
    # A stream is charged up to the last chunk the engine sent before the abort. The race left is in vLLM: its
    # frontend counts a token when the engine core's output reaches it (vllm/v1/engine/output_processor.py) and
    # writes it to the stream when the stream's generator next runs; tokens counted in between when the gateway
    # hangs up are never sent, so nobody can be charged for them. Measured per run of 12 cancelled streams: 0 and
    # 0 on an idle machine; 0, 2 and 3 with three busy loops beside the test, and 18 once (its clients cut by
    # chunks, as this test did before). The bound, 4 per cancelled stream (48), stays far below the 132 or more
    # tokens the clients read before hanging up: a gateway that charged cancelled streams nothing fails here.
    assert (
        0 <= (generated1 - generated0) - metered_c <= 4 * len(cancelled) < sum(o.job.cancel_after for o in cancelled)
    )
    assert metered_c > received_c  # the cancelled streams were charged too
    for who in OWN:
        p = metric(text, "lorafleet_tokens_total", tenant=who, kind="prompt")
        c = metric(text, "lorafleet_tokens_total", tenant=who, kind="completion")
        cost = (p * PRICE["input"] + c * PRICE["output"]) / 1e6
        assert (report[who]["prompt_tokens"], report[who]["completion_tokens"]) == (p, c)
        assert metric(text, "lorafleet_cost_usd_total", tenant=who) == pytest.approx(cost, rel=1e-9, abs=1e-15)
        assert report[who]["cost_usd"] == pytest.approx(cost, rel=1e-9, abs=1e-15)
        assert report[who]["inflight"] == 0
