"""The harness and the locustfile against the real gateway over real vLLM (CPU): figures must be real, not empty."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import LIVE_ADAPTERS, LIVE_KEYS, ROOT, live_bench_config

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_bench_run_with_two_targets_through_gateway(live_gateway, tmp_path):
    cfg = live_bench_config(live_gateway.url, tmp_path / "out", requests=16)
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "lorafleet.cli", "bench", "run", str(tmp_path / "bench.yaml")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    for name in ("live-mix", "live-base"):
        step = results["targets"][name]["steps"][0]
        assert step["errors"] == 0
        assert step["output_tok_per_s"] > 0 and step["ttft"]["p50"] > 0
        assert results["targets"][name]["cost"]["usd_per_1m_output"] > 0
    mix = results["targets"]["live-mix"]["steps"][0]["per_model"]
    assert set(mix) == set(LIVE_ADAPTERS.values())  # both tenants' adapters were served and broken down
    for f in ("report.md", "report.html", "latency_cdf.png"):
        assert (out / f).stat().st_size > 0
    assert "live-mix" in done.stdout  # the summary table is printed at the end


def test_headless_locust_against_gateway_has_no_failures(live_gateway, tmp_path):
    env = {
        **os.environ,
        "LORAFLEET_LOCUST_MIX": ",".join(f"{LIVE_KEYS[t]}:{LIVE_ADAPTERS[t]}:1" for t in LIVE_KEYS),
        "LORAFLEET_MAX_TOKENS": "16",
        "LORAFLEET_FORCE_OUTPUT_LEN": "1",
        # short prompts: on a slow day 4 LoRA prefills of the default 128 words took longer than the 20 s run
        "LORAFLEET_INPUT_WORDS": "16",
    }
    cmd = [str(ROOT / ".venv" / "bin" / "locust"), "-f", "loadtest/locustfile.py", "--headless", "-u", "4", "-r", "2"]
    cmd += ["-t", "20s", "--host", live_gateway.url, "--csv", str(tmp_path / "run"), "--loglevel", "WARNING"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "run_stats.csv") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    total = rows[("", "Aggregated")]
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0
    assert int(rows[("METRIC", "time_to_first_token")]["Request Count"]) > 0
