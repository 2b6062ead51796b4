"""OpenAI function calling on /v1/chat/completions: the request's tools checked, and the model's calls
turned into ``tool_calls``.

A request declares functions (``tools``, or the legacy ``functions``) and says how the model may use
them (``tool_choice``, or the legacy ``function_call``: ``none``, ``auto``, ``required`` or a named
function; ``parallel_tool_calls``). Every mistake is a 400 naming its field: a tool that is not
``{"type": "function", "function": {...}}``, a parameters schema that is not valid JSON Schema, a named
choice that is not declared, a ``role: "tool"`` message whose ``tool_call_id`` answers no earlier call.

The template renders the declared functions into the system turn (chat.py); the model writes each
call as ``<|tool_call|>{"name": ..., "arguments": {...}}``, which the engine reads as a call
(generate/tool_loop.py). ``none`` bans the call marker; ``required`` and a named function make the
answer a call under a grammar, so it parses whatever the model; ``auto`` leaves the choice to the
model. The server's built-in tools (``chatforge serve --builtin-tools``) are declared beside the
client's and run by the engine mid-answer; calls to the client's functions end the answer with
``finish_reason: "tool_calls"`` and come back as ``message.tool_calls`` (``id``, ``type: "function"``,
``function.name``, ``function.arguments`` as a JSON string); a stream sends each call's ``index``,
``id`` and ``name`` once, then its arguments in fragments, as OpenAI does.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from chatforge.chat import CALL_HEAD, normalize_tools, split_call
from chatforge.errors import ChatforgeError
from chatforge.serve.errors import APIError
from chatforge.tools import Tool

CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class FunctionCalling:
    """A chat request's functions and how the model may call them."""

    functions: list[dict[str, Any]]  # what the model is shown: the built-in tools', then the client's
    choice: str  # "none", "auto", "required" or "function" (then `named`)
    named: str | None = None
    parallel: bool = True
    builtin: Mapping[str, Tool] = field(default_factory=dict)
    legacy: bool = False  # declared with `functions`: the answer carries `function_call` too

    @property
    def client_functions(self) -> list[dict[str, Any]]:
        return [f for f in self.functions if f["name"] not in self.builtin]

    @property
    def forced(self) -> list[dict[str, Any]]:
        """The functions the answer must call one of (required / named), or [] when it may answer."""
        if self.choice == "required":
            return self.functions
        if self.choice == "function":
            return [f for f in self.functions if f["name"] == self.named]
        return []


def read_function_calling(body: Any, builtin: Mapping[str, Tool]) -> FunctionCalling | None:
    """The request's function calling, checked; None when it declares nothing and the server runs no tools."""
    if body.tools is not None and body.functions is not None:
        raise APIError(400, "give tools or the legacy functions, not both", param="functions")
    legacy = body.tools is None and body.functions is not None
    declared = _read_functions(body.functions if legacy else body.tools, "functions" if legacy else "tools", legacy)
    taken = [f["name"] for f in declared if f["name"] in builtin]
    if taken:
        raise APIError(400, f"tools: {taken[0]!r} is the name of one of this server's built-in tools "
                       f"({sorted(builtin)}); rename the function", param="tools")
    functions = [t.spec() for t in builtin.values()] + declared
    choice, named = _read_choice(body, {f["name"] for f in functions})
    if not functions:
        if choice not in ("none", "auto"):
            raise APIError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
        return None
    parallel = True if body.parallel_tool_calls is None else body.parallel_tool_calls
    return FunctionCalling(functions, choice, named, parallel, dict(builtin), legacy)


def _read_functions(tools: Any, where: str, legacy: bool) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise APIError(400, f"{where} must be a list", param=where)
    for i, tool in enumerate(tools):
        if not legacy and isinstance(tool, dict) and tool.get("type", "function") != "function":
            raise APIError(400, f"{where}[{i}].type: only 'function' tools are supported, got {tool.get('type')!r}",
                           param=f"{where}[{i}].type")
        if not legacy and isinstance(tool, dict) and "function" not in tool:
            raise APIError(400, f"{where}[{i}]: expected {{'type': 'function', 'function': {{...}}}}",
                           param=f"{where}[{i}]")
    try:
        functions = normalize_tools(tools, where)
    except ChatforgeError as e:
        raise APIError(400, str(e), param=where) from None
    names = [f["name"] for f in functions]
    for i, f in enumerate(functions):
        where_i = f"{where}[{i}]" if legacy else f"{where}[{i}].function"
        if names.index(f["name"]) != i:
            raise APIError(400, f"{where_i}.name: {f['name']!r} is declared twice", param=f"{where_i}.name")
        _check_schema(f.get("parameters"), f"{where_i}.parameters")
    return functions


def _check_schema(schema: Any, where: str) -> None:
    if schema is None:
        return
    if not isinstance(schema, dict):
        raise APIError(400, f"{where}: expected a JSON Schema object, got {type(schema).__name__}", param=where)
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as e:
        at = "/".join(str(p) for p in e.path)
        raise APIError(400, f"{where}: not a valid JSON Schema{f' at {at}' if at else ''}: {e.message}",
                       param=where) from None
    if schema.get("type", "object") != "object":
        raise APIError(400, f"{where}: a function's parameters must be an object schema, got type "
                       f"{schema.get('type')!r}", param=where)


