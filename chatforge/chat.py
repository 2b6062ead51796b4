"""The chat template: conversations as token ids, with the mask that says which tokens are trained.

A conversation is a list of turns. Each turn is rendered as its role's special token, the
content's tokens, and the end-of-turn token:

    <|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|>

Content is encoded with `allow_special=False`, so a user who types "<|end|>" gets plain text,
never a control token. The model is trained (mask True) on what it must produce: an assistant
turn's content and its closing `<|end|>` (so it learns to stop), and a tool call turn whole,
marker included (the model decides to call a tool). A generation prompt ends with
`<|assistant|>`; generation stops at `<|end|>` (or `<|endoftext|>`).

Turns never split: a conversation too long for the context loses its oldest turns after the
system prompt (`fit_to_context`), and the caller is told how many went.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from chatforge.errors import DataError

ROLES = ("system", "user", "assistant", "tool_call", "tool_result")
TRAINED_ROLES = ("assistant", "tool_call")  # what the model produces
END_OF_TURN = "end_turn"  # SPECIAL_TOKENS key of <|end|>


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {list(ROLES)}")
        if not isinstance(self.content, str):
            raise ValueError(f"content of a {self.role} turn must be a string, got {type(self.content).__name__}")


@dataclass
class Conversation:
    messages: list[Message] = field(default_factory=list)

    @classmethod
    def from_openai(cls, messages: Any, where: str = "conversation", need_assistant: bool = True,
                    field: str = "messages") -> Conversation:
        """From OpenAI-style ``[{"role", "content"}, ...]``; `where` names the record in errors.

        Role ``tool`` is read as ``tool_result``. An assistant turn with ``tool_calls`` becomes one
        ``tool_call`` turn per call, its content the call as JSON.
        """
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        out = []
        for i, m in enumerate(messages):
            out.extend(_messages_from_openai(m, f"{where}: {field}[{i}]"))
        conv = cls(out)
        conv.check(where, need_assistant=need_assistant)
        return conv

    def to_openai(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]

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


def _messages_from_openai(m: Any, where: str) -> list[Message]:
    if not isinstance(m, dict):
        raise DataError(f"{where}: expected an object with 'role' and 'content', got {type(m).__name__}")
    role = m.get("role")
    if role is None:
        raise DataError(f"{where}: missing 'role'")
    if role == "tool":
        role = "tool_result"
    if role == "assistant" and m.get("tool_calls"):
        calls = m["tool_calls"]
        if not isinstance(calls, list):
            raise DataError(f"{where}: 'tool_calls' must be a list")
        turns = [Message("assistant", m["content"])] if isinstance(m.get("content"), str) and m["content"] else []
        for j, c in enumerate(calls):
            if not isinstance(c, dict):
                raise DataError(f"{where}: tool_calls[{j}] must be an object, got {type(c).__name__}")
        return turns + [Message("tool_call", json.dumps(c.get("function", c), ensure_ascii=False)) for c in calls]
    if role not in ROLES:
        raise DataError(f"{where}: unknown role {role!r}; expected one of {list(ROLES)} (or 'tool')")
    content = m.get("content")
    if content is None:
        raise DataError(f"{where}: missing 'content'")
    if not isinstance(content, str):
        raise DataError(f"{where}: 'content' must be a string, got {type(content).__name__}")
    return [Message(role, content)]


@dataclass
class Rendered:
    ids: list[int]
    mask: list[bool]  # True where the token is trained (predicted from what comes before it)
    turn_starts: list[int]  # index in ids where each turn starts


class ChatTemplate:
    """Renders and parses conversations with one tokenizer's special tokens."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        ids = tokenizer.special_ids
        self.role_ids = {role: ids[role] for role in ROLES}
        self.end_id = ids[END_OF_TURN]
        self.eot_id = ids["eot"]
        self._role_of = {v: k for k, v in self.role_ids.items()}

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end an assistant's turn."""
        return [self.end_id, self.eot_id]

    def render_turn(self, m: Message) -> tuple[list[int], list[bool]]:
        content = self.tokenizer.encode(m.content)
        ids = [self.role_ids[m.role], *content, self.end_id]
        if m.role == "assistant":
            mask = [False] + [True] * (len(content) + 1)
        elif m.role == "tool_call":
            mask = [True] * len(ids)
        else:
            mask = [False] * len(ids)
        return ids, mask

    def render(self, conv: Conversation | Sequence[Message]) -> Rendered:
        messages = conv.messages if isinstance(conv, Conversation) else list(conv)
        ids: list[int] = []
        mask: list[bool] = []
        starts = []
        for m in messages:
            starts.append(len(ids))
            t_ids, t_mask = self.render_turn(m)
            ids += t_ids
            mask += t_mask
        return Rendered(ids, mask, starts)

    def generation_prompt(self, conv: Conversation | Sequence[Message]) -> list[int]:
        """The conversation so far followed by `<|assistant|>`: what the model continues."""
        return self.render(conv).ids + [self.role_ids["assistant"]]

    def fit_to_context(
        self, conv: Conversation | Sequence[Message], max_tokens: int, reserve: int = 0
    ) -> tuple[list[int], int]:
        """A generation prompt of at most `max_tokens - reserve` tokens, and how many turns were dropped.

        The oldest turns after the system prompt go first, whole, and with them the answers (and tool
        turns) of a dropped question, so what is kept starts with a user turn; the latest turn always
        stays. Raises DataError when the system prompt and the latest turn alone do not fit.
        """
        messages = conv.messages if isinstance(conv, Conversation) else list(conv)
        budget = max_tokens - reserve
        head = messages[:1] if messages and messages[0].role == "system" else []
        rest = messages[len(head):]
        lengths = [len(self.render_turn(m)[0]) for m in messages]
        head_len = sum(lengths[: len(head)])
        rest_lens = lengths[len(head):]
        dropped = 0
        total = head_len + sum(rest_lens) + 1  # + <|assistant|>
        while dropped < len(rest) - 1 and (total > budget or (dropped and rest[dropped].role != "user")):
            total -= rest_lens[dropped]
            dropped += 1
        if total > budget:
            raise DataError(
                f"the system prompt and the latest message need {total} tokens, more than the "
                f"{budget} available ({max_tokens} context - {reserve} reserved for the reply)"
            )
        return self.generation_prompt(head + rest[dropped:]), dropped

    def parse(self, ids: Sequence[int]) -> Conversation:
        """The inverse of `render`: split at role markers, each turn ending at `<|end|>`.

        A trailing turn without `<|end|>` (a generation cut short) keeps what it has.
        """
        messages = []
        role: str | None = None
        content: list[int] = []
        for t in ids:
            t = int(t)
            if role is None:
                if t in self._role_of:
                    role, content = self._role_of[t], []
                elif t != self.eot_id:
                    raise DataError(f"token {t} outside a turn; expected a role marker")
            elif t == self.end_id:
                messages.append(Message(role, self.tokenizer.decode(content)))
                role = None
            else:
                content.append(t)
        if role is not None:
            messages.append(Message(role, self.tokenizer.decode(content)))
        return Conversation(messages)
