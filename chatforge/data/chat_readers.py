"""Readers for the chat data users bring: SFT conversations, preferences and RL prompts.

Every reader takes one or many sources (files, directories, glob patterns; see `expand_paths`) of
JSON Lines (``.jsonl``) or JSON array (``.json``) files, one record per line or item:

- SFT conversations (`read_conversations`), in any of three formats, detected per record by its
  keys unless one is named:
  - ``messages`` (OpenAI): ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content"}]}``;
  - ``alpaca``: ``{"instruction", "input" (optional), "output", "system" (optional)}``; the user turn
    is the instruction, followed by a blank line and the input when the input is not empty;
  - ``sharegpt``: ``{"conversations": [{"from", "value"}], "system" (optional)}``, ``from`` one of
    `SHAREGPT_ROLES` (``function_call`` is a tool call, ``observation``/``tool`` a tool result).
- Preferences (`read_preferences`): ``{"prompt", "chosen", "rejected"}`` or ranked
  ``{"prompt", "responses": [best, ..., worst]}``. A response is a string (one assistant turn) or,
  as in TRL's conversational format, a list of OpenAI messages of roles ``assistant`` and ``tool``
  (an answer that used tools: its calls, their results and what followed), starting and ending
  with an assistant message. A top-level ``"tools"`` list declares the functions the prompt offered.
- RL prompts (`read_prompts`): ``{"prompt"}`` or ``{"messages"}``; a trailing assistant turn (a
  reference answer) is set aside. A top-level ``"tools"`` list declares the functions the prompt
  offers (evaluation runs them; the built-in task data's tool families carry them).

A ``prompt`` is a string (one user turn) or an OpenAI messages list ending with a user turn. Any
record may carry a string ``"family"`` (the built-in data labels its task families with it).

A bad record raises DataError whose one line starts with ``file:line:`` (``file: item N:`` in a
JSON array) and says what is wrong and what was expected. With ``skip_invalid=True`` bad records,
invalid JSON lines included, are counted and skipped instead; a file that cannot be read at all
still raises. Sources that yield no valid record at all raise DataError naming them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from chatforge.chat import OPENAI_ROLES, Conversation, Message, normalize_tools
from chatforge.data.readers import (
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    Sources,
    describe_paths,
    expand_paths,
    hold_out,
    is_json_array_file,
    json_type,
    read_json_array,
)
from chatforge.errors import ConfigError, DataError

FORMATS = ("auto", "messages", "alpaca", "sharegpt")
FORMAT_ALIASES = {"openai": "messages"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "tool_call",
    "observation": "tool_result",
    "tool": "tool_result",
}
#: How many error messages of skipped records a result keeps, to show the user what went wrong.
MAX_SKIPPED_EXAMPLES = 5

# The keys that mark each conversation format, in the order auto-detection tries them.
_FORMAT_KEYS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output")}
_FORMAT_SHAPES = {
    "messages": 'an OpenAI record {"messages": [{"role", "content"}, ...]}',
    "alpaca": 'an Alpaca record {"instruction", "input", "output"}',
    "sharegpt": 'a ShareGPT record {"conversations": [{"from", "value"}, ...]}',
}
CONVERSATION_EXPECTED = (
    'an OpenAI {"messages": [...]}, Alpaca {"instruction", "input", "output"} '
    'or ShareGPT {"conversations": [...]} record'
)
PREFERENCE_EXPECTED = 'a record {"prompt", "chosen", "rejected"} or {"prompt", "responses": [best, ..., worst]}'
_RESPONSE_TYPE = "a non-empty string or a list of OpenAI messages (roles 'assistant' and 'tool')"
_RANKED_TYPE = f"a list of at least 2 different responses, best first, each {_RESPONSE_TYPE}"
_RESPONSE_ROLES = ("assistant", "tool_result")  # what may follow the prompt within one answer
PROMPT_EXPECTED = 'a record {"prompt": "..."} or {"messages": [{"role", "content"}, ...]} ending with a user turn'
_PROMPT_TYPE = "a string or a list of {'role', 'content'} messages"

T = TypeVar("T")


@dataclass
class ReadResult:
    """The conversations read, the family of each (None when the record has none) and what was skipped."""

    conversations: list[Conversation]
    families: list[str | None]
    formats: Counter[str] = field(default_factory=Counter)  # records read per format
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)


Response = list[Message]  # one answer: assistant turns, with the tool calls and results between them


@dataclass
class Preference:
    """A prompt and its responses ordered best to worst (at least two, all different).

    Each response is a list of messages: one assistant message for a plain answer, or an answer
    that used tools (calls, results, what followed). A string given here is read as one assistant
    message. `tools` are the functions the prompt offered (bare OpenAI function objects), rendered
    in the system turn as SFT renders them.
    """

    prompt: list[Message]
    responses: list[Response]
    family: str | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.responses = [[Message("assistant", r)] if isinstance(r, str) else list(r) for r in self.responses]

    def pairs(self) -> list[tuple[Response, Response]]:
        """Every (better, worse) pair of responses, as a reward model or DPO trains on them."""
        r = self.responses
        return [(r[i], r[j]) for i in range(len(r)) for j in range(i + 1, len(r))]

    def conversation(self, response: Sequence[Message] = ()) -> Conversation:
        """The prompt, then `response`, with the prompt's tools: what the chat template renders."""
        return Conversation([*self.prompt, *response], self.tools)

    def texts(self) -> list[str]:
        """The responses as text, for callers of plain answers; ValueError when one used tools."""
        if any(len(r) != 1 or r[0].role != "assistant" for r in self.responses):
            raise ValueError("a response with tool turns has no single text; read `responses` instead")
        return [r[0].content for r in self.responses]


