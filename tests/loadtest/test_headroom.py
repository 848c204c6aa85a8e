"""The headroom benchmark command runs end to end (the figure itself is printed, not asserted: machines vary)."""

from __future__ import annotations

import pytest

from loadtest.headroom import headroom


@pytest.mark.slow
def test_headroom_prints_its_figures(capsys):
    result = headroom(seconds=1.0, concurrency=8, rate=50)
    out = capsys.readouterr().out
    assert "req/s sustained" in out and "open loop at 50 req/s" in out
    assert result["closed"]["ok"] > 0 and result["closed"]["errors"] == 0
    assert result["open"]["ok"] > 0
