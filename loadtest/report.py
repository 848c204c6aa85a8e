"""What a run leaves behind: results.json (everything, raw timings included), report.md, a self-contained
report.html, PNG plots, and the summary table printed at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtest.runner import BenchState
from lorafleet.core.blocks import to_html, to_markdown

ROW_KEYS = (
    "target model load slo_met req_per_s output_tok_per_s ttft_p50_s ttft_p90_s ttft_p99_s itl_p50_s e2e_p50_s "
    "e2e_p99_s errors usd_per_1m_output usd_per_1m_blended accuracy usd_per_1k_correct tasks"
).split()

SUMMARY_HEADERS = [
    "target",
    "model",
    "load",
    "req/s",
    "out tok/s",
    "TTFT p50 ms",
    "TTFT p90 ms",
    "TTFT p99 ms",
    "ITL p50 ms",
    "e2e p50 s",
    "e2e p99 s",
    "errors",
    "$/1M out",
    "$/1M blended",
    "accuracy",
    "$/1k correct",
]


def _redacted_config(state: BenchState) -> dict[str, Any]:
    cfg = state.config.model_dump(mode="json")
    for t in cfg["targets"]:
        # Results get shared: keys must not travel with them.
        if t.get("api_key"):
            t["api_key"] = "***"
        t["model_keys"] = dict.fromkeys(t.get("model_keys") or {}, "***")
    return cfg


def operating_step(ts: dict[str, Any]) -> dict[str, Any] | None:
    """The step the target was priced at (the last step when it was never priced)."""
    idx = (ts.get("cost") or {}).get("operating_step")
    steps = ts["steps"]
    if idx is not None:
        return next(s for s in steps if s["index"] == idx)
    return steps[-1] if steps else None


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target (and per model of a mix) at its operating step, joined with cost and quality;
    models that were only evaluated (e.g. the base model prompted few-shot) get rows without load figures."""
    rows = []
    for name, ts in results["targets"].items():
        step, cost = operating_step(ts), ts.get("cost") or {}
        evals = [q for q in results["quality"] if q["target"] == name]
        parts: list[tuple[str, dict[str, Any] | None]] = []
        if step is not None:
            per_model = step["per_model"]
            parts = ([("*", step)] if len(per_model) != 1 else []) + list(per_model.items())
        shown = {m for m, _ in parts}
        parts += [(m, None) for m in dict.fromkeys(q["model"] for q in evals) if m not in shown]
        for model, s in parts:
            rows.append(_row(name, model, step, s, cost, [q for q in evals if q["model"] == model]))
    return rows


def _row(
    target: str,
    model: str,
    step: dict[str, Any] | None,
    s: dict[str, Any] | None,
    cost: dict[str, Any],
    evals: list[dict[str, Any]],
) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(target=target, model=model, tasks=[q["task"] for q in evals], accuracy=[q["accuracy"] for q in evals])
    row.update(usd_per_1k_correct=[q.get("usd_per_1k_correct") for q in evals])
    row.update(usd_per_1m_output=cost.get("usd_per_1m_output"), usd_per_1m_blended=cost.get("usd_per_1m_blended"))
    if s is not None:
        row.update(load=step["load"], slo_met=step["slo"]["met"], errors=s["errors"])
        row.update(req_per_s=s["req_per_s"], output_tok_per_s=s["output_tok_per_s"])
        row.update(ttft_p50_s=s["ttft"]["p50"], ttft_p90_s=s["ttft"]["p90"], ttft_p99_s=s["ttft"]["p99"])
        row.update(itl_p50_s=s["itl"]["p50"], e2e_p50_s=s["e2e"]["p50"], e2e_p99_s=s["e2e"]["p99"])
    return row


def build_results(state: BenchState) -> dict[str, Any]:
    results = {
        "version": 1,
        "started_at": state.started_at,
        "finished_at": state.finished_at,
        "interrupted": state.interrupted,
        "config": _redacted_config(state),
        "targets": state.targets,
        "quality": state.quality,
    }
    results["summary"] = summary_rows(results)
    return results


# --- formatting -------------------------------------------------------------------------------------------


