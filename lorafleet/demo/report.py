"""The demo's report: the article's claims, answered per tenant with this run's numbers.

It reads the bench harness's results.json (quality evals, load steps, cost) and the adapters' training summaries,
and says plainly where each claim holds and where it does not.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

from lorafleet.core.blocks import to_html, to_markdown
from lorafleet.core.diagnose import diagnose

# The article's claims, as thresholds this run is checked against.
ACCURACY_GAIN = 0.15  # fine-tuned small vs generalist few-shot, in accuracy points
COST_RATIO = 0.6  # fine-tuned small $/1M output tokens at most this share of the generalist's
PARAM_SHARE = 0.02  # LoRA trains under 1-2 % of the parameters
GENERALIST_TARGET, BASE_TARGET, LORA_TARGET = "generalist", "small-base", "specialists-lora"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f} %"


def _usd(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"${v:.{digits}f}"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def _eval(results: dict, target: str, task: str, mode: str) -> dict | None:
    return next(
        (q for q in results["quality"] if q["target"] == target and q["task"] == task and q["mode"] == mode), None
    )


def _acc(q: dict | None) -> float | None:
    return None if q is None else q.get("accuracy")


def _cost(results: dict, target: str) -> dict:
    return (results["targets"].get(target) or {}).get("cost") or {}


def _operating(results: dict, target: str, model: str | None = None) -> dict | None:
    """Latency figures of a target (or one model of its mix) at the load step it was priced at."""
    ts = results["targets"].get(target)
    if not ts or not ts.get("steps"):
        return None
    idx = (ts.get("cost") or {}).get("operating_step")
    step = next((s for s in ts["steps"] if s["index"] == idx), ts["steps"][-1])
    return step.get("per_model", {}).get(model) or step if model else step


def gain_interval(mine: dict | None, theirs: dict | None, rounds: int = 2000) -> tuple[float, float] | None:
    """95 % paired-bootstrap interval of the accuracy gain: the same eval items, resampled together."""
    if not mine or not theirs or not mine.get("items") or len(mine["items"]) != len(theirs.get("items") or []):
        return None
    a = {r["index"]: float(r["correct"]) for r in mine["items"]}
    b = {r["index"]: float(r["correct"]) for r in theirs["items"]}
    if a.keys() != b.keys():
        return None
    diffs = [a[i] - b[i] for i in sorted(a)]
    rng = random.Random(0)  # the same report for the same results
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def accuracy_rows(results: dict, tasks: dict[str, str], data: dict | None = None) -> list[dict[str, Any]]:
    rows = []
    for tenant, task in tasks.items():
        lora_q, gen_q = (
            _eval(results, LORA_TARGET, task, "zero_shot"),
            _eval(results, GENERALIST_TARGET, task, "few_shot_completion"),
        )
        lora, gen = _acc(lora_q), _acc(gen_q)
        rows.append(
            {
                "tenant": tenant,
                "task": task,
                "name": task_label(task),
                "n": (lora_q or {}).get("n"),
                "interval": gain_interval(lora_q, gen_q),
                "majority": ((data or {}).get(task) or {}).get("majority", {}).get("accuracy"),
                "lora": lora,
                "small_zero": _acc(_eval(results, BASE_TARGET, task, "zero_shot")),
                "small_few": _acc(_eval(results, BASE_TARGET, task, "few_shot_chat")),
                "generalist_few": gen,
                "gain": None if lora is None or gen is None else lora - gen,
                "lora_per_1k": (_eval(results, LORA_TARGET, task, "zero_shot") or {}).get("usd_per_1k_correct"),
                "gen_per_1k": (_eval(results, GENERALIST_TARGET, task, "few_shot_completion") or {}).get(
                    "usd_per_1k_correct"
                ),
            }
        )
    return rows


def task_label(task: str) -> str:
    """How the report names a task: a built-in name, or a task file's folder."""
    path = Path(task)
    return path.parent.name if path.name in ("task.yaml", "task.yml") else path.stem if path.suffix else path.name


def model_label(model: str) -> str:
    """How the report names a model id or a local HF folder (its last path part)."""
    return Path(model).name


