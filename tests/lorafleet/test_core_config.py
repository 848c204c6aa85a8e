"""lorafleet.core.config: the one override syntax, the one Price, errors that name the field, YAML errors."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from lorafleet.core.config import (
    KnownPrice,
    Price,
    Strict,
    TokenPrice,
    apply_overrides,
    load_yaml,
    parse_override,
    parse_overrides,
)
from lorafleet.core.errors import ConfigError

# ---------------------------------------------------------------- override values


@pytest.mark.parametrize(
    "item, key, value",
    [
        ("epochs=2", "epochs", 2),
        ("lr=2e-3", "lr", 2e-3),  # YAML 1.2 float: PyYAML alone would give the text '2e-3'
        ("lr=5E-4", "lr", 5e-4),
        ("rate=0.5", "rate", 0.5),
        ("top_layers=null", "top_layers", None),
        ("top_layers=", "top_layers", None),
        ("progress=false", "progress", False),
        ("progress=no", "progress", "no"),  # YAML 1.2: a word; a bool field reads it as false
        ("name=On", "name", "On"),
        ("bf16=true", "bf16", True),
        ("sweep=[1, 2, 4]", "sweep", [1, 2, 4]),
        ("name='007'", "name", "007"),
        ("name=run-1", "name", "run-1"),
        ("base_url=http://127.0.0.1:8080/v1", "base_url", "http://127.0.0.1:8080/v1"),
        ("api_key=a=b", "api_key", "a=b"),  # only the first '=' splits
        (" adapters.acme =0.7", "adapters.acme", 0.7),
    ],
)
def test_override_values_are_read_as_yaml(item, key, value):
    assert parse_override(item) == (key, value)
    assert type(parse_override(item)[1]) is type(value)


@pytest.mark.parametrize(
    "item, message",
    [
        ("epochs", "expected key=value"),
        ("=3", "expected key=value"),
        ("load..rate=3", "expected key=value"),
        ("sweep=[1,", r"override sweep=\[1,: value is not valid YAML"),
    ],
)
def test_malformed_overrides_name_the_item(item, message):
    with pytest.raises(ConfigError, match=message):
        parse_override(item)


def test_a_key_given_twice_keeps_its_last_value():
    assert parse_overrides(["lr=1e-3", "epochs=2", "lr=3e-3"]) == {"lr": 3e-3, "epochs": 2}


# ---------------------------------------------------------------- override paths

DATA = {
    "lr": 1e-3,
    "load": {"rate": 1.0},
    "quality": None,
    "targets": [{"name": "a", "model": "m", "adapters": {"x": 1.0}}, {"name": "b", "model": "m"}],
}


@pytest.mark.parametrize(
    "items, expected",
    [
        (["lr=2e-3"], {"lr": 2e-3}),
        (["load.rate=4"], {"load": {"rate": 4}}),
        (["load.burstiness=0.5"], {"load": {"rate": 1.0, "burstiness": 0.5}}),
        (["quality.n=5"], {"quality": {"n": 5}}),  # a null section is created
        (["slo.ttft_p90_s=2"], {"slo": {"ttft_p90_s": 2}}),  # so is a missing one
        (["quality=null"], {"quality": None}),
        (["targets.1.model=other"], {"targets": [DATA["targets"][0], {"name": "b", "model": "other"}]}),
        (["targets.b.model=other"], {"targets": [DATA["targets"][0], {"name": "b", "model": "other"}]}),
        (
            ["targets.a.adapters.acme=0.7"],
            {"targets": [{"name": "a", "model": "m", "adapters": {"x": 1.0, "acme": 0.7}}, DATA["targets"][1]]},
        ),
        (["load={rate: 2, mode: open}"], {"load": {"rate": 2, "mode": "open"}}),
    ],
)
def test_overrides_set_dotted_paths(items, expected):
    out = apply_overrides(DATA, items)
    assert out == DATA | expected
    assert DATA["load"] == {"rate": 1.0} and DATA["quality"] is None  # the input is left as it was


def test_a_mapping_of_overrides_is_applied_like_strings():
    assert apply_overrides(DATA, {"load.rate": 4, "lr": "2e-3"}) == DATA | {"lr": "2e-3", "load": {"rate": 4}}
    assert apply_overrides(DATA, None) == DATA


@pytest.mark.parametrize(
    "item, message",
    [
        ("targets.c.model=x", r"override targets.c.model: targets.c matches no list item; .*0..1 or a name: a, b"),
        ("targets.2.model=x", "targets.2 matches no list item"),
        ("lr.x=1", r"override lr.x: lr is 0.001, not a section"),
        ("targets.a.model.x=1", r"targets.a.model is 'm', not a section"),
    ],
)
def test_override_path_errors_name_the_key(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(DATA, [item])


# ---------------------------------------------------------------- validation errors


class Inner(Strict):
    rate: float = Field(1.0, gt=0)
    mode: str = "closed"


class Outer(Strict):
    name: str
    items: list[Inner] = []
    table: dict[str, Inner] = {}
    inner: Inner | None = None
    price: KnownPrice | None = None


@pytest.mark.parametrize(
    "data, brackets, line",
    [
        ({}, False, "name: is required"),
        ({"name": "x", "items": [{}, {"rate": 0}]}, False, "items.1.rate: must be > 0, got 0"),
        ({"name": "x", "items": [{}, {"rate": 0}]}, True, "items[1].rate: must be > 0, got 0"),
        (
            {"name": "x", "items": [{"rat": 2}]},
            False,
            "items.0.rat: unknown field; valid keys: rate, mode (see ref.yaml)",
        ),
        ({"name": "x", "table": {"k": {"mdoe": 1}}}, False, "table.k.mdoe: unknown field; valid keys: rate, mode"),
        ({"name": "x", "inner": {"mdoe": 1}}, False, "inner.mdoe: unknown field; valid keys: rate, mode"),
        ({"name": "x", "nmae": 1}, False, "nmae: unknown field; valid keys: name, items, table, inner, price"),
        ({"name": "x", "items": "no"}, False, "items: must be a list, got 'no'"),
        ({"name": "x", "items": [{"rate": True}]}, False, "items.0.rate: must be a number, got True"),
        ({"name": "x", "price": {"input": 1}}, False, "price: give usd_per_hour (self-hosted), or both"),
        ({"name": "x", "price": {"usd_per_1m_input": 1, "input": 1}}, False, "price.input: given twice: input is"),
        (
            {"name": "x", "price": {"usd_per_hr": 1}},
            False,
            "price.usd_per_hr: unknown field; valid keys: usd_per_hour,",
        ),
    ],
)
def test_validation_errors_name_the_field_and_what_it_accepts(data, brackets, line):
    with pytest.raises(ConfigError) as e:
        Outer.parse(data, "c.yaml", brackets=brackets, reference="ref.yaml")
    header, *lines = str(e.value).splitlines()
    assert header == "c.yaml is invalid:"
    assert any(x.strip().startswith(line) for x in lines), str(e.value)


def test_numbers_are_taken_as_text():
    # YAML (a file or an override value) reads `name: 2024` as an int.
    assert Outer.parse({"name": 2024}, "c.yaml").name == "2024"


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as e:
        Outer.parse({"items": [{"rate": -1}], "x": 1}, "c")
    lines = str(e.value).splitlines()[1:]
    assert [ln.split(":")[0].strip() for ln in lines] == ["name", "items.0.rate", "x"]


def test_yaml_errors_point_at_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3:\d+: not valid YAML: .*flow sequence"):
        load_yaml(path)
    with pytest.raises(ConfigError, match=r"bench config .*nope\.yaml not found"):
        load_yaml(tmp_path / "nope.yaml", "bench config")
    path.write_text("a: [1, 2]\n")
    assert load_yaml(path) == {"a": [1, 2]}


# ---------------------------------------------------------------- Price


class Holder(BaseModel):
    known: KnownPrice | None = None
    token: TokenPrice | None = None


@pytest.mark.parametrize(
    "spec, hourly, input_, output",
    [
        ({"usd_per_hour": 0.1}, 0.1, None, None),
        ({"usd_per_1m_input": 0.15, "usd_per_1m_output": 0.6}, None, 0.15, 0.6),
        ({"input": 0.15, "output": 0.6}, None, 0.15, 0.6),  # serve's spelling
        ({"input": 0.15, "usd_per_1m_output": 0.6}, None, 0.15, 0.6),
        ({"input": 1.0}, None, 1.0, None),
        ({}, None, None, None),
    ],
)
def test_price_takes_both_spellings(spec, hourly, input_, output):
    p = Price.model_validate(spec)
    assert (p.usd_per_hour, p.usd_per_1m_input, p.usd_per_1m_output) == (hourly, input_, output)
    assert p.self_hosted is (hourly is not None)
    assert (p.input, p.output) == (input_ or 0.0, output or 0.0)


@pytest.mark.parametrize(
    "spec, prompt, completion, usd",
    [
        ({"input": 1.0, "output": 2.0}, 1_000_000, 500_000, 2.0),
        ({"usd_per_1m_input": 0.15, "usd_per_1m_output": 0.6}, 3000, 1000, 0.00105),
        ({"input": 3.0}, 1000, 10_000, 0.003),  # an unset side is free
        ({}, 10**6, 10**6, 0.0),
    ],
)
def test_price_cost_at_list_prices(spec, prompt, completion, usd):
    assert Price.model_validate(spec).cost(prompt, completion) == pytest.approx(usd)


def test_an_hourly_price_has_no_per_token_cost():
    with pytest.raises(ValueError, match="per-hour price"):
        Price(usd_per_hour=1.0).cost(10, 10)


@pytest.mark.parametrize(
    "field, spec, message",
    [
        ("known", {"usd_per_hour": 1, "input": 1}, "not both"),
        ("token", {"usd_per_hour": 1, "usd_per_1m_output": 1}, "not both"),
        ("known", {"usd_per_1m_input": 1}, "both usd_per_1m_input and usd_per_1m_output"),
        ("known", {}, "give usd_per_hour"),
        ("token", {"usd_per_hour": 1}, "per-token price"),
        ("known", {"usd_per_hour": 0}, "greater than 0"),
        ("token", {"output": -1}, "greater than or equal to 0"),
        ("known", {"usd_per_1m_input": 1, "input": 1}, "Extra inputs"),  # one field, two names: refused
    ],
)
def test_price_kinds_are_checked(field, spec, message):
    with pytest.raises(ValueError, match=message):
        Holder.model_validate({field: spec})


@pytest.mark.parametrize(
    "field, spec",
    [("known", {"usd_per_hour": 1}), ("known", {"input": 0, "output": 0}), ("token", {"input": 1}), ("token", {})],
)
def test_price_kinds_accept(field, spec):
    assert getattr(Holder.model_validate({field: spec}), field) == Price.model_validate(spec)
