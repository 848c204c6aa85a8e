"""The demo's wiring: the configs it generates are valid for serve and bench, and the report's verdicts are right."""

from __future__ import annotations

import pytest
import yaml

from loadtest.config import parse_config as parse_bench
from lorafleet.cli import main
from lorafleet.demo.report import accuracy_rows, claims, curve_points, write_demo_report
from lorafleet.demo.run import TENANTS, DemoPlan, adapter_key, bench_config, serve_config
from lorafleet.stack import write_config
from serve.config import parse_config as parse_serve
from serve.engines.deploy import gpu_count
from train.config import load_config


def test_generated_serve_config_is_valid_and_adds_the_merged_adapter():
    cfg = serve_config(DemoPlan())  # parse_config has checked it
    modes = {a.name: a.mode for a in cfg.adapters}
    curve = {f"contract-n{n}": "lora" for n in DemoPlan().curve_sizes}
    assert modes == {"manifest": "lora", "contract": "lora", "drugs": "lora", "manifest-merged": "merged", **curve}
    acme = next(t for t in cfg.tenants if t.name == "acme")
    assert "manifest-merged" in acme.models and "contract" not in acme.models
    globex = next(t for t in cfg.tenants if t.name == "globex")
    assert set(curve) <= set(globex.models)
    # on CPU every engine skips the torch.compile warm-up, so all are measured eager like the LoRA engine
    want = [] if gpu_count() else ["--optimization-level", "0"]
    assert all(e.extra_args == want for e in cfg.engines)


def test_quick_adapters_live_apart_from_the_full_ones_under_the_same_names(tmp_path):
    full, quick = serve_config(DemoPlan()), serve_config(DemoPlan.make(quick=True))
    assert {a.name: a.path for a in full.adapters}["manifest-merged"] == "manifest"
    paths = {a.name: a.path for a in quick.adapters}
    assert paths == {"manifest": "quick-manifest", "contract": "quick-contract", "drugs": "quick-drugs"}
    bench = parse_bench(bench_config(DemoPlan.make(quick=True), "http://127.0.0.1:8080", tmp_path / "out"))
    assert "manifest-merged" not in {t.name for t in bench.targets}  # no merged engine to measure in quick mode


def test_models_option_renames_everything_consistently(tmp_path):
    small, big = tmp_path / "llama-8b", tmp_path / "llama-70b"
    plan = DemoPlan(small=str(small), generalist=str(big))
    cfg = serve_config(plan)
    assert [e.public_name for e in cfg.engines] == ["llama-8b", "llama-70b"]
    assert {a.base for a in cfg.adapters} == {"llama-8b"}
    bench = parse_bench(bench_config(plan, "http://127.0.0.1:8080", tmp_path / "out"))
    assert {t.name: t.model for t in bench.targets}["generalist"] == "llama-70b"


def test_the_config_file_the_gateway_process_reads_is_the_same_config(tmp_path):
    cfg = serve_config(DemoPlan())
    path = write_config(cfg, tmp_path / "serve.yaml")
    assert parse_serve(yaml.safe_load(path.read_text())) == cfg


def test_generated_bench_config_scores_every_tenant_against_every_baseline(tmp_path):
    cfg = parse_bench(bench_config(DemoPlan(), "http://127.0.0.1:8080", tmp_path / "out"))
    pairs = {(e.target, e.task, e.mode) for e in cfg.quality.evals}
    for task, _ in TENANTS.values():
        for target, mode in [("specialists-lora", "zero_shot"), ("small-base", "zero_shot"),
                             ("small-base", "few_shot_chat"), ("generalist", "few_shot_completion")]:  # fmt: skip
            assert (target, task, mode) in pairs
    assert cfg.load.force_output_len and cfg.slo.is_set()
    # forced lengths started together run in lockstep: the demo staggers its workers and measures after the ramp
    assert cfg.load.mode == "closed" and cfg.load.ramp_up_s > 0 and cfg.load.duration_s


def _results(lora_acc: float, gen_acc: float, lora_cost: float, gen_cost: float) -> dict:
    quality = []
    for task, _ in TENANTS.values():
        quality += [
            {"target": "specialists-lora", "model": task, "task": task, "mode": "zero_shot", "accuracy": lora_acc},
            {"target": "generalist", "model": "g", "task": task, "mode": "few_shot_completion", "accuracy": gen_acc},
        ]
    step = {"index": 0, "output_tok_per_s": 100.0, "ttft": {"p50": 0.5, "p90": 1.0}, "e2e": {"p50": 2.0}, "ok": 10,
            "input_tokens": 2_260}  # fmt: skip

    def target(cost):
        return {"steps": [step], "cost": {"usd_per_1m_output": cost, "operating_step": 0, "slo_met": True}}

    return {
        "config": {},
        "quality": quality,
        "targets": {
            "specialists-lora": target(lora_cost),
            "manifest-merged": target(lora_cost / 2),
            "generalist": target(gen_cost),
        },  # fmt: skip
    }