def claims(acc: list[dict], results: dict, training: dict[str, dict], small: str, generalist: str) -> list[str]:
    """One sentence per claim: holds / does not hold, with the numbers. `small`/`generalist`: the plan's models."""
    out = []
    for r in acc:
        if r["gain"] is None:
            out.append(f"Accuracy ({r['tenant']}/{r['name']}): not measured.")
            continue
        verdict = "HOLDS" if r["gain"] >= ACCURACY_GAIN else "DOES NOT HOLD"
        ci = r.get("interval")
        ci_text = f" (95 % interval {100 * ci[0]:+.0f} to {100 * ci[1]:+.0f}, n={r['n']})" if ci else ""
        out.append(
            f"Accuracy ({r['tenant']}/{r['name']}): fine-tuned {model_label(small)} {_pct(r['lora'])} vs "
            f"{model_label(generalist)} "
            f"few-shot {_pct(r['generalist_few'])}: {100 * r['gain']:+.0f} points{ci_text}; the claim of at least "
            f"+{100 * ACCURACY_GAIN:.0f} points {verdict}."
        )
    gen = _cost(results, GENERALIST_TARGET).get("usd_per_1m_output")
    for target, what in ((LORA_TARGET, "LoRA adapters (unmerged)"), ("manifest-merged", "merged adapter")):
        if target not in results["targets"]:
            continue  # not served in this run (prove and quick runs have no merged engine)
        mine = _cost(results, target).get("usd_per_1m_output")
        if mine is None or not gen:
            out.append(f"Cost ({what}): not measured.")
            continue
        ratio = mine / gen
        verdict = "HOLDS" if ratio <= COST_RATIO else "DOES NOT HOLD"
        out.append(
            f"Cost ({what}): {_usd(mine)} vs {_usd(gen)} per 1M output tokens for the generalist = {ratio:.2f}x; "
            f"the target of at most {COST_RATIO}x {verdict}."
        )
    shares = [(t.get("params") or {}).get("share") for t in training.values()]
    shares = [s for s in shares if s is not None]
    if shares:
        verdict = "HOLDS" if max(shares) < PARAM_SHARE else "DOES NOT HOLD"
        out.append(
            f"LoRA trains {100 * max(shares):.2f} % of the parameters at most ({_lora_shape(training)}); "
            f"the claim of under {100 * PARAM_SHARE:.0f} % {verdict}."
        )
    return out


def _lora_shape(training: dict) -> str:
    """'r=16 on the top 15 layers' from the adapters' recorded configs (all the same in the demo)."""
    shapes = set()
    for t in training.values():
        cfg = t.get("config") or {}
        where = f"the top {cfg['top_layers']} layers" if cfg.get("top_layers") else "every layer"
        shapes.add(f"r={cfg.get('r', '?')} on {where}")
    return ", ".join(sorted(shapes))


