"""Training data as chat conversations, read from the JSONL formats TRL and Axolotl users already have.

Two line formats are accepted and both become a conversation (a list of {"role", "content"} messages):

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", ...}, {"role": "assistant", ...}]}
    {"prompt": "...", "completion": "...", "system": "..."}      # "system" is optional

Extra keys on a line or a message (ids, metadata, "name") are ignored, so exported datasets load as they are.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from lorafleet.core.errors import UserError

ROLES = ("system", "user", "assistant")

Message = dict[str, str]
Conversation = list[Message]


class DataError(UserError, ValueError):
    """A dataset cannot be used; the message names the file and line and says what is wrong."""


def to_conversation(row: Any) -> Conversation:
    """One parsed JSONL line as a conversation; raises DataError(reason) if it is not a usable example."""
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        return _chat(row["messages"])
    if "prompt" in row or "completion" in row:
        return _prompt_completion(row)
    keys = ", ".join(sorted(row)) or "none"
    raise DataError(f"missing keys: expected 'messages' or 'prompt' and 'completion' (got keys: {keys})")


def _chat(messages: Any) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list of {'role', 'content'} objects")
    out = [_message(m, i) for i, m in enumerate(messages)]
    if not any(m["role"] == "assistant" for m in out):
        raise DataError("no assistant turn: the model needs an assistant message to learn from")
    if out[-1]["role"] != "assistant":
        raise DataError(f"last message is from {out[-1]['role']!r}: the conversation must end with the assistant")
    return out


def _message(m: Any, i: int) -> Message:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise DataError(f"{where} must be an object with 'role' and 'content', got {type(m).__name__}")
    for key in ("role", "content"):
        if key not in m:
            raise DataError(f"{where} is missing key {key!r}")
        if not isinstance(m[key], str):
            raise DataError(f"{where}.{key} must be a string, got {type(m[key]).__name__}")
    if m["role"] not in ROLES:
        raise DataError(f"{where} has unknown role {m['role']!r}: expected one of {', '.join(ROLES)}")
    if not m["content"].strip():
        raise DataError(f"{where} ({m['role']}) has empty content")
    return {"role": m["role"], "content": m["content"]}


def _prompt_completion(row: dict) -> Conversation:
    for key in ("prompt", "completion"):
        if key not in row:
            raise DataError(f"missing key {key!r}: prompt/completion lines need both 'prompt' and 'completion'")
    system = row.get("system")  # optional; null means absent
    for key in ("system", "prompt", "completion"):
        value = row.get(key)
        if key == "system" and value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{key!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{key!r} has empty content")
    out = [{"role": "system", "content": system}] if system is not None else []
    return out + [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]


def load_jsonl(path: str | Path) -> list[Conversation]:
    """All examples of a chat or prompt/completion JSONL file; the first bad line raises `path:lineno: reason`."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as e:
        raise DataError(f"{path}: no such file") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from e
    conversations = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: bad JSON: {e.msg} (column {e.colno})") from e
        try:
            conversations.append(to_conversation(row))
        except DataError as e:
            raise DataError(f"{path}:{lineno}: {e}") from e
    if not conversations:
        raise DataError(f"no examples in path: {path} is empty or has only blank lines")
    return conversations


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    """Write one JSON object per line. Atomic: readers see the old file or the whole new one, never half."""
    _write_atomic("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), Path(path))


def write_json(obj: Any, path: str | Path) -> None:
    """Write one indented JSON document, atomically like `write_jsonl`."""
    _write_atomic(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", Path(path))


def _write_atomic(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; data files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def split_prompt(messages: Conversation) -> tuple[Conversation, str]:
    """(messages before the last assistant turn, that turn's content): what the model sees and must answer."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return messages[:i], messages[i]["content"]
    raise DataError("no assistant turn to split off")
