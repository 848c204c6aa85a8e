"""Pure functions: step statistics, the SLO check, the sweep stop rule, cost and $/1k correct (exact numbers)."""

from __future__ import annotations

import pytest

from loadtest.client import RequestRecord
from loadtest.config import Price, Slo
from loadtest.cost import (
    blended_list_price,
    operating_step,
    target_cost,
    tokens_cost_usd,
    usd_per_1k_correct,
    usd_per_1m,
)
from loadtest.stats import check_slo, dist, stop_reason, summarize_step


def rec(model="m", ttft=0.1, e2e=1.0, tokens=11, prompt=30, scheduled=0.0, sent=0.0, status="ok"):
    return RequestRecord(
        model=model,
        scheduled=scheduled,
        sent=sent,
        ttft=ttft,
        e2e=e2e,
        itl=[0.09] * 10,
        output_tokens=tokens,
        prompt_tokens=prompt,
        tokens_from_usage=True,
        status=status,
    )


def test_tpot_and_queue_delay():
    r = rec(ttft=0.2, e2e=1.2, tokens=11, scheduled=1.0, sent=1.5)
    assert r.tpot == pytest.approx((1.2 - 0.2) / 10)
    assert r.queue_delay == pytest.approx(0.5)
    assert rec(tokens=1).tpot is None


def test_dist_percentiles():
    d = dist(list(range(1, 101)))
    assert d["n"] == 100 and d["mean"] == 50.5
    assert d["p50"] == pytest.approx(50.5) and d["p90"] == pytest.approx(90.1) and d["p99"] == pytest.approx(99.01)
    assert dist([])["p90"] is None


def test_summarize_step_counts_tokens_throughput_and_per_model():
    records = [rec("a"), rec("a"), rec("b", tokens=21), rec("b", status="500")]
    s = summarize_step(records, duration_s=2.0)
    assert (s["requests"], s["ok"], s["errors"], s["error_rate"]) == (4, 3, 1, 0.25)
    assert s["output_tokens"] == 11 + 11 + 21 and s["output_tok_per_s"] == 43 / 2
    assert s["input_tok_per_s"] == 90 / 2 and s["req_per_s"] == 1.5
    assert s["error_kinds"] == {"500": 1}
    assert s["per_model"]["a"]["ok"] == 2 and s["per_model"]["b"]["errors"] == 1
    assert s["per_model"]["b"]["output_tok_per_s"] == 21 / 2


def test_a_ramp_up_leaves_its_requests_out_but_counts_their_tokens_streamed_in_the_window():
    # 11 tokens each, one per chunk: the first at sent + 0.1, then every 0.09 s (the last at sent + 1.0)
    ramp = rec("a", scheduled=0.0, sent=0.0, ttft=5.0)  # chunks at 5.0, 5.09, ..., 5.9
    straddles = rec("a", scheduled=1.0, sent=1.0, ttft=8.82)  # chunks at 9.82, 9.91, 10.0, ..., 10.72
    inside = rec("b", scheduled=10.0, sent=10.5, ttft=0.3, tokens=21, prompt=40)
    s = summarize_step([ramp, straddles, inside], duration_s=14.0, since=10.0)
    assert s["duration_s"] == 4.0 and s["ramp_up_s"] == 10.0
    assert (s["requests"], s["ok"]) == (1, 1)  # only the request sent in the window has latencies
    assert s["ttft"]["n"] == 1 and s["ttft"]["p50"] == pytest.approx(0.3)
    assert s["ttft_incl_queue"]["p50"] == pytest.approx(0.8)
    assert s["output_tokens"] == 0 + 9 + 21  # the straddling request's 9 chunks from 10.0 on
    assert s["output_tok_per_s"] == pytest.approx(30 / 4) and s["input_tok_per_s"] == 40 / 4
    assert s["per_model"]["a"]["output_tokens"] == 9 and s["per_model"]["a"]["requests"] == 0


def test_no_ramp_up_is_the_whole_step():
    records = [rec("a", scheduled=0.0), rec("a", scheduled=3.0, sent=3.0)]
    assert summarize_step(records, 5.0, since=0.0) == summarize_step(records, 5.0)
    assert summarize_step(records, 5.0)["output_tokens"] == 22


def test_queue_delay_counts_in_the_slo_figures():
    # The server answered in 0.1 s, but the client sent 2 s late: a user waited 2.1 s for the first token.
    s = summarize_step([rec(ttft=0.1, scheduled=0.0, sent=2.0)] * 10, duration_s=3.0)
    assert s["ttft"]["p90"] == pytest.approx(0.1)
    assert s["ttft_incl_queue"]["p90"] == pytest.approx(2.1)
    assert not check_slo(s, Slo(ttft_p90_s=1.0))["met"]


