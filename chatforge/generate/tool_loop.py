"""The tool-call loop: a generated assistant turn read as text and calls, and built-in tools run mid-answer.

With a request's `ToolUse`, the engine reads each row's tokens the way the chat template writes an
assistant turn (chat.py): text, then for each call `<|tool_call|>` and its JSON, then `<|end|>`. A
call's tokens are not text: they add nothing to the answer's text and stop strings do not look at
them; the stream reports them as `CallDelta`s. When a turn ends with calls:

- if every call names a tool the engine runs itself (`ToolUse.run`: the built-in calculator and
  calendar), each runs (`chatforge.tools.run_tool_call`: a failing or abusive call becomes an error
  result, never an exception) and the engine feeds the results into the row as the template writes
  them: `<|end|>`, then `<|tool_result|>` result `<|end|>` per call, then `<|assistant|>`. Those
  tokens are the conversation, not samples: they are never sampled, get no logprobs, and count
  against the answer's token budget and the context like everything after the prompt. Then the
  model goes on, up to `max_rounds` rounds;
- otherwise (a function only the client can run) the row ends with finish_reason "tool_calls" and
  the calls go back to the caller, which answers with `role: "tool"` messages in a new request.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from chatforge.tools import Tool, ToolResult, run_tool_call

MAX_ROUNDS = 4  # tool rounds per answer: a model that keeps calling ends with "tool_calls" after these


@dataclass(frozen=True)
class ToolUse:
    """How a request treats the tool calls its model writes: the tools the engine runs itself, and how
    many rounds of them one answer may have. Calls to other names end the answer ("tool_calls")."""

    run: Mapping[str, Tool] = field(default_factory=dict)
    max_rounds: int = MAX_ROUNDS


@dataclass(frozen=True)
class CallDelta:
    """What one step added to a call being written: the call's index in the answer and its new text."""

    index: int
    text: str


@dataclass(frozen=True)
class ToolTurn:
    """A call the engine ran and its result, as the model wrote and then read them."""

    call: str  # the call's JSON text as generated
    result: str
    ok: bool


@dataclass(frozen=True)
class TurnIds:
    """The chat template's token ids the loop reads and writes."""

    call: int  # <|tool_call|>
    end: int  # <|end|>
    result: int  # <|tool_result|>
    assistant: int  # <|assistant|>

    @classmethod
    def of(cls, tokenizer: Any) -> TurnIds | None:
        """From the tokenizer's special ids; None for a tokenizer without the chat tokens."""
        ids = getattr(tokenizer, "special_ids", {})
        names = ("tool_call", "end_turn", "tool_result", "assistant")
        if not all(n in ids for n in names):
            return None
        return cls(*(ids[n] for n in names))


class CallReader:
    """One row's calls in its current turn: which one is open, and each one's text so far."""

    def __init__(self) -> None:
        self.calls: list[str] = []  # every call of the answer, in order (their index is the CallDelta's)
        self.turn_start = 0  # index in `calls` of the current turn's first call
        self.open = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def turn_calls(self) -> list[str]:
        """The current turn's calls."""
        return self.calls[self.turn_start:]

    def start_call(self) -> CallDelta:
        self._close()
        self.calls.append("")
        self.open = True
        return CallDelta(len(self.calls) - 1, "")

    def push(self, data: bytes) -> CallDelta:
        """Bytes of the open call; the text that is complete so far (a split UTF-8 character waits)."""
        text = self._decoder.decode(data)
        self.calls[-1] += text
        return CallDelta(len(self.calls) - 1, text)

    def end_turn(self) -> list[str]:
        """The turn is over: its calls (the last one closed), and the next turn starts with none."""
        self._close()
        calls, self.turn_start = self.turn_calls, len(self.calls)
        return calls

    def _close(self) -> None:
        if self.open:
            self.calls[-1] += self._decoder.decode(b"", final=True)
            self.open = False


def runs_all(use: ToolUse, calls: list[str]) -> bool:
    """Whether the engine runs every one of these calls itself: each names one of `use.run`'s tools.
    A call that is not even JSON counts as the engine's when it has built-in tools (its error result
    lets the model try again); otherwise it goes back to the caller, who declared the functions."""
    return bool(use.run) and all(_called_name(c) in use.run or _called_name(c) is None for c in calls)


def _called_name(call: str) -> str | None:
    try:
        value = json.loads(call)
    except ValueError:
        return None
    name = value.get("name") if isinstance(value, dict) else None
    return name if isinstance(name, str) else None


def run_calls(use: ToolUse, calls: list[str]) -> list[ToolTurn]:
    """Run each call with the request's tools (errors become results the model can read)."""
    results: list[ToolResult] = [run_tool_call(c, use.run) for c in calls]
    return [ToolTurn(c, r.content, r.ok) for c, r in zip(calls, results)]


def result_tokens(ids: TurnIds, turns: list[ToolTurn], encode: Any) -> list[int]:
    """What follows a turn's sampled `<|end|>`: each result as a `<|tool_result|>` turn, then the
    assistant's next turn opening. The sampled `<|end|>` itself is not repeated."""
    out: list[int] = []
    for turn in turns:
        out += [ids.result, *encode(turn.result), ids.end]
    return out + [ids.assistant]
