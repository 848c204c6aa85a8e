"""Report files, the printed summary, `bench compare`, and the `bench run` command end to end (fake server)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from loadtest.fake_openai import FakeServer, FakeSettings
from lorafleet.cli import main
from lorafleet.cli.bench import run_and_report

from .conftest import MODELS, answer_three_of_four, fake_get_task, make_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    """One run shared by the tests that read its files; its fake is private to this module."""
    with FakeServer(FakeSettings(models=list(MODELS), answer=answer_three_of_four)) as fake:
        return _run(fake, tmp_path_factory.mktemp("report"))


def _run(fake, tmp_path):
    cfg = make_config(
        fake.base_url,
        # Near-even arrivals (burstiness 50): 12 Poisson gaps vary too much to be sure the sweep's 2nd step runs.
        {"mode": "open", "sweep": [20, 40], "burstiness": 50, "num_requests": 12, "force_output_len": True},
        target={"adapters": {"manifest": 0.5, "contract": 0.5}},
        slo={"ttft_p90_s": 5.0},
        quality={
            "n": 8,
            "evals": [
                {"target": "t1", "model": "manifest", "task": "echo"},
                {"target": "t1", "model": "contract", "task": "echo", "mode": "few_shot_chat", "k": 1},
                {"target": "t1", "model": "drugs", "task": "echo", "mode": "few_shot_completion", "k": 1},
            ],
        },
        extra_targets=[
            {
                "name": "remote",
                "base_url": fake.base_url,
                "model": "base-model",
                "api_key": "sk-secret",
                "price": {"usd_per_1m_input": 0.15, "usd_per_1m_output": 0.6},
            }
        ],
    )
    out = tmp_path / "run"
    results, interrupted = run_and_report(cfg, out, progress=False, get_task=fake_get_task)
    assert not interrupted
    return out


def test_report_files_are_written(results_dir):
    for name in ("results.json", "report.md", "report.html", "latency_cdf.png", "throughput_vs_load.png"):
        assert (results_dir / name).stat().st_size > 0, name
    assert (results_dir / "cost_vs_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    html = (results_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # self-contained
    md = (results_dir / "report.md").read_text()
    assert "![Latency distributions](latency_cdf.png)" in md and "| t1 | manifest |" in md


def test_results_json_holds_raw_timings_steps_cost_and_quality(results_dir):
    r = json.loads((results_dir / "results.json").read_text())
    steps = r["targets"]["t1"]["steps"]
    assert [s["load"] for s in steps] == [20, 40]
    rec = steps[0]["records"][0]
    for key in ("scheduled", "sent", "queue_delay", "ttft", "itl", "tpot", "e2e", "output_tokens", "prompt_tokens"):
        assert key in rec
    assert r["targets"]["t1"]["cost"]["basis"] == "self_hosted"
    assert r["targets"]["remote"]["cost"]["usd_per_1m_blended"] == pytest.approx(0.2625)
    assert [q["accuracy"] for q in r["quality"]] == [0.75, 0.75, 0.75]
    assert r["config"]["targets"][1]["api_key"] == "***"  # keys never land in results
    assert "sk-secret" not in (results_dir / "results.json").read_text()


def test_summary_rows_per_target_and_adapter(results_dir):
    r = json.loads((results_dir / "results.json").read_text())
    rows = {(row["target"], row["model"]): row for row in r["summary"]}
    assert set(rows) == {
        ("t1", "*"),
        ("t1", "manifest"),
        ("t1", "contract"),
        ("t1", "drugs"),
        ("remote", "base-model"),
    }
    assert rows[("t1", "manifest")]["accuracy"] == [0.75] and rows[("t1", "*")]["accuracy"] == []
    # drugs was evaluated but not in the load mix: a row with accuracy and cost, no load figures.
    drugs = rows[("t1", "drugs")]
    assert drugs["load"] is None and drugs["accuracy"] == [0.75] and drugs["usd_per_1k_correct"][0] > 0
    assert rows[("t1", "*")]["output_tok_per_s"] == pytest.approx(
        rows[("t1", "manifest")]["output_tok_per_s"] + rows[("t1", "contract")]["output_tok_per_s"]
    )
    assert rows[("remote", "base-model")]["usd_per_1m_output"] == 0.6


def _write_variant(src: Path, dst: Path, scale_tps: float = 1.0, ttft_scale: float = 1.0, acc: float | None = None):
    data = json.loads((src / "results.json").read_text())
    data = copy.deepcopy(data)
    for row in data["summary"]:
        if row["output_tok_per_s"] is not None:
            row["output_tok_per_s"] *= scale_tps
            row["ttft_p50_s"] *= ttft_scale
    if acc is not None:
        data["quality"][0]["accuracy"] = acc
    dst.mkdir()
    (dst / "results.json").write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize(
    "change, threshold, code",
    [
        ({}, "5%", 0),
        ({"scale_tps": 0.97}, "5%", 0),  # 3% slower: within 5%
        ({"scale_tps": 0.90}, "5%", 1),  # 10% slower
        ({"scale_tps": 0.90}, "0.2", 0),
        ({"scale_tps": 1.5}, "5%", 0),  # faster is not a regression
        ({"ttft_scale": 1.2}, "5%", 1),  # TTFT up 20%
        ({"acc": 0.5}, "5%", 1),  # accuracy down
    ],
)
def test_compare_exit_code(results_dir, tmp_path, capsys, change, threshold, code):
    new = _write_variant(results_dir, tmp_path / "new", **change)
    assert (
        main(["bench", "compare", str(results_dir), str(new / "results.json"), "--max-regression", threshold]) == code
    )
    out = capsys.readouterr().out
    assert ("REGRESSED" in out) == (code == 1)
    assert "t1/manifest" in out


def test_compare_fails_when_a_target_is_missing(results_dir, tmp_path):
    data = json.loads((results_dir / "results.json").read_text())
    data["summary"] = [r for r in data["summary"] if r["target"] != "remote"]
    (tmp_path / "new.json").write_text(json.dumps(data))
    assert main(["bench", "compare", str(results_dir), str(tmp_path / "new.json")]) == 1


def test_compare_bad_input_is_a_user_error(tmp_path, capsys):
    assert main(["bench", "compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "not found" in capsys.readouterr().err


def _config_file(tmp_path: Path, base_url: str, **load) -> Path:
    cfg = {
        "targets": [{"name": "fakey", "base_url": base_url, "model": "manifest", "price": {"usd_per_hour": 0.1}}],
        "load": {"mode": "closed", "concurrency": 2, "num_requests": 6, "max_tokens": 8, **load},
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_bench_run_command(fake, tmp_path, capsys):
    path = _config_file(tmp_path, fake.base_url)
    out = tmp_path / "out"
    assert main(["bench", "run", str(path), "load.concurrency=3", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "fakey" in printed and "$/1M blended" in printed
    assert json.loads((out / "results.json").read_text())["config"]["load"]["concurrency"] == 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("targets.0.model=legal", "target 'fakey'"),
        ("targets.0.base_url=http://127.0.0.1:9/v1", "target 'fakey'"),
        ("load.concurrency=-1", "load.concurrency"),
    ],
)
def test_bench_run_fails_before_the_run_naming_the_problem(fake, tmp_path, capsys, override, message):
    path = _config_file(tmp_path, fake.base_url)
    out = tmp_path / "out"
    assert main(["bench", "run", str(path), override, "--out", str(out), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and fake.app.bodies == []


@pytest.mark.slow
def test_ctrl_c_writes_partial_results(fake, tmp_path):
    fake.settings.ttft_s = 0.05
    path = _config_file(tmp_path, fake.base_url, num_requests=None, duration_s=120)
    out = tmp_path / "out"
    args = ["bench", "run", str(path), "--out", str(out), "--no-progress"]
    # A test run started in the background (`make test &`) inherits SIGINT ignored, and so would the child: give it
    # Ctrl-C back, as a terminal would, before it runs `lorafleet bench run`.
    ctrl_c_on = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); from lorafleet.cli import main"
    )
    cmd = [sys.executable, "-c", f"{ctrl_c_on}; sys.exit(main({args!r}))"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
    try:
        deadline = time.monotonic() + 60
        while len(fake.app.bodies) < 10 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr.decode()
    results = json.loads((out / "results.json").read_text())
    assert results["interrupted"] is True
    (step,) = results["targets"]["fakey"]["steps"]
    assert step["interrupted"] and step["ok"] >= 3  # 10 sent: 4 warm-up, 2 in flight when stopped
    assert "interrupted" in (out / "report.md").read_text()
