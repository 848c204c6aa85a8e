"""$ per 1M tokens and $ per 1,000 correct answers: pure functions.

Self-hosted (`usd_per_hour`): cost is read at the operating point, the highest load step that met the latency
SLO (goodput), not at peak throughput. $/1M output = usd_per_hour / (output tok/s * 3600) * 1e6, and likewise
for input; each charges the whole instance to one kind of token, as GPU cost tables do. Blended is the cost
per 1M tokens of either kind at the run's own input:output mix; it equals the 3:1 blended list price when the
run's prompts are three times as long as its outputs (the example config does that).
List price: input and output are the prices; blended = (3 * input + output) / 4 (Artificial Analysis).
"""

from __future__ import annotations

from typing import Any

from loadtest.config import Price

BLEND_INPUT, BLEND_OUTPUT = 3, 1


def usd_per_1m(usd_per_hour: float, tokens_per_s: float) -> float | None:
    if tokens_per_s <= 0:
        return None
    return usd_per_hour / (tokens_per_s * 3600) * 1e6


def blended_list_price(usd_per_1m_input: float, usd_per_1m_output: float) -> float:
    return (BLEND_INPUT * usd_per_1m_input + BLEND_OUTPUT * usd_per_1m_output) / (BLEND_INPUT + BLEND_OUTPUT)


def operating_step(steps: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, bool]:
    """(the step to price, whether it met the SLO): the highest load that met it, else the lowest load."""
    if not steps:
        return None, False
    passing = [s for s in steps if s["slo"]["met"]]
    if passing:
        return max(passing, key=lambda s: s["load"]), True
    return min(steps, key=lambda s: s["load"]), False


def target_cost(price: Price, steps: list[dict[str, Any]], slo_set: bool = True) -> dict[str, Any]:
    """A target's $/1M input, output and blended tokens, with where the figures come from."""
    if not price.self_hosted:
        return {
            "basis": "list_price",
            "usd_per_1m_input": price.usd_per_1m_input,
            "usd_per_1m_output": price.usd_per_1m_output,
            "usd_per_1m_blended": blended_list_price(price.usd_per_1m_input, price.usd_per_1m_output),
            "operating_step": None,
            "slo_met": None,
            "note": "list price",
        }
    step, met = operating_step(steps)
    if step is None:
        return {
            "basis": "self_hosted",
            "usd_per_1m_input": None,
            "usd_per_1m_output": None,
            "usd_per_1m_blended": None,
            "operating_step": None,
            "slo_met": None,
            "note": "no load run: a self-hosted price needs measured throughput",
        }
    h = price.usd_per_hour
    in_tps, out_tps = step["input_tok_per_s"], step["output_tok_per_s"]
    if not met:
        note = "no load step met the SLO: priced at the lowest load step (flagged)"
    elif not slo_set:
        note = "no latency SLO set: priced at the highest load step"
    else:
        note = "priced at the highest load step that met the SLO (goodput)"
    return {
        "basis": "self_hosted",
        "usd_per_hour": h,
        "usd_per_1m_input": usd_per_1m(h, in_tps),
        "usd_per_1m_output": usd_per_1m(h, out_tps),
        "usd_per_1m_blended": usd_per_1m(h, in_tps + out_tps),
        "input_output_ratio": in_tps / out_tps if out_tps else None,
        "operating_step": step["index"],
        "operating_load": step["load"],
        "input_tok_per_s": in_tps,
        "output_tok_per_s": out_tps,
        "slo_met": met,
        "note": note,
    }


def tokens_cost_usd(cost: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> float | None:
    """What some tokens cost on a target: per kind at list price; at the blended per-token cost if self-hosted."""
    if cost["basis"] == "list_price":
        return (prompt_tokens * cost["usd_per_1m_input"] + completion_tokens * cost["usd_per_1m_output"]) / 1e6
    if cost["usd_per_1m_blended"] is None:
        return None
    return (prompt_tokens + completion_tokens) * cost["usd_per_1m_blended"] / 1e6


def usd_per_1k_correct(cost_usd: float | None, correct: int) -> float | None:
    if cost_usd is None or correct <= 0:
        return None
    return cost_usd / correct * 1000
