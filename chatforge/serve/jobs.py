"""One generation request's life, the same for both endpoints: submit, stream, cancel, count, moderate.

A `GenerationJob` gets checked prompts and SamplingParams (handlers.py) and the endpoint's
`ResponseFormat` (formats.py), which owns every shape that differs between /v1/completions and
/v1/chat/completions; the job owns what does not:

- submitting one runner job (runner.py; a full queue is a 429, a draining server a 503) and reading
  its typed messages until every prompt is done, cancelled or failed;
- a whole response (`respond`), or a stream (`stream_response`): SSE chunks, ``data: [DONE]`` at the
  end, an error after the stream began sent as ``data: {"error": …}``;
- cancelling the runner job when the stream closes early or a non-streamed client goes away (polled
  every DISCONNECT_POLL_S seconds; answered with 499);
- metrics: prompt and completion tokens (cancelled work included), time to first token, duration;
- moderation (when the server has a moderator): a flagged input is answered with the moderator's
  refusal and finish_reason "content_filter" without generating; a flagged output is cut before the
  text that made it flagged (moderation.OutputGuard: partial words are held back) and finishes with
  "content_filter", streamed or not, at the same place.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from chatforge.errors import ChatforgeError
from chatforge.generate.engine import Completion, StreamEvent
from chatforge.generate.params import SamplingParams
from chatforge.generate.tool_loop import ToolUse
from chatforge.serve.errors import APIError, from_user_error, server_error
from chatforge.serve.formats import FinishedChoice, ResponseFormat
from chatforge.serve.moderation import OutputGuard
from chatforge.serve.runner import (
    Cancelled,
    Failed,
    Finished,
    Generated,
    Job,
    Message,
    QueueFull,
    ShuttingDown,
    Started,
    SubRequest,
)
from chatforge.serve.state import Prompt, ServerState

DISCONNECT_POLL_S = 0.25
DONE = "data: [DONE]\n\n"


def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as compact JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class SSEResponse(StreamingResponse):
    """A streaming response that runs `on_close` however the stream ends (done, error, client gone)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class ClientGone(Exception):
    """A non-streamed request's client disconnected before the answer was ready."""


