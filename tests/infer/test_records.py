"""infer.records: reading rows, telling formats apart, and reporting bad rows by file:line."""

from __future__ import annotations

import json
import re

import datasets
import pytest

from infer.records import (
    MAX_PROBLEMS,
    RecordsError,
    detect_format,
    load_records,
    normalize_rows,
    read_rows,
    to_conversation,
)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------- reading


def test_jsonl_rows_keep_their_line_numbers(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "a"}', "", '{"text": "b"}'])
    rows = read_rows(path)
    assert rows == [{"text": "a"}, {"text": "b"}]
    assert rows.origins == [f"{path}:1", f"{path}:3"]  # the blank line is skipped, not renumbered


def test_bad_json_and_non_objects_are_reported_together_by_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "ok"}', '{"text": ', "[1, 2]", '"just a string"'])
    with pytest.raises(RecordsError) as info:
        read_rows(path)
    message = str(info.value)
    assert "3 problems" in message
    assert re.search(rf"{re.escape(str(path))}:2: not valid JSON", message)
    assert f"{path}:3: a row must be a JSON object" in message and "got an array" in message
    assert f"{path}:4: a row must be a JSON object" in message and "got a string" in message
    assert f"{path}:1" not in message


def test_missing_file_names_the_path_and_the_directory_it_was_resolved_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecordsError, match=r"data file not found: nope\.jsonl .*" + re.escape(str(tmp_path))):
        read_rows("nope.jsonl")


def test_json_document_as_list_or_under_data(tmp_path):
    rows = [{"prompt": "p", "completion": "c"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows, "version": 1}))
    assert read_rows(tmp_path / "list.json") == rows
    assert read_rows(tmp_path / "wrapped.json") == rows


def test_json_document_syntax_error_gives_line_and_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    with pytest.raises(RecordsError, match=rf"{re.escape(str(path))}:3:\d+: not valid JSON"):
        read_rows(path)


def test_limit_stops_reading_early(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": str(i)}) for i in range(10)] + ["{broken"])
    assert [r["text"] for r in read_rows(path, limit=3)] == ["0", "1", "2"]  # the broken line is never reached


def test_in_memory_dataset_and_save_to_disk_directory(tmp_path):
    ds = datasets.Dataset.from_list([{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}])
    assert read_rows(ds) == ds.to_list()
    ds.save_to_disk(str(tmp_path / "saved"))
    rows = read_rows(tmp_path / "saved", limit=1)
    assert rows == [{"question": "q1", "answer": "a1"}]
    assert rows.origins == [f"{tmp_path / 'saved'}: row 0"]


def test_dataset_dict_directory_asks_for_one_split(tmp_path):
    ds = datasets.Dataset.from_list([{"text": "a"}])
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(RecordsError, match=r"several splits \(train, test\).*dd/train"):
        read_rows(tmp_path / "dd")


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(RecordsError, match="contains no rows"):
        read_rows(write_lines(tmp_path / "d.jsonl", [""]))


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages"),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "sharegpt"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"text": "t"}, "text"),
        # A chat row with a leftover text column is still a chat row.
        ({"messages": [], "text": "t"}, "messages"),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_detect_format_through_field_mapping():
    row = {"question": "2+2?", "answer": "4"}
    with pytest.raises(RecordsError, match=r"fields \['answer', 'question'\].*data\.fields"):
        detect_format(row)
    assert detect_format(row, {"prompt": "question", "completion": "answer"}) == "prompt_completion"


def test_unknown_canonical_field_suggests_the_close_one():
    with pytest.raises(RecordsError, match=r"unknown canonical field 'promt' \(did you mean 'prompt'\?\)"):
        detect_format({"q": "x"}, {"promt": "q"})


def test_conversions():
    assert to_conversation({"q": "2+2?", "a": "4"}, "prompt_completion", {"prompt": "q", "completion": "a"}) == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    alpaca = to_conversation({"instruction": "Add", "input": "2 and 2", "output": "4"}, "alpaca", system_prompt="Be brief.")
    assert alpaca == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add\n\n2 and 2"},
        {"role": "assistant", "content": "4"},
    ]
    no_input = to_conversation({"instruction": "Say hi", "output": "hi"}, "alpaca")
    assert no_input[0] == {"role": "user", "content": "Say hi"}


def test_system_prompt_only_fills_in_a_missing_one():
    row = {"messages": [
        {"role": "system", "content": "own"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]}
    assert to_conversation(row, "messages", system_prompt="default")[0]["content"] == "own"
    row["messages"] = row["messages"][1:]
    assert to_conversation(row, "messages", system_prompt="default")[0] == {"role": "system", "content": "default"}


def test_malformed_rows_are_all_reported_with_file_and_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        '{"prompt": "ok", "completion": "fine"}',
        '{"prompt": "no completion"',  # bad JSON
        '{"prompt": "no completion"}',  # missing field
        '{"prompt": 7, "completion": "x"}',  # wrong type
        '{"prompt": "p", "completion": "  "}',  # empty completion
    ])
    with pytest.raises(RecordsError) as info:
        load_records(path)
    message = str(info.value)
    assert message.startswith(f"{path} (prompt_completion format): 4 problems")
    assert f"{path}:2: not valid JSON" in message
    assert f"{path}:3: missing field 'completion'" in message
    assert f"{path}:4: field 'prompt' must be a string, got a number" in message
    assert f"{path}:5: field 'completion' is empty" in message
    assert f"{path}:1:" not in message


