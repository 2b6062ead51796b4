"""Tests for chatforge.data.chat_readers: SFT conversations, preferences and RL prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatforge.chat import Message
from chatforge.data.chat_readers import (
    Preference,
    chat_paths,
    detect_format,
    read_conversations,
    read_preferences,
    read_prompts,
)
from chatforge.errors import ConfigError, DataError

OPENAI = {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello."}]}
ALPACA = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    """Write rows as JSON Lines; raw_lines maps a 0-based position to a literal line to insert."""
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    for pos, raw in sorted((raw_lines or {}).items()):
        lines.insert(pos, raw)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def roles_and_contents(conv) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in conv.messages]


def error_of(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Conversations: formats


def test_openai_messages_with_system_and_tool(tmp_path):
    rec = {"messages": [*OPENAI["messages"], {"role": "user", "content": "Weather?"},
                        {"role": "assistant", "content": "", "tool_calls": [
                            {"function": {"name": "w"}},
                            {"id": "c2", "function": {"name": "w", "arguments": '{"city":"Kesh"}'}}]},
                        {"role": "tool", "content": "sunny"}, {"role": "tool", "tool_call_id": "c2", "content": "rain"},
                        {"role": "assistant", "content": "Sunny."}]}
    result = read_conversations(write_jsonl(tmp_path / "d.jsonl", [rec]))
    assert roles_and_contents(result.conversations[0]) == [
        ("system", "Be terse."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Weather?"),
        # each call as the chat template writes it: canonical JSON, no arguments read as {}
        ("tool_call", '{"name": "w", "arguments": {}}'), ("tool_call", '{"name": "w", "arguments": {"city": "Kesh"}}'),
        ("tool_result", "sunny"), ("tool_result", "rain"), ("assistant", "Sunny."),
    ]
    assert [m.call_id for m in result.conversations[0].messages][4:8] == [None, "c2", None, "c2"]
    assert result.formats == {"messages": 1} and result.skipped == 0 and result.families == [None]


def test_openai_records_declare_their_tools_and_bad_tools_are_named(tmp_path):
    weather = {"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}
    rec = {"messages": [{"role": "user", "content": "Weather?"},
                        {"role": "assistant", "tool_calls": [{"function": {"name": "w", "arguments": "{}"}}]}],
           "tools": [weather]}
    (conv,) = read_conversations(write_jsonl(tmp_path / "d.jsonl", [rec])).conversations
    assert conv.tools == [weather["function"]]
    bad = {**rec, "tools": [{"type": "function", "function": {"name": "no spaces allowed"}}]}
    with pytest.raises(DataError) as excinfo:
        read_conversations(write_jsonl(tmp_path / "b.jsonl", [bad]))
    assert "tools[0].function.name" in error_of(excinfo)


def test_alpaca_joins_input_and_reads_system(tmp_path):
    rows = [ALPACA, {"instruction": "Say hi.", "input": "", "output": "Hi!"},
            {"instruction": "Say hi.", "output": "Hi!", "system": "Be kind."},
            {"instruction": "", "input": "Only input", "output": "ok"}]
    convs = read_conversations(write_jsonl(tmp_path / "a.jsonl", rows), format="alpaca").conversations
    assert roles_and_contents(convs[0]) == [("user", "Translate to French.\n\ncat"), ("assistant", "chat")]
    assert roles_and_contents(convs[1]) == [("user", "Say hi."), ("assistant", "Hi!")]
    assert roles_and_contents(convs[2]) == [("system", "Be kind."), ("user", "Say hi."), ("assistant", "Hi!")]
    assert roles_and_contents(convs[3]) == [("user", "Only input"), ("assistant", "ok")]


def test_sharegpt_role_mapping(tmp_path):
    rec = {"system": "Top-level system.", "conversations": [
        {"from": "human", "value": "Weather?"}, {"from": "function_call", "value": '{"name": "w"}'},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."},
        {"from": "user", "value": "Thanks"}, {"from": "assistant", "value": "Welcome."},
        {"from": "tool", "value": "done"}, {"from": "GPT", "value": "Bye."}]}
    conv = read_conversations(write_jsonl(tmp_path / "s.jsonl", [rec]), format="sharegpt").conversations[0]
    assert [m.role for m in conv.messages] == [
        "system", "user", "tool_call", "tool_result", "assistant", "user", "assistant", "tool_result", "assistant"]
    assert conv.system == Message("system", "Top-level system.")


def test_sharegpt_system_turn_first(tmp_path):
    rec = {"conversations": [{"from": "system", "value": "Sys"}, *SHAREGPT["conversations"]]}
    conv = read_conversations(write_jsonl(tmp_path / "s.jsonl", [rec])).conversations[0]
    assert roles_and_contents(conv)[0] == ("system", "Sys")


def test_auto_detects_each_record_and_keeps_families(tmp_path):
    rows = [OPENAI, {**ALPACA, "family": "translate"}, SHAREGPT, {**OPENAI, "family": "chat"}]
    result = read_conversations(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert len(result.conversations) == 4
    assert result.formats == {"messages": 2, "alpaca": 1, "sharegpt": 1}
    assert result.families == [None, "translate", None, "chat"]
    assert detect_format(SHAREGPT) == "sharegpt" and detect_format({"text": "x"}) is None


def test_openai_alias_and_unknown_format(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [OPENAI])
    assert len(read_conversations(path, format="openai").conversations) == 1
    with pytest.raises(ConfigError, match="unknown conversation format 'chatml'"):
        read_conversations(path, format="chatml")


@pytest.mark.parametrize(("fmt", "record"), [("alpaca", OPENAI), ("sharegpt", ALPACA), ("messages", SHAREGPT)])
def test_explicit_format_refuses_other_shapes(tmp_path, fmt, record):
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(DataError) as excinfo:
        read_conversations(path, format=fmt)
    assert error_of(excinfo).startswith(f"{path}:1: not {fmt} data (keys: ")
    assert f"(format={fmt!r})" in error_of(excinfo)


# ---------------------------------------------------------------------------------------------
# Conversations: sources


def test_directories_globs_and_json_arrays(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    write_jsonl(data / "a.jsonl", [OPENAI])
    write_jsonl(data / "sub" / "b.jsonl", [SHAREGPT, SHAREGPT])
    (data / "c.json").write_text(json.dumps([ALPACA, OPENAI], indent=2), encoding="utf-8")
    (data / "README.md").write_text("# not records\n", encoding="utf-8")  # ignored in a directory
    assert len(read_conversations(data).conversations) == 5
    assert len(read_conversations(str(data / "**" / "*.jsonl")).conversations) == 3
    both = read_conversations([data / "c.json", data / "c.json", str(data / "*.jsonl")])
    assert len(both.conversations) == 3  # a file named twice is read once


def test_json_array_errors_name_the_item(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([OPENAI, "oops", {"messages": []}]), encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        read_conversations(path)
    assert error_of(excinfo).startswith(f"{path}: item 2: got a JSON string; expected ")
    result = read_conversations(path, skip_invalid=True)
    assert len(result.conversations) == 1 and result.skipped == 2
    assert result.skipped_examples[1].startswith(f"{path}: item 3: 'messages' must be a non-empty list")


def test_broken_json_array_file_raises_even_when_skipping(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('[{"messages": []},\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.json: invalid JSON \(line 2\); expected a JSON array of "):
        read_conversations(path, skip_invalid=True)


def test_source_errors(tmp_path):
    with pytest.raises(DataError, match="no data sources given"):
        read_conversations([])
    with pytest.raises(DataError, match="no such file or directory"):
        read_conversations(tmp_path / "missing.jsonl")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("hello\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"docs: no \.jsonl or \.json files found"):
        read_conversations(tmp_path / "docs")
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="Parquet is not supported for chat data"):
        chat_paths(tmp_path / "x.parquet")


def test_explicit_file_with_other_extension_is_read_as_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "train.ndjson", [OPENAI])
    assert len(read_conversations(path).conversations) == 1


def test_empty_sources_error_names_them(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        read_conversations(path)
    assert error_of(excinfo).startswith(f"{path}: no valid conversations found; expected ")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x"}])
    with pytest.raises(DataError) as excinfo:
        read_conversations([path, bad], skip_invalid=True)
    message = error_of(excinfo)
    assert message.startswith(f"2 files ({path}, ...): no valid conversations found (1 invalid skipped; first: ")
    assert f"{bad}:1: unrecognised record" in message


# ---------------------------------------------------------------------------------------------
# Conversations: bad records


def msgs(*turns: tuple) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


BAD_RECORDS = [
    pytest.param("[1, 2]", "got a JSON array; expected ", id="not-an-object"),
    pytest.param('{"messages": [', "invalid JSON (", id="invalid-json"),
    pytest.param({"text": "hi", "id": 3}, "unrecognised record (keys: text, id); expected an OpenAI", id="unknown"),
    pytest.param({"messages": "hi"}, "'messages' must be a non-empty list", id="messages-not-list"),
    pytest.param(msgs(("user", "Hi"), ("bot", "Yo")), "messages[1]: unknown role 'bot'; expected one of [",
                 id="unknown-role"),
    pytest.param({"messages": [{"content": "Hi"}]}, "messages[0]: missing 'role'", id="missing-role"),
    pytest.param({"messages": [{"role": "user", "content": 5}]}, "messages[0]: 'content' must be a string",
                 id="content-not-string"),
    pytest.param(msgs(("user", "Hi"), ("assistant", "  ")), "messages[1]: empty content", id="empty-content"),
    pytest.param(msgs(("user", "Hi"), ("user", "Hello?")), "no assistant turn", id="no-assistant"),
    pytest.param(msgs(("user", "Hi"), ("system", "S"), ("assistant", "A")),
                 "messages[1]: a system turn may only come first", id="system-not-first"),
    pytest.param({"instruction": "Do it", "input": ""}, "missing 'output' (keys: instruction, input)",
                 id="alpaca-no-output"),
    pytest.param({"instruction": ["a"], "output": "b"}, "'instruction' must be a string, got a JSON array",
                 id="alpaca-wrong-type"),
    pytest.param({"instruction": " ", "output": "b"}, "'instruction' is missing or empty", id="alpaca-empty"),
    pytest.param({"conversations": {"from": "human"}}, "'conversations' is a JSON object; expected a non-empty list",
                 id="sharegpt-not-list"),
    pytest.param({"conversations": [{"from": "bot", "value": "x"}]},
                 "conversations[0]: unknown 'from' 'bot'; expected one of ['system', 'human'", id="sharegpt-role"),
    pytest.param({"conversations": [{"from": "human"}]}, "conversations[0]: 'value' is missing; expected a string",
                 id="sharegpt-no-value"),
    pytest.param({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]},
                 "conversations[1]: empty 'value' in a 'gpt' turn", id="sharegpt-empty"),
    pytest.param({**OPENAI, "family": 3}, "'family' must be a string, got a JSON number", id="family-not-string"),
]


@pytest.mark.parametrize(("bad", "problem"), BAD_RECORDS)
def test_bad_record_names_file_line_and_problem(tmp_path, bad, problem):
    raw = bad if isinstance(bad, str) else json.dumps(bad)
    path = write_jsonl(tmp_path / "data.jsonl", [OPENAI, SHAREGPT], raw_lines={1: "", 2: raw})  # blank line 2
    with pytest.raises(DataError) as excinfo:
        read_conversations(path)
    message = error_of(excinfo)
    assert message.startswith(f"{path}:3: ")
    assert problem in message


def test_skip_invalid_counts_and_keeps_the_good(tmp_path):
    raws = [b if isinstance(b, str) else json.dumps(b) for b, _ in (p.values for p in BAD_RECORDS)]
    lines = {2 * i + 1: raw for i, raw in enumerate(raws)}  # bad lines interleaved with good ones
    path = write_jsonl(tmp_path / "data.jsonl", [OPENAI] * (len(raws) + 1), raw_lines=lines)
    result = read_conversations(path, skip_invalid=True)
    assert len(result.conversations) == len(raws) + 1
    assert result.skipped == len(raws)
    assert len(result.skipped_examples) == 5 and result.skipped_examples[0].startswith(f"{path}:2: ")


# ---------------------------------------------------------------------------------------------
# Preferences


def answer(text: str) -> list[Message]:
    """A plain response as `Preference.responses` holds it: one assistant message."""
    return [Message("assistant", text)]


def test_preferences_both_shapes_and_chat_prompts(tmp_path):
    chat_prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "family": "math"},
            {"prompt": chat_prompt, "responses": ["Hello.", "Hi there, friend!", "Go away."]}]
    prefs = read_preferences(write_jsonl(tmp_path / "p.jsonl", rows)).preferences
    assert prefs[0].prompt == [Message("user", "2+2?")] and prefs[0].responses == [answer("4"), answer("5")]
    assert prefs[0].family == "math" and prefs[0].pairs() == [(answer("4"), answer("5"))]
    assert prefs[0].texts() == ["4", "5"] and prefs[0].tools == []
    assert prefs[1].prompt == [Message("system", "Be brief."), Message("user", "Hi")]
    assert prefs[1].responses[0] == answer("Hello.") and len(prefs[1].pairs()) == 3
    assert prefs[1].pairs()[1] == (answer("Hello."), answer("Go away."))


CALCULATOR = {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}


def used_calculator(result: str = "84", final: str = "It is 84.") -> list[dict]:
    """A response in TRL's conversational format: a call, its result, then the answer."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "calculator", "arguments": '{"expression": "12*7"}'}}
    return [{"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": result},
            {"role": "assistant", "content": final}]


