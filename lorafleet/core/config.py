"""One config system for train, serve and loadtest: strict pydantic models, errors that name the field, YAML
loading that points at the bad line, one `dotted.key=value` override syntax, and one Price.

Overrides (`lorafleet train run CONFIG key=value...`, `lorafleet bench run CONFIG key=value...`):

    lr=2e-3                      a top-level field (the one-segment case of a dotted key)
    load.rate=4                  a field of a section; a missing or null section is created
    targets.0.model=x            a list item by index ...
    targets.smollm2-lora.model=x ... or by its `name`
    targets.a.adapters.acme=0.7  a key of a mapping
    top_layers=null  key=        null (an empty value is null too); sweep=[1,2]  a YAML flow list

Values are read as YAML 1.2 (`2` int, `2e-3` float, `true` bool, `null`, `[1, 2]`; `yes`/`no` stay words, which
bool fields accept); quote to keep text: `name='007'`.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lorafleet.core.errors import ConfigError

M = TypeVar("M", bound="Strict")
_NUMBERS = (int, float, int | None, float | None)


class Strict(BaseModel):
    # A typo in a key must fail loudly, not silently fall back to a default. Text fields take numbers because
    # YAML (files and override values alike) reads `name: 2024` as an int.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic would read `true` as 1 for a number field: `r=true` is a slip, not rank 1.
        if isinstance(v, bool) and info.field_name and cls.model_fields[info.field_name].annotation in _NUMBERS:
            raise ValueError(f"must be a number, got {v!r}")
        return v

    @classmethod
    def parse(cls: type[M], data: Any, source: str, *, brackets: bool = False, reference: str | None = None) -> M:
        """`data` validated, or a ConfigError listing every problem by field (see `config_error`)."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise config_error(e, source, cls, brackets=brackets, reference=reference) from None


# ---------------------------------------------------------------- validation errors


# What a field accepts, by pydantic error type; the offending value is appended.
_ACCEPTS = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "literal_error": "must be {expected}",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be text",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping of field: value",
    "model_attributes_type": "must be a mapping of field: value",
}
_COUNTS = {"too_short": "needs at least {min_length} item(s)", "too_long": "takes at most {max_length} item(s)"}


def config_error(
    e: ValidationError,
    source: str,
    model: type[BaseModel] | None = None,
    *,
    brackets: bool = False,
    reference: str | None = None,
) -> ConfigError:
    """One line per problem: `path.to.field: what it accepts, got VALUE`.

    `model` (the validated class) lets an unknown key be answered with the valid ones; `reference` names the
    commented example file; `brackets` writes list indexes as `engines[0]` instead of `engines.0`.
    """
    lines = [_line(err, model, brackets, reference) for err in e.errors()]
    return ConfigError(f"{source} is invalid:\n  " + "\n  ".join(lines))


def format_loc(loc: Iterable[Any], brackets: bool = False) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int) and brackets:
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _line(err: Any, model: type[BaseModel] | None, brackets: bool, reference: str | None) -> str:
    where = format_loc(err["loc"], brackets)
    what = _accepts(err, model, reference)
    # Cross-field checks (model validators) have no location and name their fields in the message.
    return f"{where}: {what}" if where else what


def _accepts(err: Any, model: type[BaseModel] | None, reference: str | None) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return _unknown_key(err["loc"], model, reference)
    if kind in _COUNTS:
        return _COUNTS[kind].format(**ctx)
    if kind in _ACCEPTS:
        return f"{_ACCEPTS[kind].format(**{k: _plain(v) for k, v in ctx.items()})}, got {err['input']!r}"
    return err["msg"].removeprefix("Value error, ")