@pytest.mark.parametrize(
    "lora_acc, gen_acc, lora_cost, accuracy_verdict, cost_verdict",
    [(0.9, 0.5, 0.5, "HOLDS", "HOLDS"), (0.6, 0.5, 0.7, "DOES NOT HOLD", "DOES NOT HOLD")],
)
def test_claims_say_plainly_whether_each_holds(lora_acc, gen_acc, lora_cost, accuracy_verdict, cost_verdict):
    results = _results(lora_acc, gen_acc, lora_cost, gen_cost=1.0)
    training = {t: {"params": {"trainable": 2_442_240, "share": 0.0178}, "config": {"r": 16, "top_layers": 15}}
                for t, _ in TENANTS.values()}  # fmt: skip
    lines = claims(accuracy_rows(results, {n: t for n, (t, _) in TENANTS.items()}), results, training, "smol", "gen")
    acc_lines = [line for line in lines if line.startswith("Accuracy")]
    assert len(acc_lines) == 3 and all(accuracy_verdict in line for line in acc_lines)
    lora_line = next(line for line in lines if line.startswith("Cost (LoRA"))
    assert f"{lora_cost:.2f}x" in lora_line and lora_line.endswith(f"{cost_verdict}.")
    assert any("1.78 %" in line and "r=16 on the top 15 layers" in line and "HOLDS" in line for line in lines)


def test_report_files_written(tmp_path):
    results = _results(0.9, 0.5, 0.5, 1.0)
    training = {t: {"config": {"n": 600}, "params": {"trainable": 1, "share": 0.01}, "metrics": {}}
                for t, _ in TENANTS.values()}  # fmt: skip
    summary = write_demo_report(
        tmp_path,
        DemoPlan(),
        {"acme": "manifest", "globex": "contract", "initech": "drugs"},
        training,
        {},
        results,
        {"train adapters": 12.0},
    )
    assert "HOLDS" in summary
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    md = (tmp_path / "report.md").read_text()
    assert "## Claims" in md and "+40 pts" in md
    assert "| prompt tokens/req |" in md and "| 100 | 226 |" in md  # beside output tok/s: mixes differ in prompts
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()


def test_learning_curve_points_join_curve_adapters_with_the_full_one(tmp_path):
    results = _results(0.9, 0.5, 0.5, 1.0)
    results["quality"].append({"target": "small-base", "task": "contract", "mode": "zero_shot", "accuracy": 0.0})
    results["curve_quality"] = [
        {"model": "contract-n50", "accuracy": 0.4},
        {"model": "contract-n100", "accuracy": 0.7},
    ]
    curve = {n: {"config": {"task": "contract", "name": f"contract-n{n}", "n": n}, "metrics": {"train_seconds": n}}
             for n in (50, 100)}  # fmt: skip
    training = {"contract": {"config": {"task": "contract", "n": 500}, "metrics": {"train_seconds": 500.0}}}
    assert curve_points(results, training, curve) == [(0, 0.0, 0.0), (50, 0.4, 50), (100, 0.7, 100), (500, 0.9, 500.0)]


def test_report_renders_the_learning_curve_and_names_the_plans_models(tmp_path):
    """The curve table once never rendered (it read `points` from a dict keyed by size); the names were fixed."""
    results = _results(0.9, 0.5, 0.5, 1.0)
    results["quality"].append({"target": "small-base", "task": "contract", "mode": "zero_shot", "accuracy": 0.0})
    results["curve_quality"] = [{"model": "contract-n50", "accuracy": 0.4}]
    curve = {50: {"config": {"task": "contract", "name": "contract-n50", "n": 50}, "metrics": {"train_seconds": 5}}}
    training = {t: {"config": {"task": t, "n": 500}, "params": {"trainable": 1, "share": 0.01}, "metrics": {}}
                for t, _ in TENANTS.values()}  # fmt: skip
    plan = DemoPlan(small="/models/my-small-8b", generalist="big-generalist-70b")
    write_demo_report(tmp_path, plan, {n: t for n, (t, _) in TENANTS.items()}, training, curve, results, {})
    md = (tmp_path / "report.md").read_text()
    table = md.split("## Learning curve (contract)")[1].split("##")[0]
    rows = [line.split(" | ")[:2] for line in table.splitlines() if line[2:3].isdigit()]
    assert rows == [["| 0", "0 %"], ["| 50", "40 %"], ["| 500", "90 %"]]
    assert "my-small-8b" in md and "big-generalist-70b" in md
    assert "SmolLM2" not in md and "Gemma" not in md


def test_models_option_needs_two_models(capsys):
    assert main(["demo", "--models", "only-one"]) == 2
    assert "SMALL,GENERALIST" in capsys.readouterr().err


def test_demo_registered_in_cli_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "demo" in capsys.readouterr().out


def test_adapter_key_ignores_how_a_run_is_watched_but_not_what_it_trains():
    base = {"base_model": "tiny-random-llama", "task": "contract", "n": 50}
    key = adapter_key(load_config(None, base))
    assert adapter_key(load_config(None, base | {"eval_every": 7, "progress": False})) == key
    assert adapter_key(load_config(None, base | {"lr": 5e-4})) != key
    assert adapter_key(load_config(None, base | {"n": 51})) != key
