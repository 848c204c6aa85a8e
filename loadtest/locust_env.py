"""Settings of the locustfile, parsed apart from it: importing locust monkey-patches the whole process
(gevent), so tests and other code must be able to check these without importing locust."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point"
).split()


def parse_mix(text: str) -> list[tuple[str, str, float]]:
    """'key:model[:weight],...' -> [(key, model, weight)]."""
    mix = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or not parts[1]:
            raise ValueError(f"LORAFLEET_LOCUST_MIX item {item!r}: expected api_key:model[:weight]")
        weight = float(parts[2]) if len(parts) == 3 else 1.0
        if weight <= 0:
            raise ValueError(f"LORAFLEET_LOCUST_MIX item {item!r}: the weight must be > 0")
        mix.append((parts[0], parts[1], weight))
    return mix


@dataclass(frozen=True)
class LocustSettings:
    mix: list[tuple[str, str, float]]  # (API key, model, weight)
    max_tokens: int
    input_words: int
    force_output_len: bool
    wait_s: float


def settings_from_env(env: Mapping[str, str] = os.environ) -> LocustSettings:
    """The LORAFLEET_* variables documented in locustfile.py."""
    mix = parse_mix(env.get("LORAFLEET_LOCUST_MIX", "")) or [
        (env.get("LORAFLEET_API_KEY", ""), env.get("LORAFLEET_MODEL", "smollm2-135m-instruct"), 1.0)
    ]
    return LocustSettings(
        mix=mix,
        max_tokens=int(env.get("LORAFLEET_MAX_TOKENS", "64")),
        input_words=int(env.get("LORAFLEET_INPUT_WORDS", "128")),
        force_output_len=env.get("LORAFLEET_FORCE_OUTPUT_LEN", "0").lower() in ("1", "true", "yes"),
        wait_s=float(env.get("LORAFLEET_WAIT_S", "0")),
    )
