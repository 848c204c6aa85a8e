from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from loadtest.config import ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[2] / "loadtest" / "examples" / "bench.yaml"

BASE = {
    "targets": [
        {"name": "a", "base_url": "http://127.0.0.1:8080/v1", "model": "m", "price": {"usd_per_hour": 1}},
        {"name": "b", "base_url": "http://h:1/v1", "model": "m", "api": "completions", "price": {"usd_per_hour": 1}},
    ],
    "load": {"mode": "closed", "concurrency": 2, "num_requests": 10},
}


def test_example_config_is_valid():
    cfg = load_config(EXAMPLE)
    names = [t.name for t in cfg.targets]
    assert names == ["smollm2-lora", "gemma-generalist"]
    assert cfg.targets[0].mix() == {"manifest": 0.7, "contract": 0.2, "drugs": 0.1}
    assert cfg.targets[1].api == "completions"
    assert cfg.load.steps() == [0.5, 1.0, 2.0, 4.0]


@pytest.mark.parametrize(
    "path, value, field, hint",
    [
        (("targets", 0, "price"), {"usd_per_hour": 1, "usd_per_1m_input": 1}, "targets.0.price", "not both"),
        (("targets", 0, "price"), {"usd_per_1m_input": 1}, "targets.0.price", "both"),
        (("targets", 0, "base_url"), "127.0.0.1:8080", "targets.0.base_url", "http"),
        (("targets", 0, "name"), "a b", "targets.0.name", "letters"),
        (("targets", 0, "adapters"), {"x": 0}, "targets.0.adapters", "> 0"),
        (("load", "duraton_s"), 5, "load.duraton_s", "unknown field; valid keys: mode, rate"),
        (("load", "duration_s"), 5, "load", "exactly one of duration_s or num_requests"),
        (("load", "mode"), "open", "load", "needs `rate`"),
        (("load", "sweep"), [4, 2], "load", "ascending"),
        (("load", "sweep"), [1.5, 2], "load", "whole numbers"),
        (("slo", "ttft_p90_s"), -1, "slo.ttft_p90_s", "must be > 0, got -1"),
        (("quality",), {"evals": [{"target": "nope", "task": "x"}]}, "quality.evals.0.target", "no target named"),
        (("prompts",), {"source": "task"}, "prompts", "needs `task`"),
        (
            ("quality",),
            {"evals": [{"target": "b", "task": "x", "mode": "few_shot_chat"}]},
            "quality.evals.0.mode",
            "few_shot_completion",
        ),
    ],
)
def test_errors_name_the_field(path, value, field, hint):
    data = copy.deepcopy(BASE)
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert f"{field}:" in str(e.value)
    assert hint in str(e.value)


def test_duplicate_target_names_rejected():
    data = copy.deepcopy(BASE)
    data["targets"].append(copy.deepcopy(data["targets"][0]))
    with pytest.raises(ConfigError, match="unique"):
        parse_config(data)


@pytest.mark.parametrize(
    "override, check",
    [
        ("load.concurrency=8", lambda c: c.load.concurrency == 8),
        ("load.sweep=[1,2,4]", lambda c: c.load.steps() == [1, 2, 4]),
        ("targets.0.price.usd_per_hour=2.5", lambda c: c.targets[0].price.usd_per_hour == 2.5),
        ("targets.a.model=other", lambda c: c.targets[0].model == "other"),  # a list item by its name
        ("slo.ttft_p90_s=0.5", lambda c: c.slo.ttft_p90_s == 0.5),
    ],
)
def test_overrides(override, check):
    assert check(parse_config(copy.deepcopy(BASE), [override]))


@pytest.mark.parametrize("override", ["load.concurrency", "targets.zz.model=x", "load.concurrency=0"])
def test_bad_overrides_are_config_errors(override):
    with pytest.raises(ConfigError):
        parse_config(copy.deepcopy(BASE), [override])


def test_load_config_reports_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("targets: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_api_key_env(monkeypatch, tmp_path):
    data = copy.deepcopy(BASE)
    data["targets"][0]["api_key_env"] = "LF_TEST_KEY"
    data["targets"][0]["model_keys"] = {"m2": "k2"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.delenv("LF_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="LF_TEST_KEY is not set"):
        load_config(path)
    monkeypatch.setenv("LF_TEST_KEY", "secret")
    target = load_config(path).targets[0]
    assert (target.key("m"), target.key("m2")) == ("secret", "k2")
