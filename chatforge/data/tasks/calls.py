"""Tool calls in the task world: the world's functions, the built-in tools' specs, and responses that
are transcripts (calls, results, then the answer).

A response is either a string (one assistant turn, as every plain family has) or a transcript: a
tuple of messages of roles ``tool_call``, ``tool_result`` and ``assistant``, in the order the chat
template renders them after the prompt (``Response``). The files write a transcript as OpenAI
messages (an assistant message with ``tool_calls``, ``tool`` messages, the final answer), the format
the readers take.

The world's functions are lookups, one per attribute: ``get_<attribute>(<subject kind>)``, e.g.
``get_capital(country="Vovunia") -> "Kesh"``. Their specs are compact (a one-line description, one
string parameter) because they are declared in the system turn of a small model's short context, and
their implementations (``world_tools``) read the world, so a result in the data is what evaluation's
engine hands the model. Why lookups: every answer they give is a stored fact the scorer can check,
and choosing among several declared getters ("the river of X" beside get_capital and get_river) is
the choice the model must learn.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from chatforge.chat import Conversation, Message, tool_call_content
from chatforge.data.world import ATTRIBUTES, World
from chatforge.tools import Tool, ToolError, builtin_tools

Response = str | tuple[Message, ...]
FUNCTION_PREFIX = "get_"


def function_name(attribute: str) -> str:
    return FUNCTION_PREFIX + attribute


def function_attribute(name: str) -> str | None:
    """The attribute a world function looks up, or None when `name` is not one."""
    attribute = name.removeprefix(FUNCTION_PREFIX)
    return attribute if name.startswith(FUNCTION_PREFIX) and attribute in ATTRIBUTES else None


def function_spec(attribute: str) -> dict[str, Any]:
    """The compact OpenAI function object of `get_<attribute>`: one required string, the subject."""
    attr = ATTRIBUTES[attribute]
    kind = attr.subject_kind
    return {"name": function_name(attribute), "description": f"The {attr.label} of a {kind}.",
            "parameters": {"type": "object", "properties": {kind: {"type": "string"}}, "required": [kind]}}


def world_tools(world: World) -> dict[str, Tool]:
    """Every world function by name, implemented by looking the fact up (unknown names are an error)."""
    def lookup(attribute: str, arguments: dict[str, Any]) -> str:
        kind = ATTRIBUTES[attribute].subject_kind
        name = str(arguments.get(kind, "")).strip()
        entity = next((e for e in world.entities_of(kind) if e.name.lower() == name.lower()), None)
        if entity is None:
            raise ToolError(f"no {kind} named {name!r}")
        return entity.attributes[attribute]

    def tool(attribute: str) -> Tool:
        spec = function_spec(attribute)
        return Tool(spec["name"], spec["description"], spec["parameters"], lambda a: lookup(attribute, a))

    return {function_name(a): tool(a) for a in ATTRIBUTES}


def builtin_specs() -> list[dict[str, Any]]:
    """The calculator's and the calendar's function objects, as the system turn declares them."""
    return [t.spec() for t in builtin_tools().values()]


def task_tools(world: World, today: str) -> dict[str, Tool]:
    """What evaluation's engine runs: the built-in tools on the fixed clock `today`, and the world's functions."""
    day = datetime.date.fromisoformat(today)
    return builtin_tools(today=lambda: day) | world_tools(world)


# ---- transcripts -------------------------------------------------------------------------------


def transcript(calls: Sequence[tuple[str, dict[str, Any], str]], final: str) -> tuple[Message, ...]:
    """Calls (name, arguments, result) made in one turn, their results, then the answer `final`."""
    ids = [f"call_{i + 1}" for i in range(len(calls))]
    out = [Message("tool_call", tool_call_content(n, a), i) for (n, a, _), i in zip(calls, ids)]
    out += [Message("tool_result", r, i) for (_, _, r), i in zip(calls, ids)]
    return (*out, Message("assistant", final))


def final_text(response: Response) -> str:
    """What the assistant says after its last tool result (all its text when it called nothing)."""
    if isinstance(response, str):
        return response
    last = max((i for i, m in enumerate(response) if m.role == "tool_result"), default=-1)
    return " ".join(m.content for m in response[last + 1:] if m.role == "assistant")


def spoken_text(response: Response) -> str:
    """Everything the assistant says in words (calls and results left out): what padding is judged on."""
    if isinstance(response, str):
        return response
    return " ".join(m.content for m in response if m.role == "assistant")


def with_final(response: Response, final: str) -> Response:
    """`response` with its final answer replaced by `final`."""
    if isinstance(response, str):
        return final
    return (*response[:-1], Message("assistant", final))


def as_response(response: str | Sequence[Message] | Sequence[dict[str, Any]]) -> Response:
    """A string, or a transcript as a tuple (OpenAI messages, as the files write them, are read); a
    transcript of one assistant message is its string."""
    if isinstance(response, str):
        return response
    messages = tuple(response)
    if messages and all(isinstance(m, dict) for m in messages):
        messages = tuple(Conversation.from_openai(list(messages), "response", need_assistant=False).messages)
    return messages[0].content if len(messages) == 1 and messages[0].role == "assistant" else messages


def response_json(response: Response) -> str | list[dict[str, Any]]:
    """A response as the files write it: the string, or OpenAI messages (calls in ``tool_calls``)."""
    return response if isinstance(response, str) else Conversation(list(response)).to_openai()


def response_key(response: Response) -> str:
    """A string that orders and tells responses apart: the text, or the transcript's turns in order."""
    if isinstance(response, str):
        return response
    return "\n".join(f"[{m.role}] {m.content}" for m in response)