def _read_choice(body: Any, names: set[str]) -> tuple[str, str | None]:
    """("none" | "auto" | "required", None) or ("function", name), from tool_choice or function_call."""
    if body.tool_choice is not None and body.function_call is not None:
        raise APIError(400, "give tool_choice or the legacy function_call, not both", param="function_call")
    param = "function_call" if body.function_call is not None else "tool_choice"
    value = body.function_call if body.function_call is not None else body.tool_choice
    if value is None:
        return "auto", None
    if isinstance(value, str):
        allowed = ("none", "auto") if param == "function_call" else CHOICES
        if value not in allowed:
            raise APIError(400, f"{param}: expected one of {list(allowed)} or a named function, got {value!r}",
                           param=param)
        return value, None
    name = _named(value, param)
    if name not in names:
        raise APIError(400, f"{param}: function {name!r} is not among the declared tools ({sorted(names)})",
                       param=param)
    return "function", name


def _named(value: Any, param: str) -> str:
    function = value.get("function", value) if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        expected = "{'name': ...}" if param == "function_call" else "{'type': 'function', 'function': {'name': ...}}"
        raise APIError(400, f"{param}: expected a string or {expected}", param=param)
    return name


def check_tool_messages(messages: Sequence[Any]) -> None:
    """Every ``role: "tool"`` message answers a call an earlier assistant message made (by its id), and
    every legacy ``role: "function"`` message a ``function_call`` of its ``name``."""
    calls: set[str] = set()
    functions: set[str] = set()
    for i, m in enumerate(messages):
        if m.role == "assistant":
            calls |= {c.get("id") for c in (m.tool_calls or []) if isinstance(c, dict) and c.get("id")}
            functions |= {m.function_call.get("name")} if isinstance(m.function_call, dict) else set()
        elif m.role == "function":
            if m.name not in functions:
                raise APIError(400, f"messages[{i}].name: {m.name!r} matches no function_call of an earlier "
                               "assistant message", param=f"messages[{i}].name")
        elif m.role == "tool":
            if m.tool_call_id is None:
                raise APIError(400, f"messages[{i}].tool_call_id: a tool message needs the id of the call it "
                               "answers", param=f"messages[{i}].tool_call_id")
            if m.tool_call_id not in calls:
                raise APIError(400, f"messages[{i}].tool_call_id: {m.tool_call_id!r} matches no tool call of an "
                               "earlier assistant message", param=f"messages[{i}].tool_call_id")


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def openai_tool_calls(calls: Sequence[str], parallel: bool = True) -> tuple[list[dict[str, Any]], str]:
    """The answer's calls as OpenAI ``tool_calls``, and the text of any call whose name could not be read
    (it is the answer's content then). Without `parallel`, only the first call counts."""
    out, text = [], ""
    for call in calls[: 1 if not parallel else None]:
        split = split_call(call)
        if split is None:
            text += call
            continue
        name, arguments = split
        out.append({"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}})
    return out, text


class CallStream:
    """One streamed choice's calls as OpenAI tool-call deltas: the first delta of a call carries its
    ``index``, ``id``, ``type`` and ``name`` (sent once the name is complete), later ones argument
    fragments. The call's closing brace is held back until the call ends, since it is not arguments."""

    def __init__(self, parallel: bool = True, skip: frozenset[str] = frozenset()) -> None:
        self.parallel = parallel
        self.skip = skip  # names of calls not to send (the built-in tools the engine runs)
        self.skipped: set[int] = set()
        self.texts: dict[int, str] = {}  # engine call index -> its text so far
        self.sent: dict[int, int] = {}  # engine call index -> characters of arguments sent
        self.index: dict[int, int] = {}  # engine call index -> OpenAI tool_calls index
        self.ids: dict[int, str] = {}

    def push(self, call_index: int, text: str) -> list[dict[str, Any]]:
        """Deltas for new call text; at most one call without `parallel`."""
        if call_index in self.skipped or (not self.parallel and any(i != call_index for i in self.index)):
            return []
        self.texts[call_index] = self.texts.get(call_index, "") + text
        return self._deltas(call_index, final=False)

    def finish(self) -> list[dict[str, Any]]:
        """What every open call still holds back, at the end of the answer."""
        return [d for i in list(self.texts) if i in self.index for d in self._deltas(i, final=True)]

    def unread(self) -> str:
        """The text of calls whose name never became readable (shown as content at the end)."""
        return "".join(t for i, t in self.texts.items() if i not in self.index and i not in self.skipped)

    @property
    def sent_any(self) -> bool:
        return bool(self.index)

    def _deltas(self, i: int, final: bool) -> list[dict[str, Any]]:
        text = self.texts[i]
        head = CALL_HEAD.match(text)
        if head is None:
            return []
        out = []
        if i in self.skipped:
            return []
        if i not in self.index:
            name = json.loads(f'"{head.group(1)}"')
            if name in self.skip:
                self.skipped.add(i)
                return []
            self.index[i], self.ids[i], self.sent[i] = len(self.index), new_call_id(), 0
            out.append({"index": self.index[i], "id": self.ids[i], "type": "function",
                        "function": {"name": name, "arguments": ""}})
        arguments = text[head.end():]
        stripped = arguments.rstrip()
        # hold back what may be the call's closing brace (and the space before it) until the call ends
        ready = stripped[:-1].rstrip() if (final and stripped.endswith("}")) else (
            stripped[:-1] if stripped.endswith("}") else stripped)
        fragment = ready[self.sent[i]:]
        if fragment:
            self.sent[i] = len(ready)
            out.append({"index": self.index[i], "function": {"arguments": fragment}})
        return out