def test_bad_messages_rows(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a"]}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]},
        {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": "not a list"},
    ]
    with pytest.raises(RecordsError) as info:
        normalize_rows(rows, source="chats")
    message = str(info.value)
    assert "chats: row 0: the last message must be the assistant's answer, but 'messages' has no assistant turn" in message
    assert "chats: row 1: messages[1]: role must be one of system, user, assistant, got 'bot'" in message
    assert "chats: row 2: messages[1]: content must be a string, got an array" in message
    assert "chats: row 3: the last message must be the assistant's answer, but 'messages' ends with a 'user' turn" in message
    assert "chats: row 4: messages[0]: assistant turn before any user turn" in message
    assert "chats: row 5: field 'messages' must be a non-empty list" in message


def test_sharegpt_rows_become_conversations():
    row = {"conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "2+2?"},
        {"from": "gpt", "value": "4"},
        {"from": "user", "value": "And 3+3?"},  # some exports use the plain role names
        {"from": "assistant", "value": "6"},
    ]}
    assert to_conversation(row, "sharegpt") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    mapped = {"dialog": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert to_conversation(mapped, "sharegpt", {"conversations": "dialog"})[1] == {"role": "assistant", "content": "a"}


def test_bad_sharegpt_rows(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]},
        {"conversations": [{"from": "human", "value": "q"}]},
    ]
    with pytest.raises(RecordsError) as info:
        normalize_rows(rows, "sharegpt", source="chats")
    message = str(info.value)
    assert "chats: row 0: conversations[1]: from must be one of human, gpt, system, user, assistant, got 'bot'" in message
    assert "chats: row 1: conversations[1]: value must be a string, got nothing" in message
    assert "chats: row 2: the last message must be the assistant's answer, but 'conversations' has no" in message


def test_problem_list_is_capped_with_a_count(tmp_path):
    rows = [{"prompt": "p", "completion": ""} for _ in range(MAX_PROBLEMS + 5)]
    with pytest.raises(RecordsError) as info:
        normalize_rows(rows)
    message = str(info.value)
    assert f"{MAX_PROBLEMS + 5} problems" in message
    assert message.count("is empty") == MAX_PROBLEMS
    assert "... and 5 more" in message


def test_load_records_reads_several_files_as_one(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", ['{"text": "1"}', '{"text": "2"}'])
    b = write_lines(tmp_path / "b.jsonl", ['{"text": "3"}', '{"text": "4"}'])
    fmt, items, origins = load_records([str(a), str(b)], limit=3)
    assert (fmt, items) == ("text", ["1", "2", "3"])
    assert origins == [f"{a}:1", f"{a}:2", f"{b}:1"]
    with pytest.raises(RecordsError, match="missing.jsonl.*\n.*gone.jsonl"):
        load_records([str(a), "missing.jsonl", "gone.jsonl"])