def test_responses_may_be_answers_with_tool_turns_and_records_declare_their_tools(tmp_path):
    rows = [{"prompt": "12*7?", "chosen": used_calculator(), "rejected": "It is 85.", "tools": [CALCULATOR]},
            {"prompt": "12*7?", "responses": [used_calculator(), "84.", used_calculator("85", "It is 85.")]}]
    first, ranked = read_preferences(write_jsonl(tmp_path / "p.jsonl", rows)).preferences
    call = Message("tool_call", '{"name": "calculator", "arguments": {"expression": "12*7"}}')
    with_tools = [call, Message("tool_result", "84"), Message("assistant", "It is 84.")]
    assert first.responses == [with_tools, answer("It is 85.")]
    assert [m.call_id for m in first.responses[0]] == ["call_1", "call_1", None]  # kept for a round trip
    assert first.tools == [CALCULATOR["function"]] and ranked.tools == []
    assert first.conversation(first.responses[0]).messages == [Message("user", "12*7?"), *with_tools]
    assert first.conversation().tools == first.tools
    assert ranked.responses[1] == answer("84.") and len(ranked.pairs()) == 3
    with pytest.raises(ValueError, match="tool turns"):
        first.texts()


def test_a_string_response_is_the_same_as_one_assistant_message(tmp_path):
    rows = [{"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
            {"prompt": "q", "chosen": "a", "rejected": "b"}]
    as_messages, as_text = read_preferences(write_jsonl(tmp_path / "p.jsonl", rows)).preferences
    assert as_messages.responses == as_text.responses
    # a Preference made in code takes either too
    assert Preference([Message("user", "q")], ["a", answer("b")]).responses == as_text.responses


BAD_PREFERENCES = [
    pytest.param({"chosen": "a", "rejected": "b"}, "missing 'prompt'", id="no-prompt"),
    pytest.param({"prompt": "q", "chosen": "a"}, "missing 'rejected'", id="no-rejected"),
    pytest.param({"prompt": "q", "text": "a"}, "no 'chosen'/'rejected' or 'responses'", id="no-responses"),
    pytest.param({"prompt": "q", "chosen": "a", "rejected": "a"}, "'chosen' and 'rejected' are the same",
                 id="same-pair"),
    pytest.param({"prompt": "q", "chosen": "", "rejected": "b"}, "'chosen' is empty", id="empty-chosen"),
    pytest.param({"prompt": "q", "responses": ["a"]}, "'responses' is a list of 1; expected a list of at least 2",
                 id="too-few"),
    pytest.param({"prompt": "q", "responses": ["a", "b", "a"]}, "responses[2] repeats responses[0]", id="duplicate"),
    pytest.param({"prompt": "q", "responses": ["a", 3]}, "responses[1] is a JSON number", id="not-string"),
    pytest.param({"prompt": "q", "responses": "a"}, "'responses' is a JSON string", id="responses-not-list"),
    pytest.param({"prompt": 7, "chosen": "a", "rejected": "b"}, "'prompt' is a JSON number; expected a string or",
                 id="prompt-type"),
    pytest.param({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                  "chosen": "a", "rejected": "b"}, "'prompt' ends with a turn of role 'assistant'",
                 id="prompt-not-user-last"),
    pytest.param({"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"},
                 "prompt[0]: unknown role 'robot'", id="prompt-bad-role"),
    # responses with tool turns: errors name the field and the message
    pytest.param({"prompt": "q", "chosen": used_calculator(), "rejected": used_calculator()},
                 "'chosen' and 'rejected' are the same", id="same-tool-pair"),
    pytest.param({"prompt": "q", "responses": [used_calculator(), "b", used_calculator()]},
                 "responses[2] repeats responses[0]", id="duplicate-tool-response"),
    pytest.param({"prompt": "q", "chosen": [], "rejected": "b"}, "'chosen' is an empty list", id="empty-list"),
    pytest.param({"prompt": "q", "chosen": {"role": "assistant", "content": "a"}, "rejected": "b"},
                 "'chosen' is a JSON object; expected a non-empty string or a list of OpenAI messages",
                 id="message-not-in-list"),
    pytest.param({"prompt": "q", "chosen": "a", "rejected": [{"role": "user", "content": "b"}]},
                 "rejected[0]: role 'user' in a response; expected 'assistant' or 'tool'", id="user-in-response"),
    pytest.param({"prompt": "q", "chosen": used_calculator()[1:], "rejected": "b"},
                 "chosen[0]: the response starts with a tool result", id="starts-with-result"),
    pytest.param({"prompt": "q", "chosen": used_calculator()[:2], "rejected": "b"},
                 "chosen[1]: the response ends with a tool result", id="ends-with-result"),
    pytest.param({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}, *used_calculator()[1:]],
                  "rejected": "b"}, "chosen[1]: a tool result without a call before it", id="result-without-call"),
    pytest.param({"prompt": "q", "chosen": "a", "rejected": [*used_calculator()[:1], {"role": "tool", "content": ""},
                                                             {"role": "assistant", "content": "b"}]},
                 "rejected[1]: empty content in a tool message", id="empty-result"),
    pytest.param({"prompt": "q", "responses": ["a", [{"role": "assistant", "content": "b", "tool_calls": [
                  {"function": {"name": "calculator", "arguments": "12*7"}}]}]]},
                 "responses[1][0].tool_calls[0].function.arguments: not valid JSON", id="bad-call-arguments"),
    pytest.param({"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": 3}]},
                 "rejected[0]: 'content' must be a string", id="content-type"),
    pytest.param({"prompt": "q", "chosen": "a", "rejected": "b", "tools": [{"name": "no spaces"}]},
                 "tools[0].name: expected 1 to 64 letters", id="bad-tools"),
]


