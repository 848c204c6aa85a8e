from __future__ import annotations

import json

import pytest

from train.data import DataError, load_jsonl, split_prompt, to_conversation, write_json, write_jsonl

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _msgs(*pairs: tuple[str, object]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in pairs]})


# (bad line, part of the reason the error must give)
BAD_LINES = [
    ("{not json", "bad JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('"just a string"', "expected a JSON object, got str"),
    ('{"text": "hi"}', "missing keys: expected 'messages' or 'prompt' and 'completion'"),
    ('{"prompt": "hi"}', "missing key 'completion'"),
    ('{"completion": "hi"}', "missing key 'prompt'"),
    ('{"prompt": 1, "completion": "x"}', "'prompt' must be a string, got int"),
    ('{"prompt": "p", "completion": "c", "system": 3}', "'system' must be a string"),
    ('{"prompt": "p", "completion": "  "}', "'completion' has empty content"),
    ('{"messages": "hi"}', "'messages' must be a non-empty list"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": ["hi"]}', "messages[0] must be an object"),
    ('{"messages": [{"role": "user"}]}', "messages[0] is missing key 'content'"),
    ('{"messages": [{"content": "x"}]}', "messages[0] is missing key 'role'"),
    (_msgs(("user", 5), ("assistant", "y")), "messages[0].content must be a string, got int"),
    (_msgs(("tool", "x"), ("assistant", "y")), "unknown role 'tool'"),
    (_msgs(("system", "s"), ("user", "x")), "no assistant turn"),
    (_msgs(("user", "x"), ("assistant", "y"), ("user", "z")), "last message is from 'user'"),
    (_msgs(("user", "x"), ("assistant", " \n")), "messages[1] (assistant) has empty content"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_bad_line_reports_file_line_and_reason(tmp_path, line, reason):
    path = tmp_path / "d.jsonl"
    # The blank line must still count: line numbers are the ones an editor shows.
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    assert str(e.value).startswith(f"{path}:3: ")
    assert reason in str(e.value)


@pytest.mark.parametrize("text", ["", "\n\n", "   \n"])
def test_empty_dataset(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match="no examples in path"):
        load_jsonl(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


@pytest.mark.parametrize(
    "row,expected",
    [
        (
            {"prompt": "2+2?", "completion": "4"},
            [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        ),
        (
            {"prompt": "2+2?", "completion": "4", "system": "Be brief."},
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ],
        ),
        (
            {"prompt": "2+2?", "completion": "4", "system": None, "id": 7},
            [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        ),
        (  # extra keys on lines and messages are dropped
            {
                "id": "x",
                "messages": [{"role": "user", "content": "a", "name": "bob"}, {"role": "assistant", "content": "b"}],
            },
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        ),
        (  # multi-turn chats are kept whole
            {
                "messages": [
                    {"role": r, "content": c}
                    for r, c in [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]
                ]
            },
            [
                {"role": r, "content": c}
                for r, c in [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]
            ],
        ),
    ],
)
def test_rows_become_chat(row, expected):
    assert to_conversation(row) == expected


def test_load_mixed_formats(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    assert load_jsonl(path) == [
        GOOD["messages"],
        [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}],
    ]


def test_write_then_load_roundtrip(tmp_path):
    rows = [GOOD, {"messages": [{"role": "user", "content": "Grüße ✓"}, {"role": "assistant", "content": "naïve"}]}]
    path = tmp_path / "sub" / "out.jsonl"
    write_jsonl(rows, path)
    assert "Grüße ✓" in path.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes
    assert load_jsonl(path) == [r["messages"] for r in rows]
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]  # no temp file left behind


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl([GOOD], path)
    before = path.read_text()
    with pytest.raises(TypeError):
        write_jsonl([GOOD, {"bad": object()}], path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_write_json(tmp_path):
    write_json({"task": "x", "n": 3}, tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text()) == {"task": "x", "n": 3}


@pytest.mark.parametrize(
    "messages,prompt_len,answer",
    [
        (GOOD["messages"], 1, "hello"),
        ([{"role": "system", "content": "s"}, *GOOD["messages"]], 2, "hello"),
        (
            [
                {"role": r, "content": c}
                for r, c in [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]
            ],
            3,
            "d",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ],
            1,
            "b",
        ),
    ],
)
def test_split_prompt(messages, prompt_len, answer):
    prompt, got = split_prompt(messages)
    assert got == answer
    assert prompt == messages[:prompt_len]


def test_split_prompt_without_assistant():
    with pytest.raises(DataError, match="no assistant turn"):
        split_prompt([{"role": "user", "content": "a"}])
