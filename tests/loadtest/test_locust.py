"""The locustfile, run headless by the real `locust` command against the fake server."""

from __future__ import annotations

import csv
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from loadtest.locust_env import parse_mix, settings_from_env

ROOT = Path(__file__).resolve().parents[2]
LOCUST = ROOT / ".venv" / "bin" / "locust"


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "acme-key:manifest:0.7,globex-key:contract:0.3",
            [("acme-key", "manifest", 0.7), ("globex-key", "contract", 0.3)],
        ),
        ("k:m", [("k", "m", 1.0)]),
        (":m:2", [("", "m", 2.0)]),
        ("", []),
    ],
)
def test_parse_mix(text, expected):
    assert parse_mix(text) == expected


@pytest.mark.parametrize("text", ["acme-key", "k::1", "k:m:0", "a:b:c:d"])
def test_parse_mix_rejects_bad_items(text):
    with pytest.raises(ValueError, match="LORAFLEET_LOCUST_MIX"):
        parse_mix(text)


@pytest.mark.slow
def test_headless_locust_run(fake, tmp_path):
    fake.settings.ttft_s, fake.settings.itl_s, fake.settings.api_key = 0.02, 0.005, "acme-key"
    env = {
        **os.environ,
        "LORAFLEET_LOCUST_MIX": "acme-key:manifest:0.7,acme-key:contract:0.3",
        "LORAFLEET_MAX_TOKENS": "16",
        "LORAFLEET_FORCE_OUTPUT_LEN": "1",
    }
    cmd = [str(LOCUST), "-f", "loadtest/locustfile.py", "--headless", "-u", "4", "-r", "2", "-t", "5s"]
    cmd += ["--host", f"http://127.0.0.1:{fake.port}", "--csv", str(tmp_path / "run"), "--loglevel", "WARNING"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "run_stats.csv") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    ttft = rows[("METRIC", "time_to_first_token")]
    assert int(ttft["Request Count"]) > 0
    assert float(ttft["Min Response Time"]) >= 15  # the fake waits 20 ms before the first token
    assert ("METRIC", "inter_token_latency") in rows and ("POST", "chat manifest") in rows
    assert float(rows[("POST", "chat manifest")]["Average Content Size"]) == 16  # tokens from usage
    assert rows[("", "Aggregated")]["Failure Count"] == "0"
    assert {b["model"] for b in fake.app.bodies} == {"manifest", "contract"}
    assert all(b["ignore_eos"] for b in fake.app.bodies)


def test_settings_from_env():
    s = settings_from_env(
        {"LORAFLEET_LOCUST_MIX": "a:m1:3,b:m2", "LORAFLEET_MAX_TOKENS": "32", "LORAFLEET_FORCE_OUTPUT_LEN": "1"}
    )
    assert s.mix == [("a", "m1", 3.0), ("b", "m2", 1.0)]
    assert (s.max_tokens, s.force_output_len, s.wait_s) == (32, True, 0.0)
    default = settings_from_env({"LORAFLEET_API_KEY": "k", "LORAFLEET_MODEL": "m"})
    assert default.mix == [("k", "m", 1.0)] and not default.force_output_len


@pytest.mark.slow
def test_web_ui_run(fake):
    """The same locustfile driven through the web UI's HTTP API (what a user's clicks send)."""
    from tests.conftest import free_port

    port = free_port()
    env = {**os.environ, "LORAFLEET_LOCUST_MIX": ":manifest", "LORAFLEET_MAX_TOKENS": "8"}
    cmd = [str(LOCUST), "-f", "loadtest/locustfile.py", "--web-host", "127.0.0.1", "--web-port", str(port)]
    cmd += ["--host", f"http://127.0.0.1:{fake.port}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ui = f"http://127.0.0.1:{port}"
    try:
        _poll(lambda: httpx.get(ui + "/").status_code == 200)
        started = httpx.post(
            ui + "/swarm", data={"user_count": 2, "spawn_rate": 2, "host": f"http://127.0.0.1:{fake.port}"}
        )
        assert started.json()["success"]

        def ttft_rows():
            stats = httpx.get(ui + "/stats/requests").json()["stats"]
            return [s for s in stats if s["name"] == "time_to_first_token" and s["num_requests"] > 0]

        _poll(lambda: bool(ttft_rows()))
        stats = httpx.get(ui + "/stats/requests").json()["stats"]
        assert next(s for s in stats if s["name"] == "Aggregated")["num_failures"] == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _poll(cond, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("condition not met in time")