@pytest.mark.parametrize(("bad", "problem"), BAD_PREFERENCES)
def test_bad_preference_records(tmp_path, bad, problem):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "p.jsonl", [good, bad, good])
    with pytest.raises(DataError) as excinfo:
        read_preferences(path)
    assert error_of(excinfo).startswith(f"{path}:2: ") and problem in error_of(excinfo)
    result = read_preferences(path, skip_invalid=True)
    assert len(result.preferences) == 2 and result.skipped == 1


def test_no_preferences_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "responses": ["a"]}])
    with pytest.raises(DataError, match=r"no valid preference records found \(1 invalid skipped"):
        read_preferences(path, skip_invalid=True)


# ---------------------------------------------------------------------------------------------
# Prompts


def test_prompts_from_strings_and_messages(tmp_path):
    rows = [{"prompt": "Tell me a joke.", "family": "jokes"},
            {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                          {"role": "assistant", "content": "A reference answer."}]},
            {"prompt": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                        {"role": "user", "content": "Q2"}]}]
    result = read_prompts(write_jsonl(tmp_path / "r.jsonl", rows))
    first, second, third = result.prompts
    assert first.messages == [Message("user", "Tell me a joke.")] and first.family == "jokes"
    assert second.messages == [Message("system", "S"), Message("user", "Q")]
    assert second.reference == "A reference answer." and second.family is None
    assert [m.content for m in third.messages] == ["Q1", "A1", "Q2"] and third.reference is None
    assert result.messages[0] == first.messages


