"""The two generation endpoints' response shapes: one formatter per endpoint, chosen by the route.

The job (jobs.py) is the same for /v1/completions and /v1/chat/completions; everything in which
their answers differ is here, as a `ResponseFormat` with the same methods for both:

- `CompletionFormat` (``text_completion``, ids ``cmpl-…``): a choice is ``{index, text, logprobs,
  finish_reason}``, and so is a stream chunk's; with echo the prompt's text comes first (in a stream,
  one chunk per choice as soon as the prompt is prefilled) with its tokens' logprobs, the first one's
  null; logprobs are ``{tokens, token_logprobs, top_logprobs, text_offset}`` (OpenAI's limit: 5).
- `ChatFormat` (``chat.completion`` / ``chat.completion.chunk``, ids ``chatcmpl-…``): a choice is
  ``{index, message: {role, content, refusal}, logprobs, finish_reason}``; a stream opens with one
  chunk per choice carrying only ``delta: {"role": "assistant"}``, then ``delta: {"content": …}``;
  logprobs are ``{content: [{token, logprob, bytes, top_logprobs}], refusal}``; with ``truncation:
  "auto"`` how many messages were dropped goes in the ``X-Chatforge-Dropped-Messages`` header and in
  ``dropped_messages`` (the response, or the stream's opening chunks).

Both: ``usage`` is ``{prompt_tokens, completion_tokens, total_tokens}``; with
``stream_options.include_usage`` every chunk has a ``usage`` field, null but in the final chunk (which
has no choices). A logprob of -inf (a banned token) is written as MIN_LOGPROB: JSON has no infinity.
"""

from __future__ import annotations

import codecs
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chatforge.chat import split_call
from chatforge.generate.engine import Completion, StreamEvent, TokenLogprob
from chatforge.generate.params import SamplingParams
from chatforge.generate.tool_loop import ToolTurn
from chatforge.serve.state import Prompt
from chatforge.serve.tools import CallStream, FunctionCalling, openai_tool_calls

# an answer's built-in tool calls and their results (chatforge's extra field beside content and tool_calls)
TOOL_TURNS_FIELD = "tool_results"


