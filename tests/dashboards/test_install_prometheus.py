"""scripts/install_prometheus.sh does nothing when Prometheus is already installed."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.dashboards.conftest import require

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install_prometheus.sh"


def test_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_second_run_is_a_no_op():
    require("prometheus")
    require("promtool")
    r = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "prometheus present" in r.stdout and "installing" not in r.stdout