@dataclass
class PreferenceResult:
    preferences: list[Preference]
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)


@dataclass
class PromptRecord:
    """A prompt ending with a user turn; `reference` is the assistant turn that followed it, if any;
    `tools` the functions it declares (bare OpenAI function objects)."""

    messages: list[Message]
    family: str | None = None
    reference: str | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)

    def conversation(self) -> Conversation:
        """The prompt with its tools, as the chat template renders it."""
        return Conversation(list(self.messages), list(self.tools))


@dataclass
class PromptResult:
    prompts: list[PromptRecord]
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    @property
    def messages(self) -> list[list[Message]]:
        return [p.messages for p in self.prompts]


# ---------------------------------------------------------------------------------------------
# Public readers


def read_conversations(sources: Sources, format: str = "auto", skip_invalid: bool = False) -> ReadResult:
    """Read SFT conversations; `format` is "auto" (per record), "messages" ("openai"), "alpaca" or "sharegpt"."""
    fmt = _check_format(format)
    expected = CONVERSATION_EXPECTED if fmt == "auto" else _FORMAT_SHAPES[fmt]
    parsed, tally = _read(sources, lambda obj, where: _parse_conversation(obj, where, fmt), expected,
                          "conversations", skip_invalid)
    return ReadResult(
        conversations=[conv for conv, _, _ in parsed],
        families=[family for _, _, family in parsed],
        formats=Counter(kind for _, kind, _ in parsed),
        skipped=tally.skipped,
        skipped_examples=tally.examples,
    )


def read_preferences(sources: Sources, skip_invalid: bool = False) -> PreferenceResult:
    """Read preference records: a prompt with chosen/rejected or ranked responses (best first)."""
    parsed, tally = _read(sources, _parse_preference, PREFERENCE_EXPECTED, "preference records", skip_invalid)
    return PreferenceResult(parsed, tally.skipped, tally.examples)


def read_preference_splits(data: Sources, val: Sources, skip_invalid: bool, val_fraction: float, seed: int,
                           stage: str) -> tuple[list[Preference], list[Preference]]:
    """Training and held-out preferences: `val` when given, else a seeded share of `data`."""
    prefs = read_preferences(data, skip_invalid=skip_invalid).preferences
    if val:
        return prefs, read_preferences(val, skip_invalid=skip_invalid).preferences
    return hold_out(prefs, val_fraction, [seed, 104729], f"{stage}: preference records")


def read_prompts(sources: Sources, skip_invalid: bool = False) -> PromptResult:
    """Read RL prompts, each ending with a user turn (a trailing assistant turn becomes `reference`)."""
    parsed, tally = _read(sources, _parse_prompt_record, PROMPT_EXPECTED, "prompts", skip_invalid)
    return PromptResult(parsed, tally.skipped, tally.examples)


def detect_format(record: dict[str, Any]) -> str | None:
    """The conversation format a record's keys say it is in, or None when they match none."""
    for fmt, keys in _FORMAT_KEYS.items():
        if any(k in record for k in keys):
            return fmt
    return None


# ---------------------------------------------------------------------------------------------
# Files and records


@dataclass
class _Tally:
    skip_invalid: bool
    skipped: int = 0
    examples: list[str] = field(default_factory=list)

    def reject(self, error: DataError) -> None:
        if not self.skip_invalid:
            raise error
        self.skipped += 1
        if len(self.examples) < MAX_SKIPPED_EXAMPLES:
            self.examples.append(str(error))