def job_error(exc: BaseException) -> APIError:
    """The API error a failed job answers with: a user's mistake keeps its message, a bug is a plain 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ShuttingDown):
        return APIError(503, str(exc), code="shutting_down")
    if isinstance(exc, ChatforgeError):
        return from_user_error(exc)
    return server_error()


@dataclass
class _Choice:
    index: int  # in the response: prompt_index * n + i
    finished: bool = False
    guard: OutputGuard | None = None  # with a moderator, once the choice streams


class GenerationJob:
    """One HTTP generation request: its prompts and params, one runner job, and its answer in `fmt`'s shape.
    `user_texts` are what input moderation checks (default: the prompts' texts)."""

    def __init__(self, state: ServerState, prompts: list[Prompt], params: SamplingParams, fmt: ResponseFormat, *,
                 logprobs_limit: int, user_texts: list[str] | None = None, tool_use: ToolUse | None = None) -> None:
        self.state, self.prompts, self.params, self.fmt = state, prompts, params, fmt
        self.tool_use = tool_use
        self.fed_tokens = 0  # tool results the engine fed in: input to the model, counted as prompt tokens
        self.logprobs_limit = logprobs_limit
        self.user_texts = user_texts if user_texts is not None else [p.text for p in prompts]
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.completion_tokens = 0
        self.job: Job | None = None
        self.n = params.n
        self.choices = {(i, j): _Choice(i * self.n + j) for i in range(len(prompts)) for j in range(self.n)}

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts) + self.fed_tokens

    def usage(self) -> dict[str, int]:
        return self.fmt.usage(self.prompt_tokens, self.completion_tokens)

    def _indices(self, prompt: int | None = None) -> list[int]:
        """The response indices of every choice (or of one prompt's), in order."""
        return [c.index for (i, _), c in self.choices.items() if prompt is None or i == prompt]

    # ---- moderation --------------------------------------------------------------------------

    def input_flagged(self) -> bool:
        check = getattr(self.state.moderator, "check", None)
        return check is not None and any(check(t) for t in self.user_texts if t)

    def output_flagged(self, text: str) -> bool:
        return self.state.moderator is not None and bool(text) and self.state.moderator.check(text) is not None

    def new_guard(self) -> OutputGuard | None:
        return OutputGuard(self.output_flagged) if self.state.moderator is not None else None

    def _cut_flagged(self, text: str, tokens: list[int]) -> tuple[str, int] | None:
        """(what a stream would have shown before the output got flagged, tokens kept), or None if the
        text is fine: the tokens are replayed through an OutputGuard, as streaming does."""
        if not self.output_flagged(text):
            return None
        guard = self.new_guard()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoded, ends = "", []
        for token in tokens:
            before = len(decoded)
            decoded += decoder.decode(self.fmt.text_bytes(token))
            ends.append(len(decoded))
            if guard.push(text[before: len(decoded)]) is None:
                break
        else:
            guard.push(text[len(decoded):], final=True)
        kept = guard.sent
        return kept, sum(1 for end in ends if end <= len(kept))

    # ---- the runner job ----------------------------------------------------------------------

    def submit(self) -> Job:
        subs = [SubRequest(p.ids, self.params, self.logprobs_limit, self.tool_use) for p in self.prompts]
        try:
            self.job = self.state.runner.submit(subs)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry shortly", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ShuttingDown as e:
            raise APIError(503, str(e), code="shutting_down") from None
        return self.job

    def cancel(self) -> None:
        if self.job is not None:
            self.state.runner.cancel(self.job)

    def finish_metrics(self) -> None:
        metrics = self.state.metrics
        metrics.add_tokens(self.prompt_tokens, self.completion_tokens)
        metrics.observe_duration(time.monotonic() - self.started)

    def _saw_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
            self.state.metrics.observe_ttft(self.first_token_at - self.started)

    async def messages(self, request: Request | None = None) -> AsyncIterator[Message]:
        """The job's messages until every sub is done or cancelled (or one failed); with `request`,
        a client that disconnects raises ClientGone (non-streaming requests poll for it)."""
        job = self.job
        remaining = set(range(len(job.subs)))
        checked = time.monotonic()
        while remaining:
            if request is None:
                batch = await job.get()
            else:
                try:
                    batch = await asyncio.wait_for(job.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    batch = []
                if time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        raise ClientGone()
            for message in batch:
                if isinstance(message, Generated) and message.event.token_ids:
                    self._saw_token()
                elif isinstance(message, Cancelled):
                    self.completion_tokens += message.completion_tokens
                    remaining.discard(message.sub)
                elif isinstance(message, Finished):
                    self.completion_tokens += message.completion.completion_tokens
                    self.fed_tokens += message.completion.fed_tokens
                    remaining.discard(message.sub)
                elif isinstance(message, Failed):
                    remaining.clear()
                yield message

    # ---- whole responses ---------------------------------------------------------------------

    async def respond(self, request: Request) -> Response:
        """The whole answer as one JSON object (499 if the client left first)."""
        if self.input_flagged():
            self.finish_metrics()
            return JSONResponse(self.refusal_object(), headers=self.fmt.headers)
        self.submit()
        results: list[Completion | None] = [None] * len(self.prompts)
        try:
            async for message in self.messages(request):
                if isinstance(message, Finished):
                    results[message.sub] = message.completion
                elif isinstance(message, Failed):
                    raise job_error(message.error)
        except ClientGone:
            return Response(status_code=499)
        finally:
            self.cancel()
            self.finish_metrics()
        return JSONResponse(self.response_object(results), headers=self.fmt.headers)

    def refusal_object(self) -> dict[str, Any]:
        choices = [self.fmt.choice(index, self.state.refusal, None, "content_filter") for index in self._indices()]
        return self.fmt.response(choices, self.usage())

    def response_object(self, results: list[Completion]) -> dict[str, Any]:
        choices = []
        for i, (prompt, completion) in enumerate(zip(self.prompts, results)):
            for out in completion.outputs:
                tokens = list(out.token_ids)
                entries = list(out.logprobs) if out.logprobs is not None else None
                text, reason = out.text, out.finish_reason
                cut = self._cut_flagged(text, tokens)
                if cut is not None:
                    text, keep = cut
                    tokens, reason = tokens[:keep], "content_filter"
                    entries = entries[:keep] if entries is not None else None
                choices.append(self.fmt.finished_choice(
                    FinishedChoice(i * self.n + out.index, prompt, completion, text, tokens, entries, reason,
                                   out.tool_calls, out.tool_turns)))
        choices.sort(key=lambda c: c["index"])
        return self.fmt.response(choices, self.usage())

    # ---- streams -----------------------------------------------------------------------------

    def stream_response(self) -> Response:
        """The answer as server-sent events; closing the stream cancels the job."""
        if self.input_flagged():
            self.finish_metrics()
            return SSEResponse(self._refusal_stream(), on_close=lambda: None, headers=self.fmt.headers)
        self.submit()
        return SSEResponse(self._stream(), on_close=self.cancel, headers=self.fmt.headers)

    def _usage_chunk(self) -> list[str]:
        return [sse(self.fmt.chunk([], self.usage()))] if self.fmt.include_usage else []

    async def _refusal_stream(self) -> AsyncIterator[str]:
        indices = self._indices()
        for chunk in self.fmt.opening_chunks(indices):
            yield sse(chunk)
        for index in indices:
            yield sse(self.fmt.chunk([self.fmt.delta(index, self.state.refusal, None, "content_filter")]))
        for chunk in self._usage_chunk():
            yield chunk
        yield DONE

    async def _stream(self) -> AsyncIterator[str]:
        try:
            for chunk in self.fmt.opening_chunks(self._indices()):
                yield sse(chunk)
            async for message in self.messages():
                if isinstance(message, Failed):
                    yield sse(job_error(message.error).payload())
                    yield DONE
                    return
                for chunk in self._chunks(message):
                    yield sse(chunk)
            for chunk in self._usage_chunk():
                yield chunk
            yield DONE
        finally:
            self.finish_metrics()

    def _chunks(self, message: Message) -> list[dict[str, Any]]:
        if isinstance(message, Started):
            i = message.sub
            return self.fmt.prompt_chunks(self.prompts[i], self._indices(i), message.prompt_logprobs)
        if isinstance(message, Generated):
            return self._on_event(message.sub, message.event)
        return []

    def _on_event(self, i: int, event: StreamEvent) -> list[dict[str, Any]]:
        c = self.choices.get((i, event.index))
        if c is None or c.finished or event.finish_reason == "cancelled":
            return []
        text = event.text
        tool_chunks, reason = self.fmt.tool_chunks(c.index, event)
        if self.state.moderator is not None:
            if c.guard is None:
                c.guard = self.new_guard()
            text = c.guard.push(text, final=reason is not None)
            if text is None:
                c.finished = True
                self._cancel_if_all_finished(i)
                return [self.fmt.chunk([self.fmt.delta(c.index, None, None, "content_filter")])]
        logprobs = None
        if self.params.logprobs is not None and event.logprobs:
            logprobs = self.fmt.event_logprobs(c.index, self.prompts[i], event)
        if reason is not None:
            c.finished = True
        if not text and logprobs is None and reason is None:
            return tool_chunks
        return tool_chunks + [self.fmt.chunk([self.fmt.delta(c.index, text, logprobs, reason)])]

    def _cancel_if_all_finished(self, i: int) -> None:
        if all(self.choices[(i, j)].finished for j in range(self.n)):
            self.state.runner.cancel(self.job, i)