def _accuracy_table(acc: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = ["tenant", "task", "fine-tuned small", "small zero-shot", "small k-shot", "generalist k-shot",
               "majority class", "gain vs generalist", "$/1k correct (fine-tuned)", "$/1k correct (generalist)"]  # fmt: skip
    rows = [
        [
            r["tenant"],
            r["name"],
            _pct(r["lora"]),
            _pct(r["small_zero"]),
            _pct(r["small_few"]),
            _pct(r["generalist_few"]),
            _pct(r.get("majority")),
            "-" if r["gain"] is None else f"{100 * r['gain']:+.0f} pts",
            _usd(r["lora_per_1k"], 4),
            _usd(r["gen_per_1k"], 4),
        ]  # fmt: skip
        for r in acc
    ]
    return headers, rows


def _cost_table(results: dict, usd_per_hour: float) -> tuple[list[str], list[list[str]]]:
    # prompt tokens per request: targets fed other tasks' prompts (the mix of adapters) do not compare like for like
    headers = ["target", "load (concurrency)", "SLO met", "output tok/s", "prompt tokens/req", "TTFT p50", "TTFT p90",
               "e2e p50", "$/1M input", "$/1M output", "$/1M blended"]  # fmt: skip
    rows = []
    for name in results["targets"]:
        cost, step = _cost(results, name), _operating(results, name)
        rows.append(
            [
                name,
                f"{cost.get('operating_load', '-')}",
                str(cost.get("slo_met", "-")),
                "-" if not step else f"{step['output_tok_per_s']:.0f}",
                "-" if not step or not step.get("ok") else f"{step['input_tokens'] / step['ok']:.0f}",
                _s(step and step["ttft"]["p50"]),
                _s(step and step["ttft"]["p90"]),
                _s(step and step["e2e"]["p50"]),
                _usd(cost.get("usd_per_1m_input")),
                _usd(cost.get("usd_per_1m_output")),
                _usd(cost.get("usd_per_1m_blended")),
            ]  # fmt: skip
        )
    return headers, rows


def _training_table(training: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    headers = [
        "adapter",
        "examples",
        "epochs",
        "trainable params",
        "share",
        "train time",
        "tokens/s",
        "final eval loss",
    ]
    rows = []
    for task, t in training.items():
        params, m = t.get("params") or {}, t.get("metrics") or {}
        loss = m.get("final_eval_loss")
        rows.append(
            [task_label(task), str(t["config"]["n"]), f"{t['config'].get('epochs', 1):g}", f"{params.get('trainable', 0):,}", f"{100 * params.get('share', 0):.2f} %",
             _s(m.get("train_seconds")), f"{m.get('tokens_per_s') or 0:.0f}", "-" if loss is None else f"{loss:.4f}"]
        )  # fmt: skip
    return headers, rows


def curve_points(results: dict, training: dict, curve: dict) -> list[tuple[int, float, float | None]]:
    """(examples, accuracy, train seconds): the base (0), the smaller adapters, and the tenant's full adapter."""
    task = next((t["config"]["task"] for t in curve.values()), None)
    if task is None:
        return []
    points = [(0, _acc(_eval(results, BASE_TARGET, task, "zero_shot")), 0.0)]
    by_model = {q["model"]: q for q in results.get("curve_quality", [])}
    for n, t in sorted(curve.items()):
        q = by_model.get(t["config"]["name"])
        points.append((n, _acc(q), (t.get("metrics") or {}).get("train_seconds")))
    full = training.get(task)
    if full:
        points.append((full["config"]["n"], _acc(_eval(results, LORA_TARGET, task, "zero_shot")),
                       (full.get("metrics") or {}).get("train_seconds")))  # fmt: skip
    return [p for p in points if p[1] is not None]


def examples_needed(points: list[tuple]) -> str | None:
    """The curve's claim: the fewest examples reaching 90 % of the final score, and whether it is still rising."""
    trained = [p for p in points if p[0] > 0]
    if not trained or trained[-1][1] is None:
        return None
    final_n, final = trained[-1][0], trained[-1][1]
    first = next(n for n, acc, _ in trained if acc >= 0.9 * final)
    text = f"Examples needed: {first} reach 90 % of the final score ({_pct(final)} at {final_n})."
    if len(trained) > 1 and round(final - trained[-2][1], 6) > 0.05:  # more than 5 points on the last step
        text += (f" The curve is still rising ({_pct(trained[-2][1])} at {trained[-2][0]}): more examples or more "
                 "epochs would likely score higher.")  # fmt: skip
    return text


WRONG_SHOWN = 3  # wrong answers shown per target and task
FIELDS_SHOWN = 6  # answer fields listed per model in the diagnostics table
WRONG_TARGETS = ((LORA_TARGET, "zero_shot", "fine-tuned"), (GENERALIST_TARGET, "few_shot_completion", "generalist"))


def _cut(text: str | None, n: int = 70) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def wrong_answers(results: dict, tasks: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """A few wrong predictions per target beside the reference: how each model fails, not only how often."""
    rows = []
    for tenant, task in tasks.items():
        for target, mode, label in WRONG_TARGETS:
            wrong = [r for r in (_eval(results, target, task, mode) or {}).get("items", []) if not r["correct"]]
            for r in wrong[:WRONG_SHOWN]:
                got = r["prediction"] if r.get("error") is None else f"error: {r['error']}"
                rows.append([f"{tenant}/{task_label(task)}", label, _cut(r.get("input"), 60), _cut(r["reference"], 40),
                             _cut(got, 50)])  # fmt: skip
    return ["tenant/task", "model", "input", "reference", "prediction"], rows


def diagnostics(results: dict, tasks: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """Per model and task: accuracy per answer field, the majority baseline beside it, and any collapse warning
    (lorafleet.core.diagnose): a model that answers the majority class every time is named, not averaged away."""
    rows = []
    for tenant, task in tasks.items():
        for target, mode, label in WRONG_TARGETS:
            items = (_eval(results, target, task, mode) or {}).get("items") or []
            if not items:
                continue
            d = diagnose([r["prediction"] or "" for r in items], [r["reference"] for r in items])
            per_field = ", ".join(f"{f.name} {_pct(f.accuracy)}" for f in d.fields[:FIELDS_SHOWN])
            rows.append([f"{tenant}/{task_label(task)}", label, per_field, _pct(d.majority_share),
                         "; ".join(d.warnings) or "-"])  # fmt: skip
    return ["tenant/task", "model", "accuracy per field", "majority baseline", "warnings"], rows


def _data_table(tasks: dict[str, str], data: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["tenant", "task", "train", "eval", "eval inputs also in train", "answers (train)", "majority class"]
    rows = []
    for tenant, task in tasks.items():
        d = data.get(task)
        if d:
            maj = d.get("majority") or {}
            rows.append([tenant, task_label(task), str(d["train_n"]), str(d["eval_n"]),
                         f"{d['identical']} identical + {d['near']} near ({100 * d['overlap_share']:.1f} %)",
                         f"{d['distinct']['train']} distinct", f"{_pct(maj.get('accuracy'))} ({_cut(maj.get('answer'), 30)})"])  # fmt: skip
    return headers, rows


def plot_curve(points: list[tuple], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o")
    ax.set_xlabel("training examples")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(acc: list[dict], path: Path) -> None:
    plt = _plt()
    series = [("fine-tuned small", "lora"), ("small zero-shot", "small_zero"), ("small 3-shot", "small_few"),
              ("generalist 3-shot", "generalist_few")]  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(series)
    for i, (label, key) in enumerate(series):
        xs = [j + i * width for j in range(len(acc))]
        ax.bar(xs, [100 * (r[key] or 0) for r in acc], width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(acc))], [f"{r['tenant']}\n{r['task']}" for r in acc])
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Task accuracy per tenant")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_demo_report(
    run_dir: Path,
    plan,
    tasks: dict[str, str],
    training: dict,
    curve: dict,
    results: dict,
    timings: dict,
    data: dict | None = None,
) -> str:
    """The demo's (and a prove run's) report.md/.html; `tasks` maps each tenant to its task, `data` each task to its
    data report (train.tasks.checks)."""
    acc = accuracy_rows(results, tasks, data)
    plot_accuracy(acc, run_dir / "accuracy.png")
    bench_dir = Path(results["config"].get("output_dir") or run_dir / "bench")
    plots = [("accuracy.png", "Task accuracy per tenant")]
    for file, title in (("cost_vs_accuracy.png", "Cost vs accuracy"), ("latency_cdf.png", "Latency distributions"),
                        ("throughput_vs_load.png", "Throughput and TTFT vs load")):  # fmt: skip
        if (bench_dir / file).is_file():
            shutil.copy(bench_dir / file, run_dir / file)
            plots.append((file, title))
    points = curve_points(results, training, curve)
    if len(points) > 1:
        plot_curve(points, run_dir / "learning_curve.png")
        plots.append(("learning_curve.png", "Learning curve: held-out accuracy vs training examples"))

    small, generalist = model_label(plan.small), model_label(plan.generalist)
    found = claims(acc, results, training, plan.small, plan.generalist)
    if needed := examples_needed(points):
        found.append(f"{needed} (learning curve of {task_label(plan.curve_task)})")
    title = getattr(plan, "title", "lorafleet demo")
    blocks: list[tuple] = [("h1", f"{title}: fine-tuned {small} specialists vs the {generalist} generalist")]
    price = f"Hardware price for every self-hosted target: ${plan.usd_per_hour}/hour (the whole machine; targets are "
    price += "measured one at a time)." + (" Quick mode: smaller data, shorter load steps." if plan.quick else "")
    blocks.append(("p", price))
    blocks += [("h2", "Claims"), *(("p", "- " + c) for c in found)]
    blocks += [("h2", "Accuracy (held-out split, through the gateway)"), ("table", *_accuracy_table(acc))]
    blocks += [("h2", "Answers that went wrong (a few per model)"), ("table", *wrong_answers(results, tasks))]
    blocks += [("h2", "Diagnostics (per answer field; the majority baseline; collapse)"),
               ("table", *diagnostics(results, tasks))]  # fmt: skip
    if data:
        blocks += [("h2", "Data checks"), ("table", *_data_table(tasks, data))]
    blocks += [("h2", "Latency and cost at the SLO (goodput)"), ("table", *_cost_table(results, plan.usd_per_hour))]
    blocks += [("h2", "Training"), ("table", *_training_table(training))]
    if len(points) > 1:
        rows = [[str(n), _pct(a), _s(t)] for n, a, t in points]
        blocks += [
            ("h2", f"Learning curve ({task_label(plan.curve_task)})"),
            ("table", ["examples", "accuracy", "train time"], rows),
        ]
    blocks += [("h2", "Step timings"), ("table", ["step", "seconds"], [[k, f"{v:.0f}"] for k, v in timings.items()])]
    blocks += [("h2", title) if i == 0 else ("img", file, title) for file, title in plots for i in range(2)]
    blocks.append(("p", f"Raw per-request timings: {bench_dir / 'results.json'}; harness report: "
                        f"{bench_dir / 'report.md'}."))  # fmt: skip
    (run_dir / "report.md").write_text(to_markdown(blocks))
    (run_dir / "report.html").write_text(to_html(blocks, run_dir, title))
    summary = [("h2", "Claims"), *(("p", "- " + c) for c in found)]
    return to_markdown([("table", *_accuracy_table(acc)), ("table", *_cost_table(results, plan.usd_per_hour)),
                        *summary])  # fmt: skip