@pytest.mark.parametrize(
    "slo, met, failing",
    [
        (Slo(ttft_p90_s=0.5), True, []),
        (Slo(ttft_p90_s=0.05), False, ["ttft_p90_s"]),
        (Slo(tpot_p90_s=0.2), True, []),
        (Slo(tpot_p90_s=0.05), False, ["tpot_p90_s"]),
        (Slo(e2e_p90_s=0.5), False, ["e2e_p90_s"]),
        (Slo(ttft_p90_s=0.5, max_error_rate=0.0), False, ["max_error_rate"]),
        (Slo(), True, []),  # no latency limits; 1 error in 200 is within the default 1%
    ],
)
def test_check_slo(slo, met, failing):
    records = [rec(ttft=0.1, e2e=1.0, tokens=11)] * 199 + [rec(status="error")]
    result = check_slo(summarize_step(records, 10.0), slo)
    assert result["met"] is met
    assert sorted(k for k, c in result["checks"].items() if not c["ok"]) == failing


def test_a_step_with_no_completed_request_never_meets_the_slo():
    s = summarize_step([rec(status="error")], 1.0)
    assert not check_slo(s, Slo(max_error_rate=1.0))["met"]


def step(index, load, out_tps, met=True, in_tps=None):
    return {
        "index": index,
        "load": load,
        "output_tok_per_s": out_tps,
        "input_tok_per_s": in_tps if in_tps is not None else 3 * out_tps,
        "slo": {"met": met},
    }


@pytest.mark.parametrize(
    "steps, reason",
    [
        ([step(0, 1, 100)], None),
        ([step(0, 1, 100), step(1, 2, 190)], None),
        ([step(0, 1, 100), step(1, 2, 103)], "saturated"),  # grew < 5%
        ([step(0, 1, 100), step(1, 2, 90)], "saturated"),
        ([step(0, 1, 100), step(1, 2, 300, met=False)], "slo_broken"),
        ([step(0, 1, 100, met=False)], "slo_broken"),
    ],
)
def test_sweep_stop_rule(steps, reason):
    assert stop_reason(steps, min_gain=0.05) == reason


def test_usd_per_1m_formula():
    # $2/h at 800 tok/s: 2 / (800 * 3600) * 1e6
    assert usd_per_1m(2.0, 800) == pytest.approx(0.694444444)
    assert usd_per_1m(1.0, 0) is None


def test_blended_list_price_is_3_to_1():
    assert blended_list_price(0.15, 0.60) == pytest.approx(0.2625)


@pytest.mark.parametrize(
    "mets, expected_index, expected_met",
    [
        ([True, True, False], 1, True),  # the highest load that met the SLO
        ([True, True, True], 2, True),
        ([False, False], 0, False),  # none met: the lowest load, flagged
    ],
)
def test_operating_step(mets, expected_index, expected_met):
    steps = [step(i, 2**i, 100 * (i + 1), met=m) for i, m in enumerate(mets)]
    chosen, met = operating_step(steps)
    assert (chosen["index"], met) == (expected_index, expected_met)


def test_self_hosted_cost_at_goodput():
    steps = [step(0, 1, 100, in_tps=300), step(1, 2, 200, in_tps=600), step(2, 4, 250, met=False, in_tps=750)]
    c = target_cost(Price(usd_per_hour=3.6), steps)
    # priced at step 1: 3.6 $/h / (200 tok/s * 3600) * 1e6 = 5.0 $/1M output
    assert c["operating_step"] == 1 and c["slo_met"] is True
    assert c["usd_per_1m_output"] == pytest.approx(5.0)
    assert c["usd_per_1m_input"] == pytest.approx(3.6 / (600 * 3600) * 1e6)
    assert c["usd_per_1m_blended"] == pytest.approx(3.6 / (800 * 3600) * 1e6)
    assert c["input_output_ratio"] == pytest.approx(3.0)


def test_self_hosted_cost_flagged_when_no_step_met_the_slo():
    c = target_cost(Price(usd_per_hour=3.6), [step(0, 1, 100, met=False), step(1, 2, 150, met=False)])
    assert c["operating_step"] == 0 and c["slo_met"] is False
    assert c["usd_per_1m_output"] == pytest.approx(10.0)
    assert "no load step met the SLO" in c["note"]


def test_self_hosted_cost_without_a_load_run():
    c = target_cost(Price(usd_per_hour=1), [])
    assert c["usd_per_1m_output"] is None and "no load run" in c["note"]
    assert tokens_cost_usd(c, 100, 100) is None


def test_list_price_cost_and_eval_cost():
    c = target_cost(Price(usd_per_1m_input=0.15, usd_per_1m_output=0.60), [step(0, 1, 100, met=False)])
    assert (c["basis"], c["usd_per_1m_input"], c["usd_per_1m_output"]) == ("list_price", 0.15, 0.60)
    assert c["usd_per_1m_blended"] == pytest.approx(0.2625)
    cost = tokens_cost_usd(c, prompt_tokens=2_000_000, completion_tokens=1_000_000)
    assert cost == pytest.approx(0.30 + 0.60)
    assert usd_per_1k_correct(cost, correct=300) == pytest.approx(3.0)
    assert usd_per_1k_correct(cost, correct=0) is None


def test_self_hosted_eval_cost_uses_blended_per_token_cost():
    c = target_cost(Price(usd_per_hour=3.6), [step(0, 1, 250, in_tps=750)])  # 1000 tok/s in all: $1/1M
    assert c["usd_per_1m_blended"] == pytest.approx(1.0)
    assert tokens_cost_usd(c, 600_000, 400_000) == pytest.approx(1.0)