def _read(
    sources: Sources, parse: Callable[[dict[str, Any], str], T], expected: str, what: str, skip_invalid: bool
) -> tuple[list[T], _Tally]:
    """Parse every record of `sources`; bad ones raise or are tallied; nothing valid at all raises."""
    paths = chat_paths(sources)
    tally = _Tally(skip_invalid)
    out: list[T] = []
    for path in paths:
        for where, value in _iter_values(path, expected):
            try:
                if isinstance(value, DataError):
                    raise value
                out.append(parse(_require_object(value, where, expected), where))
            except DataError as e:
                tally.reject(e)
    if not out:
        skipped = f" ({tally.skipped} invalid skipped; first: {tally.examples[0]})" if tally.skipped else ""
        raise DataError(f"{describe_paths(paths)}: no valid {what} found{skipped}; expected {expected}")
    return out, tally


def chat_paths(sources: Sources) -> list[Path]:
    """`expand_paths`, keeping only ``.jsonl``/``.json`` files from directories and globs.

    A directory of chat data often holds a README or a Parquet copy too, which are not records;
    a file named explicitly is read as JSON Lines whatever its extension, except Parquet.
    """
    items = [sources] if isinstance(sources, str | Path) else list(sources)
    found: dict[Path, None] = {}  # an ordered set
    if not items:
        raise DataError("no data sources given; expected files, directories or glob patterns")
    for item in items:
        paths = expand_paths(item)
        if not Path(item).expanduser().is_file():
            paths = [p for p in paths if p.suffix.lower() in JSONL_SUFFIXES]
            if not paths:
                raise DataError(f"{item}: no .jsonl or .json files found; expected JSON Lines or JSON array files")
        for path in paths:
            if path.suffix.lower() in PARQUET_SUFFIXES:
                raise DataError(f"{path}: Parquet is not supported for chat data; expected .jsonl or .json files")
            found.setdefault(path, None)
    return list(found)