def legacy_delta(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """Tool-call deltas as the legacy ``function_call`` delta: the first call's name once, then its
    argument fragments (legacy function calling has one call per answer)."""
    function: dict[str, Any] = {}
    for d in deltas:
        if d["index"] != 0:
            continue
        if "name" in d["function"]:
            function["name"] = d["function"]["name"]
        function["arguments"] = function.get("arguments", "") + d["function"]["arguments"]
    return {"function_call": function} if function else {}


def tool_turn_object(turn: ToolTurn) -> dict[str, Any]:
    """A built-in call the engine ran: the function it called (as in tool_calls) and what it answered."""
    split = split_call(turn.call)
    name, arguments = split if split is not None else ("", turn.call)
    return {"type": "function", "function": {"name": name, "arguments": arguments}, "content": turn.result,
            "ok": turn.ok}

MIN_LOGPROB = -9999.0  # JSON has no -Infinity: banned tokens report this
DROPPED_HEADER = "X-Chatforge-Dropped-Messages"  # with truncation "auto": how many old messages were left out
_NO_USAGE = object()  # a chunk's usage when it is not the final one


def _lp(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


class OffsetTracker:
    """Character offsets of tokens in decoded text (a character split over tokens counts once)."""

    def __init__(self, start: int = 0) -> None:
        self.offset = start
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data: bytes) -> int:
        """The offset at which `data` starts; the offset moves past the characters it completes."""
        at = self.offset
        self.offset += len(self.decoder.decode(data))
        return at


@dataclass
class FinishedChoice:
    """One choice of a whole (non-streamed) response, as moderation left it."""

    index: int
    prompt: Prompt
    completion: Completion  # the whole result of the choice's prompt (with echo: its prompt logprobs)
    text: str
    tokens: list[int]  # the generated tokens kept (moderation may cut some)
    entries: list[TokenLogprob] | None  # their logprobs, when asked for (an end token that stopped it included)
    finish_reason: str | None
    tool_calls: list[str] = field(default_factory=list)  # calls for the client, as generated
    tool_turns: list[ToolTurn] = field(default_factory=list)  # built-in calls the engine ran, with results


class ResponseFormat:
    """An endpoint's response objects and stream chunks for one request (its id and creation time).

    `text_bytes(token)` is what a generated token adds to the text (the engine's rule: a skipped special
    token adds nothing); logprob text offsets follow it."""

    id_prefix = ""
    object = ""
    chunk_object = ""

    def __init__(self, tokenizer: Any, params: SamplingParams, *, model_name: str, include_usage: bool = False,
                 text_bytes: Callable[[int], bytes] | None = None) -> None:
        self.tok = tokenizer
        self.params = params
        self.model_name = model_name
        self.include_usage = include_usage
        self.text_bytes = text_bytes or tokenizer.token_bytes
        self.id = self.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())

    @property
    def headers(self) -> dict[str, str]:
        """Extra response headers."""
        return {}

    def token_str(self, token_id: int) -> str:
        return self.tok.token_bytes(token_id).decode("utf-8", errors="replace")

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def _envelope(self, name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": name, "created": self.created, "model": self.model_name, "choices": choices}

    def response(self, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        """The whole (non-streamed) response object."""
        return {**self._envelope(self.object, choices), "usage": usage}

    def chunk(self, choices: list[dict[str, Any]], usage: Any = _NO_USAGE) -> dict[str, Any]:
        """One stream chunk; `usage` only for the final one (with include_usage, the others carry null)."""
        obj = self._envelope(self.chunk_object, choices)
        if self.include_usage:
            obj["usage"] = None if usage is _NO_USAGE else usage
        return obj

    def opening_chunks(self, indices: list[int]) -> list[dict[str, Any]]:
        """What a stream sends before any output, for choices `indices`."""
        return []

    def prompt_chunks(self, prompt: Prompt, indices: list[int],
                      prompt_logprobs: list[TokenLogprob | None] | None) -> list[dict[str, Any]]:
        """What a stream sends when `prompt` (choices `indices`) is prefilled."""
        return []

    # ---- what each endpoint defines ----------------------------------------------------------

    def choice(self, index: int, text: str, logprobs: Any, reason: str | None) -> dict[str, Any]:
        """One choice of a whole response."""
        raise NotImplementedError

    def delta(self, index: int, text: str | None, logprobs: Any = None, reason: str | None = None) -> dict[str, Any]:
        """One choice of a stream chunk: what it adds."""
        raise NotImplementedError

    def finished_choice(self, out: FinishedChoice) -> dict[str, Any]:
        """A generated choice of a whole response, logprobs (when asked for) included."""
        raise NotImplementedError

    def event_logprobs(self, index: int, prompt: Prompt, event: StreamEvent) -> Any:
        """The logprobs of what one step added to choice `index` (event.logprobs is not empty)."""
        raise NotImplementedError

    def tool_chunks(self, index: int, event: StreamEvent) -> tuple[list[dict[str, Any]], str | None]:
        """Chunks for the tool calls of one step of choice `index` (sent before its text), and the
        choice's finish_reason as the endpoint names it. Completions have no tools."""
        return [], event.finish_reason


class CompletionFormat(ResponseFormat):
    """/v1/completions: ``text_completion`` objects and chunks (see the module docstring)."""

    id_prefix = "cmpl-"
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, tokenizer: Any, params: SamplingParams, **kw: Any) -> None:
        super().__init__(tokenizer, params, **kw)
        self._offsets: dict[int, OffsetTracker] = {}  # a streamed choice's text offsets so far

    def choice(self, index: int, text: str, logprobs: Any, reason: str | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def delta(self, index: int, text: str | None, logprobs: Any = None, reason: str | None = None) -> dict[str, Any]:
        return self.choice(index, text or "", logprobs, reason)

    def finished_choice(self, out: FinishedChoice) -> dict[str, Any]:
        text = out.prompt.text + out.text if self.params.echo else out.text
        logprobs = None
        if self.params.logprobs is not None:
            logprobs = self._finished_logprobs(out.prompt, out.completion, out.tokens, out.entries or [])
        return self.choice(out.index, text, logprobs, out.finish_reason)

    def _finished_logprobs(self, prompt: Prompt, completion: Completion, tokens: list[int],
                           entries: list[TokenLogprob]) -> dict[str, list]:
        generated = [e.token_id for e in entries]
        if not self.params.echo:
            return self.logprobs(entries, generated, OffsetTracker(len(prompt.text)), len(tokens))
        offsets = OffsetTracker(0)
        head = self.logprobs(list(completion.prompt_logprobs or [None] * len(prompt.ids)), prompt.ids, offsets,
                             prompt=True)
        offsets.offset = len(prompt.text)
        tail = self.logprobs(entries, generated, offsets, len(tokens))
        return {k: head[k] + tail[k] for k in head}

    def prompt_chunks(self, prompt: Prompt, indices: list[int],
                      prompt_logprobs: list[TokenLogprob | None] | None) -> list[dict[str, Any]]:
        """With echo, each of the prompt's choices begins with the prompt (and its logprobs)."""
        if not self.params.echo:
            return []
        out = []
        for index in indices:
            offsets = self._offsets[index] = OffsetTracker(0)
            logprobs = None
            if self.params.logprobs is not None:
                entries = list(prompt_logprobs or [None] * len(prompt.ids))
                logprobs = self.logprobs(entries, prompt.ids, offsets, prompt=True)
            offsets.offset = len(prompt.text)
            out.append(self.chunk([self.delta(index, prompt.text, logprobs)]))
        return out

    def event_logprobs(self, index: int, prompt: Prompt, event: StreamEvent) -> dict[str, list]:
        offsets = self._offsets.get(index)
        if offsets is None:
            offsets = self._offsets[index] = OffsetTracker(len(prompt.text))
        return self.logprobs(list(event.logprobs), [e.token_id for e in event.logprobs], offsets,
                             len(event.token_ids))

    def logprobs(self, entries: list[TokenLogprob | None], token_ids: list[int], offsets: OffsetTracker,
                 in_text: int | None = None, prompt: bool = False) -> dict[str, list]:
        """OpenAI's completions format for `token_ids` (entries[i] None: no logprob, as a prompt's first token).
        Only the first `in_text` tokens (default: all) are in the text; the rest (the end token that stopped
        a sequence) are listed at the offset where the text ends. A `prompt`'s tokens are all text."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        in_text = len(token_ids) if in_text is None else in_text
        for i, (token_id, entry) in enumerate(zip(token_ids, entries)):
            text = self.token_str(token_id)
            out["tokens"].append(text)
            data = self.tok.token_bytes(token_id) if prompt else self.text_bytes(token_id)
            out["text_offset"].append(offsets.push(data if i < in_text else b""))
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_lp(entry.logprob))
            top: dict[str, float] = {}
            for tid, lp in entry.top:
                top.setdefault(self.token_str(tid), _lp(lp))
            top[text] = _lp(entry.logprob)  # the chosen token is always there (wins a clash of equal strings)
            out["top_logprobs"].append(top)
        return out


class ChatFormat(ResponseFormat):
    """/v1/chat/completions: ``chat.completion`` objects and ``chat.completion.chunk`` chunks (see the
    module docstring); `dropped_messages` (truncation "auto") is reported, None is not."""

    id_prefix = "chatcmpl-"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, tokenizer: Any, params: SamplingParams, *, dropped_messages: int | None = None,
                 calling: FunctionCalling | None = None, **kw: Any) -> None:
        super().__init__(tokenizer, params, **kw)
        self.dropped_messages = dropped_messages
        self.calling = calling
        self._calls: dict[int, CallStream] = {}  # a streamed choice's calls

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.dropped_messages is None else {DROPPED_HEADER: str(self.dropped_messages)}

    def _with_dropped(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self.dropped_messages is not None:
            obj["dropped_messages"] = self.dropped_messages
        return obj

    def response(self, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        return self._with_dropped(super().response(choices, usage))

    def opening_chunks(self, indices: list[int]) -> list[dict[str, Any]]:
        """Each choice's first chunk names the role, and only that."""
        return [self._with_dropped(self.chunk([{"index": index, "delta": {"role": "assistant"}, "logprobs": None,
                                                "finish_reason": None}])) for index in indices]

    def choice(self, index: int, text: str, logprobs: Any, reason: str | None) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": logprobs, "finish_reason": reason}

    def delta(self, index: int, text: str | None, logprobs: Any = None, reason: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                "finish_reason": reason}

    def finished_choice(self, out: FinishedChoice) -> dict[str, Any]:
        logprobs = self.logprobs(out.entries or []) if self.params.logprobs is not None else None
        parallel = self.calling.parallel if self.calling else True
        calls, unread = openai_tool_calls(out.tool_calls, parallel)
        reason = self._reason(out.finish_reason, bool(calls))
        choice = self.choice(out.index, out.text + unread, logprobs, reason)
        message = choice["message"]
        if calls:
            message["tool_calls"] = calls
            message["content"] = message["content"] or None
            if self.calling is not None and self.calling.legacy:
                message["function_call"] = calls[0]["function"]
        if out.tool_turns:
            message[TOOL_TURNS_FIELD] = [tool_turn_object(t) for t in out.tool_turns]
        return choice

    def _reason(self, reason: str | None, calls: bool) -> str | None:
        """OpenAI's finish_reason: "tool_calls" only when calls go back (legacy functions: "function_call")."""
        if reason != "tool_calls":
            return reason
        if not calls:
            return "stop"
        return "function_call" if self.calling is not None and self.calling.legacy else "tool_calls"

    def tool_chunks(self, index: int, event: StreamEvent) -> tuple[list[dict[str, Any]], str | None]:
        """A streamed step's call deltas and built-in tool turns as chunks, and the choice's finish_reason."""
        if self.calling is None:
            return [], event.finish_reason
        stream = self._calls.get(index)
        if stream is None:
            skip = frozenset(self.calling.builtin) if self.calling.choice == "auto" else frozenset()
            stream = self._calls[index] = CallStream(self.calling.parallel, skip)
        deltas = stream.push(event.call.index, event.call.text) if event.call is not None else []
        chunks = []
        if event.tool_turns:
            turns = [tool_turn_object(t) for t in event.tool_turns]
            chunks.append(self.chunk([{"index": index, "delta": {TOOL_TURNS_FIELD: turns}, "logprobs": None,
                                       "finish_reason": None}]))
        if event.finish_reason is not None:
            deltas += stream.finish()
            unread = stream.unread()
            if unread:
                chunks.append(self.chunk([self.delta(index, unread)]))
        if deltas:
            delta = legacy_delta(deltas) if self.calling.legacy else {"tool_calls": deltas}
            chunks.insert(0, self.chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]))
        return chunks, self._reason(event.finish_reason, stream.sent_any)

    def event_logprobs(self, index: int, prompt: Prompt, event: StreamEvent) -> dict[str, Any]:
        return self.logprobs(event.logprobs)

    def logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        """OpenAI's chat format: one entry per token, with its bytes and the top alternatives."""
        return {"content": [self._entry(e) for e in entries], "refusal": None}

    def _entry(self, entry: TokenLogprob) -> dict[str, Any]:
        def one(token_id: int, lp: float) -> dict[str, Any]:
            data = self.tok.token_bytes(token_id)
            return {"token": data.decode("utf-8", errors="replace"), "logprob": _lp(lp), "bytes": list(data)}

        return {**one(entry.token_id, entry.logprob), "top_logprobs": [one(t, lp) for t, lp in entry.top]}