BAD_PROMPTS = [
    pytest.param({"text": "hi"}, "no 'prompt' or 'messages' (keys: text)", id="no-prompt"),
    pytest.param({"prompt": "  "}, "'prompt' is empty", id="empty"),
    pytest.param({"prompt": []}, "'prompt' is an empty list", id="empty-list"),
    pytest.param({"messages": [{"role": "system", "content": "S"}]}, "'messages' ends with a turn of role 'system'",
                 id="system-only"),
    pytest.param({"messages": [{"role": "user", "content": "Q"}, {"role": "tool", "content": "r"}]},
                 "ends with a turn of role 'tool_result'; expected it to end with a user turn", id="tool-last"),
    pytest.param({"messages": [{"role": "assistant", "content": "A"}]}, "ends with a turn of role 'assistant'",
                 id="assistant-only"),
    pytest.param({"messages": [{"role": "user", "content": ""}]}, "messages[0]: empty content", id="empty-content"),
]


@pytest.mark.parametrize(("bad", "problem"), BAD_PROMPTS)
def test_bad_prompt_records(tmp_path, bad, problem):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "ok"}, bad])
    with pytest.raises(DataError) as excinfo:
        read_prompts(path)
    assert error_of(excinfo).startswith(f"{path}:2: ") and problem in error_of(excinfo)
    result = read_prompts(path, skip_invalid=True)
    assert len(result.prompts) == 1 and result.skipped == 1 and result.skipped_examples[0].startswith(f"{path}:2: ")
