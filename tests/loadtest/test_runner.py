"""Whole load runs against the fake server: loop modes, mixes, sweeps, errors, interruption, live metrics."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from loadtest.client import PreflightError
from loadtest.metrics import BenchMetrics
from loadtest.runner import BenchState, finalize, run_bench
from lorafleet.cli.bench import run_and_report

from .conftest import fake_get_task, make_config


def run(cfg, metrics=None) -> BenchState:
    state = BenchState(cfg)
    asyncio.run(run_bench(cfg, state, metrics or BenchMetrics(), progress=False))
    finalize(state)
    return state


def test_closed_loop_runs_exactly_num_requests(fake):
    metrics = BenchMetrics()
    state = run(make_config(fake.base_url, {"mode": "closed", "concurrency": 4, "num_requests": 30}), metrics)
    (s,) = state.targets["t1"]["steps"]
    assert (s["requests"], s["ok"], s["errors"]) == (30, 30, 0)
    assert s["output_tokens"] == 30 * 8 and s["tokens_from_usage"]
    assert len(s["records"]) == 30 and s["slo"]["met"]
    value = metrics.registry.get_sample_value
    assert value("lorafleet_bench_output_tokens_total", {"target": "t1", "model": "base-model"}) == 240
    assert value("lorafleet_bench_target_rate", {"target": "t1"}) == 0  # reset once the target is done


def test_closed_loop_keeps_the_concurrency(fake):
    fake.settings.ttft_s = 0.2
    metrics = BenchMetrics()
    seen = []
    cfg = make_config(fake.base_url, {"mode": "closed", "concurrency": 3, "num_requests": 9})
    original = metrics.observe

    def observe(target, rec):
        seen.append(metrics.registry.get_sample_value("lorafleet_bench_inflight", {"target": "t1"}))
        original(target, rec)

    metrics.observe = observe
    run(cfg, metrics)
    # While one request completes the other two are still in flight; never more than 3.
    assert max(seen) <= 3 and seen[0] == 2


def test_open_loop_sends_on_schedule_and_records_queue_delay(fake):
    cfg = make_config(fake.base_url, {"mode": "open", "rate": 50, "num_requests": 40})
    (s,) = run(cfg).targets["t1"]["steps"]
    assert s["ok"] == 40
    scheduled = sorted(r["scheduled"] for r in s["records"])
    assert scheduled[-1] == pytest.approx(sum(1 / 50 for _ in range(40)), rel=0.6)  # Poisson: about n/rate
    assert all(r["queue_delay"] >= 0 for r in s["records"])
    assert s["queue_delay"]["n"] == 40


def test_duration_mode_stops_sending_after_the_duration(fake):
    cfg = make_config(fake.base_url, {"mode": "open", "rate": 20, "duration_s": 1.0})
    (s,) = run(cfg).targets["t1"]["steps"]
    assert 5 <= s["requests"] <= 45
    assert max(r["scheduled"] for r in s["records"]) <= 1.0


def test_closed_loop_ramp_up_staggers_the_workers_and_measures_after_it(fake):
    fake.settings.ttft_s = 1.0  # each worker sends one request during the ramp, its next one after it
    cfg = make_config(fake.base_url, {"mode": "closed", "concurrency": 4, "duration_s": 0.6, "ramp_up_s": 0.8})
    (s,) = run(cfg).targets["t1"]["steps"]
    ramp = sorted(r["scheduled"] for r in s["records"] if r["scheduled"] < 0.8)
    assert ramp == pytest.approx([0.0, 0.2, 0.4, 0.6], abs=0.06)  # worker k starts at k * 0.8 / 4 s, not all at 0
    window = [r for r in s["records"] if r["scheduled"] >= 0.8]
    assert s["requests"] == s["ttft"]["n"] == len(window) > 0  # the ramp's requests are left out of the latencies
    assert max(r["scheduled"] for r in s["records"]) < 0.8 + 0.6
    assert s["ramp_up_s"] == 0.8 and s["duration_s"] >= 0.6


def test_ramp_up_needs_a_duration():
    with pytest.raises(Exception, match="ramp_up_s needs duration_s"):
        make_config("http://x", {"mode": "closed", "concurrency": 2, "num_requests": 4, "ramp_up_s": 1})


def test_mix_is_broken_down_per_adapter(fake):
    cfg = make_config(
        fake.base_url,
        {"mode": "closed", "concurrency": 4, "num_requests": 200},
        target={"adapters": {"manifest": 0.7, "contract": 0.2, "drugs": 0.1}},
    )
    (s,) = run(cfg).targets["t1"]["steps"]
    per = s["per_model"]
    assert set(per) == {"manifest", "contract", "drugs"}
    assert sum(p["requests"] for p in per.values()) == 200
    assert per["manifest"]["requests"] > per["contract"]["requests"] > per["drugs"]["requests"]
    sent = [b["model"] for b in fake.app.bodies]
    assert sent.count("manifest") == per["manifest"]["requests"]


def test_warmup_requests_are_excluded_and_cover_every_model(fake):
    cfg = make_config(
        fake.base_url,
        {"mode": "closed", "concurrency": 2, "num_requests": 5, "warmup_requests": 2},
        target={"adapters": {"manifest": 1, "contract": 1, "drugs": 1}},
    )
    ts = run(cfg).targets["t1"]
    assert ts["warmup"] == {"requests": 3, "errors": 0, "first_error": None}  # at least one per model
    assert ts["steps"][0]["requests"] == 5
    assert len(fake.app.bodies) == 8
    assert {b["model"] for b in fake.app.bodies[:3]} == {"manifest", "contract", "drugs"}


def test_errors_during_a_run_are_counted_not_fatal(fake):
    fake.settings.fail_every = 4
    cfg = make_config(fake.base_url, {"mode": "closed", "concurrency": 2, "num_requests": 40})
    (s,) = run(cfg).targets["t1"]["steps"]
    assert (s["requests"], s["errors"], s["error_kinds"]) == (40, 10, {"500": 10})
    assert not s["slo"]["met"]  # 25% errors > the default 1%
    assert all(r["error"] for r in s["records"] if r["status"] != "ok")


def test_sweep_stops_when_the_slo_breaks(fake):
    fake.settings.ttft_s = 0.05
    cfg = make_config(
        fake.base_url,
        {"mode": "closed", "sweep": [1, 2, 4], "num_requests": 4},
        slo={"ttft_p90_s": 0.01},
    )
    ts = run(cfg).targets["t1"]
    assert len(ts["steps"]) == 1 and ts["stop_reason"] == "slo_broken"
    assert ts["cost"]["slo_met"] is False and ts["cost"]["operating_step"] == 0


def test_sweep_stops_at_saturation(fake):
    # The fake generates one request at a time: more concurrency cannot raise throughput.
    fake.settings.capacity, fake.settings.ttft_s = 1, 0.05
    cfg = make_config(fake.base_url, {"mode": "closed", "sweep": [1, 2, 4, 8], "num_requests": 12, "min_gain": 0.3})
    ts = run(cfg).targets["t1"]
    assert ts["stop_reason"] == "saturated"
    assert len(ts["steps"]) == 2
    assert ts["cost"]["operating_step"] == 1  # both met the (error-only) SLO: the highest load is priced


def test_sweep_runs_every_step_while_throughput_grows(fake):
    fake.settings.ttft_s = 0.1
    cfg = make_config(fake.base_url, {"mode": "closed", "sweep": [1, 4], "num_requests": 8})
    ts = run(cfg).targets["t1"]
    assert [s["load"] for s in ts["steps"]] == [1, 4] and ts["stop_reason"] is None


def test_targets_run_one_after_another(fake):
    fake.settings.ttft_s = 0.05
    t2 = {"name": "t2", "base_url": fake.base_url, "model": "manifest", "price": {"usd_per_hour": 2.0}}
    cfg = make_config(fake.base_url, {"mode": "closed", "concurrency": 2, "num_requests": 6}, extra_targets=[t2])
    state = run(cfg)
    models = [b["model"] for b in fake.app.bodies]
    assert models == ["base-model"] * 6 + ["manifest"] * 6  # never interleaved
    assert state.targets["t2"]["cost"]["usd_per_hour"] == 2.0


def test_cancel_keeps_the_partial_step(fake):
    fake.settings.ttft_s = 0.05
    cfg = make_config(fake.base_url, {"mode": "closed", "concurrency": 2, "duration_s": 60})
    state, metrics = BenchState(cfg), BenchMetrics()

    async def go():
        task = asyncio.create_task(run_bench(cfg, state, metrics, progress=False))
        while (metrics.registry.get_sample_value("lorafleet_bench_requests_total", _ok_labels()) or 0) < 4:
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    (s,) = state.targets["t1"]["steps"]
    assert s["interrupted"] and s["ok"] >= 4 and len(s["records"]) == s["requests"]


def _ok_labels():
    return {"target": "t1", "model": "base-model", "status": "ok"}


def test_metrics_port_serves_the_bench_series_while_running(fake, tmp_path):
    fake.settings.ttft_s, fake.settings.itl_s = 0.05, 0.01
    metrics = BenchMetrics()
    metrics.serve(0, "127.0.0.1")
    cfg = make_config(fake.base_url, {"mode": "open", "rate": 20, "duration_s": 3})
    thread = threading.Thread(
        target=run_and_report, args=(cfg, tmp_path / "out"), kwargs={"progress": False, "metrics": metrics}
    )
    thread.start()
    try:
        text = ""
        deadline = time.monotonic() + 30
        while thread.is_alive() and time.monotonic() < deadline:
            text = httpx.get(f"http://127.0.0.1:{metrics.port}/metrics").text
            if 'lorafleet_bench_requests_total{model="base-model",status="ok",target="t1"}' in text:
                break
            time.sleep(0.05)
        assert thread.is_alive(), "the run ended before the series showed up"
    finally:
        thread.join()
        metrics.close()
    for name in (
        "lorafleet_bench_requests_total",
        "lorafleet_bench_ttft_seconds_bucket",
        "lorafleet_bench_itl_seconds_bucket",
        "lorafleet_bench_e2e_seconds_bucket",
        "lorafleet_bench_output_tokens_total",
        "lorafleet_bench_prompt_tokens_total",
        "lorafleet_bench_inflight",
        "lorafleet_bench_queue_delay_seconds_bucket",
        "lorafleet_bench_target_rate",
    ):
        assert name in text, name
    assert 'lorafleet_bench_target_rate{target="t1"} 20.0' in text


def test_metrics_port_from_config_is_closed_after_the_run(fake, tmp_path):
    from tests.conftest import free_port

    port = free_port()
    cfg = make_config(fake.base_url, {"mode": "closed", "concurrency": 1, "num_requests": 2}, metrics_port=port)
    cfg = cfg.model_copy(update={"metrics_addr": "127.0.0.1"})
    results, interrupted = run_and_report(cfg, tmp_path, progress=False)
    assert not interrupted and results["targets"]["t1"]["steps"][0]["ok"] == 2
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics")


def test_load_prompts_from_a_task_per_model(fake):
    cfg = make_config(
        fake.base_url,
        {"mode": "closed", "concurrency": 2, "num_requests": 6},
        target={"adapters": {"manifest": 1, "contract": 1}},
        prompts={"source": "task", "task": {"manifest": "echo", "*": "echo"}, "pool_size": 3},
    )
    state = BenchState(cfg)
    asyncio.run(run_bench(cfg, state, BenchMetrics(), progress=False, get_task=fake_get_task))
    messages = [b["messages"] for b in fake.app.bodies]
    assert all(m[0]["role"] == "system" and m[1]["content"].startswith("item ") for m in messages)
    assert len(messages) == 6 and all(len(m) == 2 for m in messages)  # the reference answer is never sent


@pytest.mark.parametrize(
    "task, message",
    [
        ({"manifest": "echo"}, "no task for model 'contract' of target 't1'"),
        ({"manifest": "echo", "contract": "legal"}, "prompts.task.contract: unknown task 'legal'"),
    ],
)
def test_task_prompts_are_checked_before_the_run(fake, task, message):
    cfg = make_config(
        fake.base_url,
        {"mode": "closed", "concurrency": 1, "num_requests": 1},
        target={"adapters": {"manifest": 1, "contract": 1}},
        prompts={"source": "task", "task": task},
    )
    with pytest.raises(PreflightError, match=message):
        asyncio.run(run_bench(cfg, BenchState(cfg), BenchMetrics(), progress=False, get_task=fake_get_task))
    assert fake.app.bodies == []
