"""The benchmark commands' edges (their measurements start engines and are run by hand, never timed in tests)."""

from __future__ import annotations

import pytest

from lorafleet.benches import lora_cost


def test_lora_cost_refuses_folders_that_are_not_adapters_before_starting_anything(tmp_path, monkeypatch):
    def no_engines(*args, **kwargs):
        raise AssertionError("started engines for a bad --adapters")

    monkeypatch.setattr(lora_cost, "running_stack", no_engines)
    with pytest.raises(SystemExit, match=r"not PEFT adapter folders \(no adapter_config.json\): .*not-an-adapter"):
        lora_cost.main(["--adapters", str(tmp_path / "not-an-adapter")])