def _iter_values(path: Path, expected: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, value)`` per record; an unparsable line yields its DataError as the value.

    Unlike `iter_jsonl`, a bad line does not end the file, so that `skip_invalid` can go past it.
    """
    try:
        if path.suffix.lower() == ".json" and is_json_array_file(path):
            yield from _iter_array_items(path, expected)
        else:
            yield from _iter_lines(path, expected)
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from e


def _iter_lines(path: Path, expected: str) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                where = f"{path}:{number}"
                yield where, _parse_line(line, where, expected)


def _parse_line(line: bytes, where: str, expected: str) -> Any:
    try:
        return json.loads(line)  # bytes: json detects UTF-8 and skips a byte-order mark
    except json.JSONDecodeError as e:
        return DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); expected {expected}")
    except UnicodeDecodeError:
        return DataError(f"{where}: invalid UTF-8 byte; expected {expected}")


def _iter_array_items(path: Path, expected: str) -> Iterator[tuple[str, Any]]:
    # a file that does not parse is unreadable as a whole, not one record: never skipped
    for number, item in enumerate(read_json_array(path, expected), start=1):
        yield f"{path}: item {number}", item


def _require_object(value: Any, where: str, expected: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{where}: got a JSON {json_type(value)}; expected {expected}")
    return value


def _keys(obj: dict[str, Any]) -> str:
    keys = list(obj)
    return f"keys: {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}" if keys else "no keys"


def _optional_str(obj: dict[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got a JSON {json_type(value)}")
    return value


def _required_text(obj: dict[str, Any], key: str, where: str) -> str:
    value = _optional_str(obj, key, where)
    if value is None:
        raise DataError(f"{where}: missing {key!r} ({_keys(obj)})")
    if not value.strip():
        raise DataError(f"{where}: {key!r} is empty; expected non-empty text")
    return value


def _system_turn(obj: dict[str, Any], where: str) -> list[Message]:
    system = _optional_str(obj, "system", where)
    return [Message("system", system)] if system and system.strip() else []


# ---------------------------------------------------------------------------------------------
# Conversations


def _check_format(format: str) -> str:
    fmt = FORMAT_ALIASES.get(format, format)
    if fmt not in FORMATS:
        raise ConfigError(f"unknown conversation format {format!r}; expected one of {list(FORMATS)} (or 'openai')")
    return fmt


def _parse_conversation(obj: dict[str, Any], where: str, fmt: str) -> tuple[Conversation, str, str | None]:
    kind = detect_format(obj) if fmt == "auto" else fmt
    if kind is None:
        raise DataError(f"{where}: unrecognised record ({_keys(obj)}); expected {CONVERSATION_EXPECTED}")
    if not any(k in obj for k in _FORMAT_KEYS[kind]):
        raise DataError(f"{where}: not {kind} data ({_keys(obj)}); expected {_FORMAT_SHAPES[kind]} (format={fmt!r})")
    family = _optional_str(obj, "family", where)
    return _CONVERTERS[kind](obj, where), kind, family


def _from_messages(obj: dict[str, Any], where: str) -> Conversation:
    """OpenAI's chat format; a top-level "tools" list (as in OpenAI's fine-tuning files) is declared in the
    system turn, so the model learns its calls beside the functions it was offered."""
    return Conversation.from_openai(obj["messages"], where, tools=obj.get("tools"))


def _from_alpaca(obj: dict[str, Any], where: str) -> Conversation:
    instruction = _optional_str(obj, "instruction", where)
    extra = _optional_str(obj, "input", where)
    output = _required_text(obj, "output", where)
    # An empty "input" is the common case in Alpaca data: the instruction alone is the user turn.
    user = "\n\n".join(part for part in (instruction, extra) if part and part.strip())
    if not user:
        raise DataError(f"{where}: 'instruction' is missing or empty; expected {_FORMAT_SHAPES['alpaca']}")
    conv = Conversation([*_system_turn(obj, where), Message("user", user), Message("assistant", output)])
    conv.check(where)
    return conv


def _from_sharegpt(obj: dict[str, Any], where: str) -> Conversation:
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if isinstance(turns, list) else f"a JSON {json_type(turns)}"
        raise DataError(f"{where}: 'conversations' is {got}; expected a non-empty list of {{'from', 'value'}} objects")
    messages = [_sharegpt_turn(t, f"{where}: conversations[{i}]") for i, t in enumerate(turns)]
    conv = Conversation(_system_turn(obj, where) + messages)
    conv.check(where)
    return conv


def _sharegpt_turn(turn: Any, where: str) -> Message:
    if not isinstance(turn, dict):
        raise DataError(f"{where}: got a JSON {json_type(turn)}; expected an object with 'from' and 'value'")
    speaker = turn.get("from")
    if speaker is None:
        raise DataError(f"{where}: missing 'from'; expected one of {list(SHAREGPT_ROLES)}")
    role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
    if role is None:
        raise DataError(f"{where}: unknown 'from' {speaker!r}; expected one of {list(SHAREGPT_ROLES)}")
    value = turn.get("value")
    if not isinstance(value, str):
        got = "missing" if value is None else f"a JSON {json_type(value)}"
        raise DataError(f"{where}: 'value' is {got}; expected a string")
    if not value.strip():
        raise DataError(f"{where}: empty 'value' in a {speaker!r} turn")
    return Message(role, value)


_CONVERTERS: dict[str, Callable[[dict[str, Any], str], Conversation]] = {
    "messages": _from_messages,
    "alpaca": _from_alpaca,
    "sharegpt": _from_sharegpt,
}


# ---------------------------------------------------------------------------------------------
# Prompts and preferences


def prompt_messages(value: Any, where: str, key: str = "prompt") -> list[Message]:
    """A prompt given as a string (one user turn) or an OpenAI messages list, validated, unchecked ending."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: {key!r} is empty; expected non-empty text")
        return [Message("user", value)]
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else f"a JSON {json_type(value)}"
        raise DataError(f"{where}: {key!r} is {got}; expected {_PROMPT_TYPE}")
    return Conversation.from_openai(value, where, need_assistant=False, field=key).messages


def _require_user_last(messages: list[Message], where: str, key: str) -> None:
    if messages[-1].role != "user":
        last = messages[-1].role
        raise DataError(f"{where}: {key!r} ends with a turn of role {last!r}; expected it to end with a user turn")


def _parse_prompt_record(obj: dict[str, Any], where: str) -> PromptRecord:
    key = "prompt" if "prompt" in obj else "messages" if "messages" in obj else None
    if key is None:
        raise DataError(f"{where}: no 'prompt' or 'messages' ({_keys(obj)}); expected {PROMPT_EXPECTED}")
    family = _optional_str(obj, "family", where)
    messages = prompt_messages(obj[key], where, key)
    reference = None
    if len(messages) > 1 and messages[-1].role == "assistant":
        # Chat data reused as prompts: the answer that followed is kept aside, not shown to the policy.
        reference = messages.pop().content
    _require_user_last(messages, where, key)
    return PromptRecord(messages, family, reference, normalize_tools(obj.get("tools"), f"{where}: tools"))