def _num(v: Any, scale: float = 1.0, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    return f"{v * scale:,.{digits}f}"


def _many(vals: list[Any], tasks: list[str], digits: int = 3) -> str:
    """One figure per eval; named by task when a row has several."""
    if len(vals) == 1:
        return _num(vals[0], digits=digits)
    return ", ".join(f"{t} {_num(v, digits=digits)}" for t, v in zip(tasks, vals, strict=True)) or "-"


def summary_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for r in results["summary"]:
        flag = "" if r["slo_met"] in (True, None) else " (SLO missed)"
        rows.append(
            [
                r["target"],
                r["model"],
                _num(r["load"], digits=2) + flag,
                _num(r["req_per_s"]),
                _num(r["output_tok_per_s"], digits=1),
                _num(r["ttft_p50_s"], 1000, 0),
                _num(r["ttft_p90_s"], 1000, 0),
                _num(r["ttft_p99_s"], 1000, 0),
                _num(r["itl_p50_s"], 1000, 1),
                _num(r["e2e_p50_s"]),
                _num(r["e2e_p99_s"]),
                _num(r["errors"]),
                _num(r["usd_per_1m_output"], digits=3),
                _num(r["usd_per_1m_blended"], digits=3),
                _many(r["accuracy"], r["tasks"]),
                _many(r["usd_per_1k_correct"], r["tasks"], digits=4),
            ]
        )
    return SUMMARY_HEADERS, rows


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def step_table(ts: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["step", "load", "requests", "errors", "req/s", "out tok/s", "TTFT p90 ms (incl. queue)"]
    headers += ["TPOT p90 ms", "e2e p90 s", "queue p99 ms", "SLO met"]
    rows = [
        [
            str(s["index"]),
            _num(s["load"]),
            str(s["requests"]),
            str(s["errors"]),
            _num(s["req_per_s"]),
            _num(s["output_tok_per_s"], digits=1),
            _num(s["ttft_incl_queue"]["p90"], 1000, 0),
            _num(s["tpot"]["p90"], 1000, 1),
            _num(s["e2e_incl_queue"]["p90"]),
            _num(s["queue_delay"]["p99"], 1000, 1),
            _num(s["slo"]["met"]) + (" (interrupted)" if s.get("interrupted") else ""),
        ]
        for s in ts["steps"]
    ]
    return headers, rows


def quality_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["target", "model", "task", "mode", "n", "accuracy", "score", "errors", "tokens in/out", "cost $"]
    headers.append("$/1k correct")
    rows = [
        [
            q["target"],
            q["model"],
            q["task"],
            q["mode"] + (f" k={q['k']}" if q["k"] else ""),
            str(q["n"]),
            _num(q["accuracy"], digits=3),
            _num(q["score"], digits=3),
            str(q["errors"]),
            f"{q['prompt_tokens']}/{q['completion_tokens']}",
            _num(q.get("cost_usd"), digits=6),
            _num(q.get("usd_per_1k_correct"), digits=4),
        ]
        for q in results["quality"]
    ]
    return headers, rows


def cost_lines(results: dict[str, Any]) -> list[str]:
    out = []
    for name, ts in results["targets"].items():
        c = ts.get("cost") or {}
        out.append(
            f"{name}: $/1M input {_num(c.get('usd_per_1m_input'), digits=4)}, output "
            f"{_num(c.get('usd_per_1m_output'), digits=4)}, blended {_num(c.get('usd_per_1m_blended'), digits=4)}; "
            f"{c.get('note', '')}"
        )
    return out


def warnings(results: dict[str, Any]) -> list[str]:
    out = []
    if results["interrupted"]:
        out.append("The run was interrupted: figures cover the requests that finished.")
    for name, ts in results["targets"].items():
        for s in ts["steps"]:
            if not s["tokens_from_usage"] and s["ok"]:
                out.append(f"{name} step {s['index']}: the server sent no usage; output tokens counted from chunks.")
            q99 = s["queue_delay"]["p99"]
            if q99 is not None and q99 > 0.05:
                out.append(
                    f"{name} step {s['index']}: client queue delay p99 {q99 * 1000:.0f} ms: the harness fell behind "
                    "the schedule (counted in the SLO figures)."
                )
        w = ts.get("warmup") or {}
        if w.get("errors"):
            out.append(f"{name}: {w['errors']} of {w['requests']} warm-up requests failed: {w.get('first_error')}")
        if ts.get("stop_reason"):
            out.append(f"{name}: sweep stopped: {ts['stop_reason']}.")
    return out


# --- plots ----------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdf(results: dict[str, Any], path: Path) -> bool:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for name, ts in results["targets"].items():
        step = operating_step(ts)
        if step is None:
            continue
        ok = [r for r in step["records"] if r["status"] == "ok"]
        for ax, key in zip(axes, ("ttft", "e2e"), strict=True):
            vals = sorted(r[key] for r in ok if r[key] is not None)
            if vals:
                ax.plot(vals, [(i + 1) / len(vals) for i in range(len(vals))], label=f"{name} @ {step['load']:g}")
                drawn = True
    for ax, title in zip(axes, ("time to first token", "end-to-end latency"), strict=True):
        ax.set(title=title, xlabel="seconds", ylabel="fraction of requests")
    _save(plt, fig, axes, path, legend=drawn)
    return drawn


def _save(plt, fig, axes, path: Path, legend: bool) -> None:
    """The finish every report plot shares: light grid, small legend, tight layout, PNG at 100 dpi."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if legend:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_throughput(results: dict[str, Any], path: Path) -> bool:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for name, ts in results["targets"].items():
        steps = ts["steps"]
        if not steps:
            continue
        x = [s["load"] for s in steps]
        (line,) = ax1.plot(x, [s["output_tok_per_s"] for s in steps], "-", label=name)
        ax2.plot(x, [s["ttft_incl_queue"]["p90"] for s in steps], "-", color=line.get_color(), label=name)
        for s in steps:
            face = line.get_color() if s["slo"]["met"] else "white"
            ax1.plot(s["load"], s["output_tok_per_s"], "o", color=line.get_color(), markerfacecolor=face)
            ax2.plot(s["load"], s["ttft_incl_queue"]["p90"], "o", color=line.get_color(), markerfacecolor=face)
        drawn = True
    slo = results["config"]["slo"].get("ttft_p90_s")
    if slo:
        ax2.axhline(slo, color="red", linestyle="--", label="TTFT p90 SLO")
    mode = (results["config"].get("load") or {}).get("mode", "closed")
    xlabel = "offered load (req/s)" if mode == "open" else "concurrency"
    ax1.set(title="output throughput (hollow: SLO missed)", xlabel=xlabel, ylabel="output tokens/s")
    ax2.set(title="TTFT p90 incl. client queue", xlabel=xlabel, ylabel="seconds")
    _save(plt, fig, (ax1, ax2), path, legend=drawn)
    return drawn


def plot_cost_accuracy(results: dict[str, Any], path: Path) -> bool:
    """Accuracy against what a question costs: few-shot prompts are long, so the same target can land far apart."""
    points = [
        (q["cost_usd"] / q["n"] * 1000, q["accuracy"], q)
        for q in results["quality"]
        if q.get("cost_usd") is not None and q["n"] and q["accuracy"] is not None
    ]
    if not points:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 5))
    tasks = sorted({q["task"] for _, _, q in points})
    who = sorted({(q["target"], q["model"]) for _, _, q in points})
    markers = "osD^vP*Xh<>"
    for x, y, q in points:
        color = f"C{tasks.index(q['task']) % 10}"
        marker = markers[who.index((q["target"], q["model"])) % len(markers)]
        label = f"{q['target']}/{q['model']} · {q['task']} ({q['mode']})"
        ax.scatter([x], [y], s=60, color=color, marker=marker, label=label)
    xs = [p[0] for p in points]
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set(title="accuracy vs cost per question (up and left is better)", xlabel="$ per 1,000 questions")
    ax.set(ylabel="accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --- documents ------------------------------------------------------------------------------------------


def _blocks(results: dict[str, Any], plots: list[tuple[str, str]]) -> list[tuple]:
    blocks: list[tuple] = [("h1", "lorafleet bench report")]
    blocks.append(("p", f"Started {results['started_at']}, finished {results['finished_at']}."))
    for w in warnings(results):
        blocks.append(("p", "Warning: " + w))
    blocks += [("h2", "Summary (each target at its operating step)"), ("table", *summary_table(results))]
    blocks += [("h2", "Cost"), *(("p", line) for line in cost_lines(results))]
    for name, ts in results["targets"].items():
        if ts["steps"]:
            blocks += [("h2", f"Load steps: {name}"), ("table", *step_table(ts))]
    if results["quality"]:
        blocks += [("h2", "Quality"), ("table", *quality_table(results))]
    for file, title in plots:
        blocks += [("h2", title), ("img", file, title)]
    return blocks


def write_report(state: BenchState, out_dir: Path) -> dict[str, Any]:
    """Write results.json, the plots, report.md and report.html into out_dir; return the results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = build_results(state)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    plots = []
    for file, title, fn in (
        ("latency_cdf.png", "Latency distributions", plot_latency_cdf),
        ("throughput_vs_load.png", "Throughput and TTFT vs load", plot_throughput),
        ("cost_vs_accuracy.png", "Cost vs accuracy", plot_cost_accuracy),
    ):
        if fn(results, out_dir / file):
            plots.append((file, title))
    blocks = _blocks(results, plots)
    (out_dir / "report.md").write_text(to_markdown(blocks))
    (out_dir / "report.html").write_text(to_html(blocks, out_dir, "lorafleet bench"))
    return results
