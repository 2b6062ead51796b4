"""The chat template: conversations as token ids, with the mask that says which tokens are trained.

A conversation is a list of turns. Each turn is rendered as its role's special token, the
content's tokens, and the end-of-turn token:

    <|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|>

Tools (OpenAI function specs) go at the end of the system turn, after a blank line, a header and
one JSON object per line; with tools and no system message the system turn holds only them. A tool
call belongs to the assistant's turn: its text (if any), then `<|tool_call|>` and the call as JSON
`{"name": ..., "arguments": {...}}` for each call, then one `<|end|>`. A tool's answer is a
`<|tool_result|>` turn, and the assistant's next turn follows as usual:

    <|system|>Be brief.

    Tools you can call, one JSON object per line:
    {"name": "weather", "parameters": {"type": "object"}}<|end|><|user|>Weather?<|end|>
    <|assistant|>Checking.<|tool_call|>{"name": "weather", "arguments": {}}<|end|>
    <|tool_result|>sunny<|end|><|assistant|>Sunny.<|end|>

(line breaks after each `<|end|>` are for reading only). Content is encoded with
`allow_special=False`, so a user who types "<|end|>" gets plain text, never a control token. The
model is trained (mask True) on what it must produce: an assistant turn after its `<|assistant|>`
marker, its text, calls (markers included: the model decides to call a tool) and closing `<|end|>`
(so it learns to stop). A generation prompt ends with `<|assistant|>`; generation stops at
`<|end|>` (or `<|endoftext|>`).

`CHAT_TEMPLATE` is the same template in Jinja, for transformers' `apply_chat_template`, vLLM and
llama.cpp; the Hugging Face and GGUF exports carry it.

Turns never split: a conversation too long for the context loses its oldest turns after the
system prompt (`fit_to_context`), and the caller is told how many messages went.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from chatforge.errors import DataError

ROLES = ("system", "user", "assistant", "tool_call", "tool_result")
TRAINED_ROLES = ("assistant", "tool_call")  # what the model produces
END_OF_TURN = "end_turn"  # SPECIAL_TOKENS key of <|end|>
CHAT_TOKENS = (*ROLES, END_OF_TURN, "eot")  # SPECIAL_TOKENS keys the template needs
OPENAI_ROLES = {"tool": "tool_result", "developer": "system"}  # OpenAI role -> ours
TOOLS_HEADER = "Tools you can call, one JSON object per line:"
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names

# The same template in Jinja. transformers' `tojson` is json.dumps(x, ensure_ascii=False) with
# default separators, as `render` writes tools and calls. Arguments given as a string are written
# as they are, so they must already be json.dumps(arguments, ensure_ascii=False) of an object (as
# `Conversation.to_openai` writes them); a mapping goes through `tojson`.
CHAT_TEMPLATE = """\
{#- chatforge's chat template: the token ids of chatforge.chat.ChatTemplate. Every turn is
<|role|>content<|end|>; tools end the system turn, one JSON object per line; an assistant's calls
follow its text in its turn as <|tool_call|>{"name": ..., "arguments": {...}}; `tool` is read as
tool_result and `developer` as system. Arguments given as a string are written as they are, so they
must be json.dumps(arguments, ensure_ascii=False) of an object; a mapping goes through tojson. -#}
{%- set has_system = messages and messages[0]['role'] in ['system', 'developer'] -%}
{%- if has_system or tools -%}
<|system|>
{%- if has_system %}{{ messages[0]['content'] }}{% endif -%}
{%- if tools -%}
{%- if has_system and messages[0]['content'] %}{{ '\\n\\n' }}{% endif -%}
@TOOLS_HEADER@
{%- for tool in tools -%}
{{ '\\n' }}{{ (tool['function'] if tool['function'] is defined else tool) | tojson }}
{%- endfor -%}
{%- endif -%}
<|end|>
{%- endif -%}
{%- for message in (messages[1:] if has_system else messages) -%}
{%- if message['role'] == 'assistant' -%}
<|assistant|>
{%- if message['content'] is string %}{{ message['content'] }}{% endif -%}
{%- for call in (message['tool_calls'] or []) -%}
{%- set function = call['function'] if call['function'] is defined else call -%}
{%- set arguments = function['arguments'] if function['arguments'] is defined and function['arguments'] is not none \
else {} -%}
<|tool_call|>{"name": {{ function['name'] | tojson }}, "arguments": \
{{ arguments if arguments is string else arguments | tojson }}{{ '}' }}
{%- endfor -%}
<|end|>
{%- elif message['role'] in ['tool', 'tool_result'] -%}
<|tool_result|>{{ message['content'] }}<|end|>
{%- elif message['role'] in ['system', 'developer'] -%}
<|system|>{{ message['content'] }}<|end|>
{%- elif message['role'] == 'user' -%}
<|user|>{{ message['content'] }}<|end|>
{%- else -%}
{{ raise_exception("chatforge's chat template has no role " ~ message['role']) }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|assistant|>
{%- endif -%}
""".replace("@TOOLS_HEADER@", TOOLS_HEADER)


@dataclass(frozen=True)
class Message:
    """One message. `call_id` is the OpenAI id that pairs a tool call with its result (a call's
    `tool_calls[].id`, a result's `tool_call_id`): kept for a server's round trip, never rendered,
    and left out of equality, so a parsed conversation equals the one rendered."""

    role: str
    content: str
    call_id: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {list(ROLES)}")
        if not isinstance(self.content, str):
            raise ValueError(f"content of a {self.role} turn must be a string, got {type(self.content).__name__}")
        if self.call_id is not None and not isinstance(self.call_id, str):
            raise ValueError(f"call_id must be a string or None, got {type(self.call_id).__name__}")


@dataclass
class Conversation:
    """Messages, and the tools (bare OpenAI function objects) the model is offered."""

    messages: list[Message] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tools = normalize_tools(self.tools)

    @classmethod
    def from_openai(cls, messages: Any, where: str = "conversation", need_assistant: bool = True,
                    field: str = "messages", tools: Any = None) -> Conversation:
        """From OpenAI-style ``[{"role", "content"}, ...]`` and ``tools``; `where` names the record in errors.

        Role ``tool`` is read as ``tool_result`` and ``developer`` as ``system``. An assistant turn with
        ``tool_calls`` becomes its text (if any) and one ``tool_call`` message per call, its content
        the call as canonical JSON (`tool_call_content`).
        """
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        out = []
        for i, m in enumerate(messages):
            out.extend(_messages_from_openai(m, f"{where}: {field}[{i}]"))
        conv = cls(out, normalize_tools(tools, f"{where}: tools"))
        conv.check(where, need_assistant=need_assistant)
        return conv

    def to_openai(self) -> list[dict[str, Any]]:
        """OpenAI-style messages: calls go into their assistant message's ``tool_calls`` (arguments as a
        JSON string, ``id`` when known), results are role ``tool``. `from_openai` reads them back."""
        out: list[dict[str, Any]] = []
        for turn in group_turns(self.messages):
            if any(m.role == "tool_call" for m in turn):
                out.append(_assistant_to_openai(turn))
            else:
                out.extend(_message_to_openai(m) for m in turn)
        return out

    def check(self, where: str = "conversation", need_assistant: bool = True) -> None:
        """Raise DataError unless this is a trainable conversation: system first if any, content
        non-empty, and (with need_assistant) at least one assistant turn."""
        for i, m in enumerate(self.messages):
            if m.role == "system" and i != 0:
                raise DataError(f"{where}: messages[{i}]: a system turn may only come first")
            if not m.content.strip():
                raise DataError(f"{where}: messages[{i}]: empty content in a {m.role} turn")
        if need_assistant and not any(m.role in TRAINED_ROLES for m in self.messages):
            raise DataError(f"{where}: no assistant turn (nothing to learn from)")

    @property
    def system(self) -> Message | None:
        return self.messages[0] if self.messages and self.messages[0].role == "system" else None


# ---- tools and calls ---------------------------------------------------------------------------


def normalize_tools(tools: Any, where: str = "tools") -> list[dict[str, Any]]:
    """OpenAI tool specs as bare function objects (key order kept), checked; DataError names the field.

    Each tool is ``{"type": "function", "function": {...}}`` or the function object itself:
    ``name`` matching ``^[a-zA-Z0-9_-]{1,64}$``, optional string ``description``, optional object
    ``parameters`` (a JSON Schema, not checked further).
    """
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise DataError(f"{where}: expected a list of tools, got {type(tools).__name__}")
    return [_function_spec(t, f"{where}[{i}]") for i, t in enumerate(tools)]


def _function_spec(tool: Any, where: str) -> dict[str, Any]:
    """One tool's function object, checked."""
    if isinstance(tool, dict) and "function" in tool:
        if tool.get("type", "function") != "function":
            raise DataError(f"{where}.type: expected 'function', got {tool['type']!r}")
        tool, where = tool["function"], f"{where}.function"
    if not isinstance(tool, dict):
        raise DataError(f"{where}: expected a function object with 'name', got {type(tool).__name__}")
    _check_name(tool.get("name"), f"{where}.name")
    if "description" in tool and not isinstance(tool["description"], str):
        raise DataError(f"{where}.description: expected a string, got {type(tool['description']).__name__}")
    if "parameters" in tool and not isinstance(tool["parameters"], dict):
        raise DataError(f"{where}.parameters: expected a JSON Schema object, got {type(tool['parameters']).__name__}")
    return dict(tool)


def _check_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise DataError(f"{where}: expected 1 to 64 letters, digits, '_' or '-', got {name!r}")


def tool_call_content(name: Any, arguments: Any, where: str = "tool call") -> str:
    """A call as the template writes it: ``json.dumps({"name": name, "arguments": {...}}, ensure_ascii=False)``.

    `arguments` is an object, the JSON text of one (OpenAI sends a string), or None (no arguments).
    """
    _check_name(name, f"{where}.name")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise DataError(f"{where}.arguments: not valid JSON; expected a JSON object") from None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise DataError(f"{where}.arguments: expected a JSON object, got {type(arguments).__name__}")
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


# what a call starts with, whitespace allowed where JSON allows it: the name, then the arguments
CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def split_call(text: str) -> tuple[str, str] | None:
    """A generated call's (name, arguments text as written), or None when its name cannot be read.
    The arguments are what follows ``"arguments":`` up to the call's closing brace; a model may write
    them as JSON that does not parse, and OpenAI's API passes such arguments on as written."""
    head = CALL_HEAD.match(text)
    if head is None:
        return None
    rest = text[head.end():].rstrip()
    return json.loads(f'"{head.group(1)}"'), rest[:-1].rstrip() if rest.endswith("}") else rest


def read_tool_call(content: str, where: str = "tool call") -> tuple[str, dict[str, Any]]:
    """A call's (name, arguments) from its JSON text (a tool_call message's content, a generated call)."""
    try:
        call = json.loads(content)
    except ValueError:
        raise DataError(f"{where}: not valid JSON; expected {{\"name\": ..., \"arguments\": {{...}}}}") from None
    if not isinstance(call, dict):
        raise DataError(f"{where}: expected a JSON object with 'name' and 'arguments', got {type(call).__name__}")
    checked = json.loads(tool_call_content(call.get("name"), call.get("arguments"), where))
    return checked["name"], checked["arguments"]


def tools_block(tools: Sequence[dict[str, Any]]) -> str:
    """The system turn's tools part: the header, then one JSON object per line."""
    return "\n".join([TOOLS_HEADER, *(json.dumps(t, ensure_ascii=False) for t in tools)])


def split_tools_block(text: str) -> tuple[str, list[dict[str, Any]] | None]:
    """A system turn's text as (system text, tools), or (text, None) when it ends in no tools block.

    JSON lines hold no raw newline, so the last blank line before the header starts the block.
    """
    marker = TOOLS_HEADER + "\n"
    at = text.rfind("\n\n" + marker)
    if at >= 0:
        head, block = text[:at], text[at + 2 + len(marker):]
    elif text.startswith(marker):
        head, block = "", text[len(marker):]
    else:
        return text, None
    try:
        return head, normalize_tools([json.loads(line) for line in block.split("\n")])
    except (ValueError, DataError):  # json's errors are ValueErrors
        return text, None


def group_turns(messages: Sequence[Message]) -> list[list[Message]]:
    """Messages grouped as rendered turns: a tool_call joins the assistant turn (text or calls) before it."""
    turns: list[list[Message]] = []
    for m in messages:
        if m.role == "tool_call" and turns and turns[-1][-1].role in TRAINED_ROLES:
            turns[-1].append(m)
        else:
            turns.append([m])
    return turns


def with_tools(conv: Conversation | Sequence[Message]) -> list[Message]:
    """The messages with the tools block appended to the system message (made when there is none)."""
    messages = conv.messages if isinstance(conv, Conversation) else list(conv)
    tools = conv.tools if isinstance(conv, Conversation) else []
    if not tools:
        return messages
    system, rest = (messages[0].content, messages[1:]) if messages and messages[0].role == "system" else ("", messages)
    return [Message("system", (system + "\n\n" if system else "") + tools_block(tools)), *rest]


# ---- OpenAI messages -----------------------------------------------------------------------------


def _messages_from_openai(m: Any, where: str) -> list[Message]:
    if not isinstance(m, dict):
        raise DataError(f"{where}: expected an object with 'role' and 'content', got {type(m).__name__}")
    role = m.get("role")
    if role is None:
        raise DataError(f"{where}: missing 'role'")
    role = OPENAI_ROLES.get(role, role) if isinstance(role, str) else role
    if role == "assistant" and m.get("tool_calls"):
        return _assistant_from_openai(m, where)
    if role not in ROLES:
        raise DataError(f"{where}: unknown role {role!r}; expected one of {list(ROLES)} (or 'tool', 'developer')")
    content = m.get("content")
    if content is None:
        raise DataError(f"{where}: missing 'content'")
    if not isinstance(content, str):
        raise DataError(f"{where}: 'content' must be a string, got {type(content).__name__}")
    call_id = m.get("tool_call_id") if role == "tool_result" else None
    return [Message(role, content, call_id if isinstance(call_id, str) else None)]


def _assistant_from_openai(m: dict[str, Any], where: str) -> list[Message]:
    """An assistant message with ``tool_calls``: its text (when not empty), then one message per call."""
    calls = m["tool_calls"]
    if not isinstance(calls, list):
        raise DataError(f"{where}: 'tool_calls' must be a list")
    content = m.get("content")
    text = [Message("assistant", content)] if isinstance(content, str) and content else []
    return text + [_call_from_openai(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]


def _call_from_openai(call: Any, where: str) -> Message:
    """``{"id", "type": "function", "function": {"name", "arguments"}}`` (or the function alone) as a message."""
    if not isinstance(call, dict):
        raise DataError(f"{where}: expected an object, got {type(call).__name__}")
    function = call.get("function", call)
    if "function" in call:
        where += ".function"
    if not isinstance(function, dict):
        raise DataError(f"{where}: expected an object with 'name' and 'arguments', got {type(function).__name__}")
    content = tool_call_content(function.get("name"), function.get("arguments"), where)
    call_id = call.get("id")
    return Message("tool_call", content, call_id if isinstance(call_id, str) else None)


def _assistant_to_openai(turn: list[Message]) -> dict[str, Any]:
    text = turn[0].content if turn[0].role == "assistant" else None
    calls = []
    for m in turn:
        if m.role != "tool_call":
            continue
        try:
            name, arguments = read_tool_call(m.content)
            written = json.dumps(arguments, ensure_ascii=False)
        except DataError:  # a model's call that is not valid JSON: as the server answers it (serve/tools.py)
            split = split_call(m.content)
            if split is None:  # not even its name is readable: it was text
                text = (text or "") + m.content
                continue
            name, written = split
        call = {"type": "function", "function": {"name": name, "arguments": written}}
        calls.append({"id": m.call_id, **call} if m.call_id else call)
    return {"role": "assistant", "content": text, "tool_calls": calls}


def _message_to_openai(m: Message) -> dict[str, Any]:
    if m.role != "tool_result":
        return {"role": m.role, "content": m.content}
    out = {"role": "tool", "content": m.content}
    return {**out, "tool_call_id": m.call_id} if m.call_id else out


# ---- rendering and parsing -----------------------------------------------------------------------


@dataclass
class Rendered:
    ids: list[int]
    mask: list[bool]  # True where the token is trained (predicted from what comes before it)
    turn_starts: list[int]  # index in ids where each rendered turn starts


def has_chat_tokens(tokenizer: Any) -> bool:
    """Whether `tokenizer` has every special token the chat template uses (a GPT-2 import may not)."""
    ids = getattr(tokenizer, "special_ids", {})
    return all(k in ids for k in CHAT_TOKENS)


class ChatTemplate:
    """Renders and parses conversations with one tokenizer's special tokens."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        ids = tokenizer.special_ids
        self.role_ids = {role: ids[role] for role in ROLES}
        self.end_id = ids[END_OF_TURN]
        self.eot_id = ids["eot"]
        self._role_of = {self.role_ids[r]: r for r in ROLES if r != "tool_call"}  # turn openers

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end an assistant's turn."""
        return [self.end_id, self.eot_id]

    @property
    def tool_call_id(self) -> int:
        """The id of `<|tool_call|>`, which starts each call inside an assistant turn."""
        return self.role_ids["tool_call"]

    def render_turn(self, turn: Message | Sequence[Message]) -> tuple[list[int], list[bool]]:
        """One rendered turn (a message, or an assistant's text and calls) and its mask."""
        turn = [turn] if isinstance(turn, Message) else list(turn)
        if turn[0].role in TRAINED_ROLES:
            return self._assistant_turn(turn)
        ids = [self.role_ids[turn[0].role], *self.tokenizer.encode(turn[0].content), self.end_id]
        return ids, [False] * len(ids)

    def _assistant_turn(self, turn: list[Message]) -> tuple[list[int], list[bool]]:
        """`<|assistant|>` (not trained), then text, each `<|tool_call|>` + JSON, and `<|end|>` (trained)."""
        body: list[int] = []
        for m in turn:
            body += [self.tool_call_id] if m.role == "tool_call" else []
            body += self.tokenizer.encode(m.content)
        ids = [self.role_ids["assistant"], *body, self.end_id]
        return ids, [False] + [True] * (len(ids) - 1)

    def render(self, conv: Conversation | Sequence[Message]) -> Rendered:
        ids: list[int] = []
        mask: list[bool] = []
        starts = []
        for turn in group_turns(with_tools(conv)):
            starts.append(len(ids))
            t_ids, t_mask = self.render_turn(turn)
            ids += t_ids
            mask += t_mask
        return Rendered(ids, mask, starts)

    def generation_prompt(self, conv: Conversation | Sequence[Message]) -> list[int]:
        """The conversation so far followed by `<|assistant|>`: what the model continues."""
        return self.render(conv).ids + [self.role_ids["assistant"]]

    def fit_to_context(
        self, conv: Conversation | Sequence[Message], max_tokens: int, reserve: int = 0
    ) -> tuple[list[int], int]:
        """A generation prompt of at most `max_tokens - reserve` tokens, and how many messages were dropped.

        The oldest turns after the system prompt (and its tools, which always stay) go first, whole, and
        with them the answers, tool calls and tool results of a dropped question, so what is kept
        starts with a user turn; the latest turn always stays. Raises DataError when the system prompt
        and the latest turn alone do not fit.
        """
        messages = with_tools(conv)
        budget = max_tokens - reserve
        head = messages[:1] if messages and messages[0].role == "system" else []
        turns = group_turns(messages[len(head):])
        lengths = [len(self.render_turn(t)[0]) for t in turns]
        total = len(self.render(head).ids) + sum(lengths) + 1  # + <|assistant|>
        gone = dropped = 0
        while gone < len(turns) - 1 and (total > budget or (gone and turns[gone][0].role != "user")):
            total -= lengths[gone]
            dropped += len(turns[gone])
            gone += 1
        if total > budget:
            raise DataError(
                f"the system prompt and the latest message need {total} tokens, more than the "
                f"{budget} available ({max_tokens} context - {reserve} reserved for the reply)"
            )
        return self.generation_prompt(head + [m for t in turns[gone:] for m in t]), dropped

    def split_tool_calls(self, ids: Sequence[int]) -> tuple[list[int], list[list[int]]]:
        """An assistant turn's ids (what follows `<|assistant|>`) as its text's ids and each call's JSON ids.

        For the engine: a closing stop id (`<|end|>`, `<|endoftext|>`) is dropped; decode each call
        and read it with `read_tool_call`.
        """
        ids = [int(t) for t in ids]
        if ids and ids[-1] in self.stop_ids:
            ids.pop()
        parts: list[list[int]] = [[]]
        for t in ids:
            if t == self.tool_call_id:
                parts.append([])
            else:
                parts[-1].append(t)
        return parts[0], parts[1:]

    def parse(self, ids: Sequence[int]) -> Conversation:
        """The inverse of `render`: split at role markers, each turn ending at `<|end|>`.

        A trailing turn without `<|end|>` (a generation cut short) keeps what it has. A
        `<|tool_call|>` where a turn should start is read as an assistant turn that starts with a call.
        """
        messages: list[Message] = []
        tools: list[dict[str, Any]] = []
        role: str | None = None
        content: list[int] = []
        for t in ids:
            t = int(t)
            if role is None:
                if t in self._role_of:
                    role, content = self._role_of[t], []
                elif t == self.tool_call_id:
                    role, content = "assistant", [t]
                elif t != self.eot_id:
                    raise DataError(f"token {t} outside a turn; expected a role marker")
            elif t == self.end_id:
                messages += self._turn_messages(role, content, tools)
                role = None
            else:
                content.append(t)
        if role is not None:
            messages += self._turn_messages(role, content, tools)
        return Conversation(messages, tools)

    def _turn_messages(self, role: str, content: list[int], tools: list[dict[str, Any]]) -> list[Message]:
        """The messages of one parsed turn; a system turn's tools go into `tools`."""
        decode = self.tokenizer.decode
        if role == "assistant":
            text, calls = self.split_tool_calls(content)
            head = [Message("assistant", decode(text))] if text or not calls else []
            return head + [Message("tool_call", decode(c)) for c in calls]
        if role == "system":
            text, found = split_tools_block(decode(content))
            tools += found or []
            return [Message("system", text)] if text or found is None else []
        return [Message(role, decode(content))]