def _plain(v: Any) -> Any:
    # A float field's bound is 0.0 in pydantic's context; users wrote and read `> 0`.
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _unknown_key(loc: tuple[Any, ...], model: type[BaseModel] | None, reference: str | None) -> str:
    section = _model_at(model, loc[:-1]) if model else None
    names = _accepted_names(section) if section else {}
    if loc[-1] in names:
        return f"given twice: {loc[-1]} is another name of {names[loc[-1]]}; keep one"
    msg = "unknown field"
    if section:
        msg += f"; valid keys: {', '.join(_field_list(section))}"
    return msg + (f" (see {reference})" if reference else "")


def _accepted_names(model: type[BaseModel]) -> dict[str, str]:
    """Every key a model takes (field names and their aliases) -> the field name."""
    names = {}
    for name, f in model.model_fields.items():
        names[name] = name
        if isinstance(f.validation_alias, AliasChoices):
            names |= {alias: name for alias in f.validation_alias.choices if isinstance(alias, str)}
    return names


def _field_list(model: type[BaseModel]) -> list[str]:
    by_field: dict[str, list[str]] = {}
    for key, name in _accepted_names(model).items():
        by_field.setdefault(name, []).append(key)
    return [keys[0] + "".join(f" (or {k})" for k in keys[1:]) for keys in by_field.values()]


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that validates the value at `loc`, following fields, list items and mapping values."""
    typ: Any = model
    for part in loc:
        typ = _step(typ, part)
        if typ is None:
            return None
    return next((t for t in _members(typ) if _is_model(t)), None)


def _step(typ: Any, part: Any) -> Any:
    for t in _members(typ):
        if _is_model(t) and isinstance(part, str):
            name = _accepted_names(t).get(part)
            if name:
                return t.model_fields[name].annotation
        origin = typing.get_origin(t)
        if origin is list and isinstance(part, int):
            return typing.get_args(t)[0]
        if origin is dict and isinstance(part, str):
            return typing.get_args(t)[1]
    return None


def _members(typ: Any) -> list[Any]:
    """`X | Y | None` and `Annotated[X, ...]` unwrapped to the plain types."""
    origin = typing.get_origin(typ)
    if origin is Annotated:
        return _members(typing.get_args(typ)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [m for arg in typing.get_args(typ) for m in _members(arg)]
    return [typ]


def _is_model(typ: Any) -> bool:
    return isinstance(typ, type) and issubclass(typ, BaseModel)


# ---------------------------------------------------------------- YAML


def parse_yaml(text: str, source: str) -> Any:
    """A YAML document, or a ConfigError at `source:line:column` saying what the parser expected."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{_where(source, e)}: not valid YAML: {_problem(e)}") from None


def load_yaml(path: str | Path, what: str = "config file") -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} not found")
    return parse_yaml(p.read_text(), str(p))


def _where(source: str, e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source


def _problem(e: yaml.YAMLError) -> str:
    parts = [getattr(e, "context", None), getattr(e, "problem", None)]
    return ", ".join(p for p in parts if p) or str(e)


# ---------------------------------------------------------------- overrides

# PyYAML reads YAML 1.1, where `2e-3` (no dot) is text; YAML 1.2 and every user mean the number.
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+")
# ... and where `yes`, `no`, `on`, `off` are bools; in YAML 1.2 they are words (`name=no` is a name).
_WORDS = {"yes", "no", "on", "off"}


def parse_override(item: str) -> tuple[str, Any]:
    """`dotted.key=value` -> (key, value read as YAML)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or "" in key.split("."):
        raise ConfigError(f"override {item!r}: expected key=value, e.g. lr=2e-3 or load.rate=4")
    return key, _value(key, raw)


def _value(key: str, raw: str) -> Any:
    text = raw.strip()
    if not text:
        return None  # `key=` clears a field, like `key=null`
    if _FLOAT.fullmatch(text):
        return float(text)
    if text.lower() in _WORDS:
        return text  # a bool field still reads it as one; a text field keeps the word
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override {key}={raw}: value is not valid YAML ({_problem(e)}); quote text: {key}='...'"
        ) from None


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`key=value` strings -> {dotted key: value}; a key given twice keeps its last value."""
    return dict(parse_override(item) for item in items)


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    """A copy of `data` with each override set: `key=value` strings, or a mapping {dotted key: value}."""
    out = copy.deepcopy(dict(data))
    pairs = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides or ())
    for key, value in pairs:
        set_path(out, key, value)
    return out