def _parse_preference(obj: dict[str, Any], where: str) -> Preference:
    if "prompt" not in obj:
        raise DataError(f"{where}: missing 'prompt' ({_keys(obj)}); expected {PREFERENCE_EXPECTED}")
    responses = _responses(obj, where)
    prompt = prompt_messages(obj["prompt"], where)
    _require_user_last(prompt, where, "prompt")
    tools = normalize_tools(obj.get("tools"), f"{where}: tools")
    return Preference(prompt, responses, _optional_str(obj, "family", where), tools)


def _responses(obj: dict[str, Any], where: str) -> list[Response]:
    if "responses" in obj:
        return _ranked_responses(obj["responses"], where)
    if "chosen" not in obj and "rejected" not in obj:
        missing = f"no 'chosen'/'rejected' or 'responses' ({_keys(obj)})"
        raise DataError(f"{where}: {missing}; expected {PREFERENCE_EXPECTED}")
    for key in ("chosen", "rejected"):
        if obj.get(key) is None:
            raise DataError(f"{where}: missing {key!r} ({_keys(obj)})")
    chosen, rejected = (_response(obj[key], where, key) for key in ("chosen", "rejected"))
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same response; expected two different ones")
    return [chosen, rejected]


def _ranked_responses(value: Any, where: str) -> list[Response]:
    if not isinstance(value, list) or len(value) < 2:
        got = f"a list of {len(value)}" if isinstance(value, list) else f"a JSON {json_type(value)}"
        raise DataError(f"{where}: 'responses' is {got}; expected {_RANKED_TYPE}")
    responses = [_response(r, where, f"responses[{i}]") for i, r in enumerate(value)]
    # Messages compare as they render (a call's id is not rendered, so it is not compared).
    first = {tuple(r): i for i, r in reversed(list(enumerate(responses)))}
    for i, r in enumerate(responses):
        if first[tuple(r)] != i:
            raise DataError(f"{where}: responses[{i}] repeats responses[{first[tuple(r)]}]; expected {_RANKED_TYPE}")
    return responses


def _response(value: Any, where: str, key: str) -> Response:
    """One response: a string is one assistant turn; a list is an answer with tool turns (`_tool_response`)."""
    name = key if key.endswith("]") else repr(key)  # 'chosen', responses[2]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: {name} is empty; expected non-empty text")
        return [Message("assistant", value)]
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else f"a JSON {json_type(value)}"
        raise DataError(f"{where}: {name} is {got}; expected {_RESPONSE_TYPE}")
    return _tool_response(value, where, key)


def _tool_response(value: list[Any], where: str, key: str) -> Response:
    """An answer as OpenAI messages: assistant first and last, each tool result after a call.

    It ends with an assistant message, text or calls only: either way its last token is the
    `<|end|>` of a turn the model wrote, where the reward model reads its score. An answer that
    stops at a call is whole (OpenAI's finish_reason "tool_calls": the client runs the tool), so
    "call the calculator" may be preferred to a guess. A tool result last is refused: the model
    never wrote that turn, and nothing it said after reading the result would be judged.
    """
    roles = [_response_role(m, f"{where}: {key}[{i}]") for i, m in enumerate(value)]
    if roles[0] != "assistant" or roles[-1] != "assistant":
        i, end = (0, "starts") if roles[0] != "assistant" else (len(roles) - 1, "ends")
        raise DataError(f"{where}: {key}[{i}]: the response {end} with a tool result; expected an assistant message")
    for i in range(1, len(roles)):
        if roles[i] == "tool_result" and not (roles[i - 1] == "tool_result" or value[i - 1].get("tool_calls")):
            raise DataError(f"{where}: {key}[{i}]: a tool result without a call before it; expected it "
                            "after an assistant message with 'tool_calls' (or after another tool result)")
    return Conversation.from_openai(value, where, need_assistant=False, field=key).messages


def _response_role(message: Any, where: str) -> str:
    """The role (ours) of one message of a response, checked: assistant or tool, not empty."""
    if not isinstance(message, dict):
        raise DataError(f"{where}: got a JSON {json_type(message)}; expected an object with 'role' and 'content'")
    role = message.get("role")
    role = OPENAI_ROLES.get(role, role) if isinstance(role, str) else role
    if role not in _RESPONSE_ROLES:
        raise DataError(f"{where}: role {message.get('role')!r} in a response; expected 'assistant' or 'tool' "
                        "(the prompt holds the other turns)")
    content = message.get("content")
    if isinstance(content, str) and not content.strip() and (content or not message.get("tool_calls")):
        expected = "text or 'tool_calls'" if role == "assistant" else "non-empty text"
        raise DataError(f"{where}: empty content in a {message['role']} message; expected {expected}")
    return role