def set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `value` at dotted `key`; list items are addressed by index or by their `name`."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        where = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = _list_index(node, part, key, where)
        elif isinstance(node, dict):
            idx = part
            if not last and node.get(part) is None:
                node[part] = {}  # a section the file leaves out (or sets to null) is created
        else:
            raise ConfigError(f"override {key}: {'.'.join(parts[:i])} is {node!r}, not a section with keys")
        if last:
            node[idx] = value
        else:
            node = node[idx]


def _list_index(items: list[Any], part: str, key: str, where: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    names = [item["name"] for item in items if isinstance(item, dict) and "name" in item]
    hint = f"an index 0..{len(items) - 1}" + (f" or a name: {', '.join(map(str, names))}" if names else "")
    raise ConfigError(f"override {key}: {where} matches no list item; use {hint}")


# ---------------------------------------------------------------- Price

_INPUT = AliasChoices("usd_per_1m_input", "input")
_OUTPUT = AliasChoices("usd_per_1m_output", "output")
_TRAINING = AliasChoices("usd_per_1m_training", "training")


class Price(Strict):
    """What a model costs: a self-hosted instance by the hour, or list prices per 1M tokens; never both.

    serve's spelling `{input, output}` is an alias of `{usd_per_1m_input, usd_per_1m_output}`. An unset token
    price is free (serve's price tables); `KnownPrice` requires a complete one (loadtest targets).
    """

    usd_per_hour: float | None = Field(None, gt=0, description="self-hosted: what the instance costs per hour")
    usd_per_1m_input: float | None = Field(None, ge=0, validation_alias=_INPUT, description="$ per 1M prompt tokens")
    usd_per_1m_output: float | None = Field(
        None, ge=0, validation_alias=_OUTPUT, description="$ per 1M completion tokens"
    )
    usd_per_1m_training: float | None = Field(
        None, ge=0, validation_alias=_TRAINING, description="$ per 1M tokens a fine-tuning job trains on (serve)"
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Price:
        listed = (self.usd_per_1m_input, self.usd_per_1m_output)
        if self.usd_per_hour is not None and any(v is not None for v in listed):
            raise ValueError("give either usd_per_hour (self-hosted) or usd_per_1m_input/usd_per_1m_output, not both")
        return self

    @property
    def self_hosted(self) -> bool:
        return self.usd_per_hour is not None

    @property
    def input(self) -> float:
        return self.usd_per_1m_input or 0.0

    @property
    def output(self) -> float:
        return self.usd_per_1m_output or 0.0

    def training_cost(self, trained_tokens: int) -> float:
        """$ for a fine-tuning job that trained on this many tokens (epochs included)."""
        return trained_tokens * (self.usd_per_1m_training or 0.0) / 1e6

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """$ for one request at list prices."""
        if self.self_hosted:
            # Per token, an instance costs usd_per_hour / throughput: a load test measures it (loadtest.cost).
            raise ValueError("a per-hour price has no per-token cost without a measured throughput")
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1e6


def _known(price: Price) -> Price:
    if not price.self_hosted and None in (price.usd_per_1m_input, price.usd_per_1m_output):
        raise ValueError("give usd_per_hour (self-hosted), or both usd_per_1m_input and usd_per_1m_output")
    return price


def _per_token(price: Price) -> Price:
    if price.self_hosted:
        raise ValueError("this is a per-token price: give input/output ($ per 1M tokens), not usd_per_hour")
    return price


# A price every figure can be computed from: hourly, or both token prices.
KnownPrice = Annotated[Price, AfterValidator(_known)]
# A per-token list price (billing); an unset side is free.
TokenPrice = Annotated[Price, AfterValidator(_per_token)]
