"""/v1/completions and /v1/chat/completions: request -> prompts and SamplingParams -> engine job -> OpenAI JSON.

Both endpoints share one path. A request is checked completely before anything is queued (the
model name, unsupported features, the context, then the engine's own `SamplingParams.validate`),
so every client mistake is a 4xx and the engine thread only sees valid work. The job's messages
(see runner.py) become either one response object or a stream of SSE chunks:

- completions: ``text_completion`` objects; a prompt list gives choices ``prompt_index * n + i``;
  logprobs as ``{tokens, token_logprobs, top_logprobs, text_offset}`` (with echo the prompt's
  tokens come first, the first one's logprob null); `max_tokens=0` with echo scores a text.
- chat: ``chat.completion`` / ``chat.completion.chunk``; the stream's first chunk of each choice
  carries only ``delta: {"role": "assistant"}``; logprobs as ``{content: [{token, logprob, bytes,
  top_logprobs}]}``; the answer's text starts at its first visible character. The extra field
  ``truncation: "auto"`` drops the oldest whole turns after the system prompt when the conversation
  outgrows the context (OpenAI's Chat Completions answers 400, as this server does without it), and
  reports how many messages went in the ``X-Chatforge-Dropped-Messages`` header and in
  ``dropped_messages`` (the response, or the stream's first chunk).
- logprobs list every sampled token, an end token that stopped a choice included (usage counts it
  too), so ``echo`` with ``max_tokens: 1`` always gives the prompt's tokens + 1 entries.
- ``stream_options.include_usage`` adds a final chunk with the usage and no choices; every stream
  ends with ``data: [DONE]``; an error after the stream began is sent as ``data: {"error": …}``.

Moderation (when a moderator is configured): a flagged input is answered with the moderator's
REFUSAL and finish_reason "content_filter" without generating; a flagged output is cut before
the text that made it flagged and finishes with "content_filter".
"""

from __future__ import annotations

import asyncio
import codecs
import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from chatforge.chat import ChatTemplate, Conversation
from chatforge.data.examples import GENERIC_EXAMPLES
from chatforge.errors import ChatforgeError, RequestError
from chatforge.generate.engine import Completion, Engine, StreamEvent, TokenLogprob
from chatforge.generate.params import MAX_LOGPROBS, SamplingParams
from chatforge.serve.errors import APIError, from_user_error, server_error
from chatforge.serve.metrics import Metrics
from chatforge.serve.runner import EngineRunner, Job, QueueFull, ShuttingDown, SubRequest
from chatforge.serve.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields

COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions; chat allows MAX_LOGPROBS (20)
MIN_LOGPROB = -9999.0  # JSON has no -Infinity: banned tokens report this
DISCONNECT_POLL_S = 0.25
DROPPED_HEADER = "X-Chatforge-Dropped-Messages"  # with truncation "auto": how many old messages were left out


@dataclass
class ServerState:
    """What the routes share; built once by create_app."""

    engine: Engine
    runner: EngineRunner
    tokenizer: Any
    template: ChatTemplate | None
    model_name: str
    metrics: Metrics
    moderator: Any = None  # chatforge.serve.moderation.Moderator (check(text) -> reason | None; REFUSAL)
    max_prompts: int = 64
    max_beams: int = 16
    created: int = field(default_factory=lambda: int(time.time()))
    examples: list[str] = field(default_factory=lambda: list(GENERIC_EXAMPLES))  # what the page offers to ask
    examples_source: str = "generic"  # "training": from the model's own training files

    @property
    def context_length(self) -> int:
        return self.engine.config.context_length

    @property
    def vocab_size(self) -> int:
        return self.engine.config.vocab_size

    @property
    def refusal(self) -> str:
        """What the moderator answers a flagged request with: it owns the text."""
        return str(self.moderator.REFUSAL)


@dataclass
class Prompt:
    ids: list[int]
    text: str


# ---- request checking ------------------------------------------------------------------------------


def check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise APIError(404, f"The model `{name}` does not exist; this server serves `{state.model_name}`",
                       param="model", code="model_not_found")


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def completion_prompts(state: ServerState, prompt: Any) -> list[Prompt]:
    """A string, a list of strings, a list of token ids or a list of token-id lists."""
    tok = state.tokenizer
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif not prompt:
        raise APIError(400, "prompt must not be an empty list", param="prompt")
    elif isinstance(prompt[0], int):
        items = [list(prompt)]
    else:
        items = list(prompt)
    if len(items) > state.max_prompts:
        raise APIError(400, f"{len(items)} prompts in one request; this server takes at most {state.max_prompts}",
                       param="prompt")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(Prompt(tok.encode(item) if item else [tok.eot_id], item))
            continue
        where = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if not item:
            raise APIError(400, f"{where}: empty list of token ids", param="prompt")
        bad = [t for t in item if not 0 <= t < state.vocab_size]
        if bad:
            raise APIError(400, f"{where}: token id {bad[0]} is outside the vocabulary (0..{state.vocab_size - 1})",
                           param="prompt")
        out.append(Prompt(item, tok.decode(item)))
    return out


def _message_text(content: Any, where: str) -> Any:
    if content is None or isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise APIError(400, f"{where}.content[{j}]: only text parts are supported, got type {part.type!r}",
                           param=f"{where}.content")
        texts.append(part.text)
    return "".join(texts)


def chat_conversation(state: ServerState, chat_messages: list[ChatMessage]) -> Conversation:
    """The request's messages as a checked conversation (roles mapped, text parts joined)."""
    if state.template is None:
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
    messages = []
    for i, m in enumerate(chat_messages):
        item: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                                "content": _message_text(m.content, f"messages[{i}]")}
        if m.tool_calls:
            item["tool_calls"] = m.tool_calls
        messages.append(item)
    try:
        conv = Conversation.from_openai(messages, where="request", need_assistant=False)
    except ChatforgeError as e:
        raise APIError(400, str(e), param="messages") from None
    return conv


def fit_chat(state: ServerState, conv: Conversation, max_tokens: int | None) -> tuple[Prompt, int, int]:
    """`truncation: "auto"`: the prompt with the oldest whole turns after the system prompt dropped until
    it leaves room for the reply (max_tokens, at most half the context), how many messages went, and
    max_tokens lowered to what is left. Only a system prompt and a last message that fill the context
    alone are refused."""
    context = state.context_length
    reserve = min(max_tokens or context, context // 2)
    try:
        ids, dropped = state.template.fit_to_context(conv, context, reserve=reserve)
    except ChatforgeError as e:
        raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
    return Prompt(ids, ""), dropped, min(max_tokens or context, context - len(ids))


def _context_error(state: ServerState, prompt_len: int, max_tokens: int, prompt_param: str) -> APIError:
    ctx = state.context_length
    return APIError(
        400, f"This model's maximum context length is {ctx} tokens. However, you requested "
        f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). "
        "Please reduce the prompt or max_tokens.",
        param=prompt_param if prompt_len >= ctx else "max_tokens", code="context_length_exceeded")


def build_params(state: ServerState, body: SamplingFields, *, max_tokens: int, logprobs: int | None,
                 echo: bool = False, best_of: int | None = None, stop_token_ids: list[int] | None = None,
                 chat: bool = False) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        try:
            bias[int(key)] = value
        except ValueError:
            raise APIError(400, f"logit_bias: key {key!r} is not a token id (keys are token ids as strings)",
                           param="logit_bias") from None
    top_k = _or(body.top_k, 0)
    no_repeat = _or(body.no_repeat_ngram_size, 0)
    ignore_eos = bool(body.ignore_eos)
    return SamplingParams(
        max_tokens=max_tokens, min_tokens=_or(body.min_tokens, 0), temperature=_or(body.temperature, 1.0),
        top_p=_or(body.top_p, 1.0), top_k=min(top_k, state.vocab_size), min_p=_or(body.min_p, 0.0),
        repetition_penalty=_or(body.repetition_penalty, 1.0), presence_penalty=_or(body.presence_penalty, 0.0),
        frequency_penalty=_or(body.frequency_penalty, 0.0), logit_bias=bias, stop=stop,
        stop_token_ids=([] if ignore_eos else list(stop_token_ids or [])) + list(body.stop_token_ids or []),
        ignore_eos=ignore_eos, n=_or(body.n, 1), best_of=best_of, logprobs=logprobs, echo=echo, seed=body.seed,
        num_beams=_or(body.num_beams, 1), length_penalty=_or(body.length_penalty, 1.0),
        early_stopping=bool(body.early_stopping), no_repeat_ngram_size=min(no_repeat, state.context_length + 1),
        strip_leading_whitespace=chat, skip_special_tokens=_or(body.skip_special_tokens, chat))


def check_params(state: ServerState, params: SamplingParams, prompts: list[Prompt], *, stream: bool,
                 logprobs_limit: int, prompt_param: str, logprobs_param: str = "logprobs") -> None:
    """Everything the engine would refuse, as 400s naming the parameter; nothing is queued before this."""
    if params.max_tokens < 0:
        raise APIError(400, f"max_tokens must be >= 0, got {params.max_tokens}", param="max_tokens")
    if params.seed is not None and not -(2**63) <= params.seed < 2**63:
        raise APIError(400, f"seed must be a 64-bit integer (-2**63 .. 2**63-1), got {params.seed}", param="seed")
    if params.num_beams > 1:
        if params.num_beams > state.max_beams:
            raise APIError(400, f"num_beams must be <= {state.max_beams}, got {params.num_beams}", param="num_beams")
        if params.n > params.num_beams:
            raise APIError(400, f"n ({params.n}) must be <= num_beams ({params.num_beams})", param="n")
        if params.logprobs is not None:
            raise APIError(400, "logprobs are not available with beam search (num_beams > 1)", param=logprobs_param)
        if params.best_of not in (None, params.n):
            raise APIError(400, "best_of does not apply to beam search (num_beams > 1)", param="best_of")
    else:
        rows = max(params.best_of or params.n, params.n)
        slots = state.engine.max_batch_size
        if rows > slots and params.n >= 1:
            name = "best_of" if params.best_of and params.best_of > params.n else "n"
            raise APIError(400, f"{name}={rows} needs {rows} sequences; this server runs at most {slots} at once",
                           param=name)
    if stream and params.best_of is not None and params.best_of > params.n:
        raise APIError(400, "best_of > n cannot be streamed: the best sequences are known only at the end",
                       param="best_of")
    for p in prompts:
        if len(p.ids) + params.max_tokens > state.context_length:
            raise _context_error(state, len(p.ids), params.max_tokens, prompt_param)
        try:
            params.validate(state.vocab_size, state.context_length, len(p.ids), logprobs_limit)
            state.engine.check_prompt(p.ids)  # here, not in the engine thread, so the error names our field
        except RequestError as e:
            param = {"prompt": prompt_param, "logprobs": logprobs_param}.get(e.param or "", e.param)
            raise APIError(400, str(e), param=param, code=e.code) from None


def check_stream_options(body: SamplingFields) -> bool:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


# ---- formatting ------------------------------------------------------------------------------------


def _lp(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


class OffsetTracker:
    """Character offsets of tokens in decoded text (a character split over tokens counts once)."""

    def __init__(self, start: int = 0) -> None:
        self.offset = start
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data: bytes) -> int:
        at = self.offset
        self.offset += len(self.decoder.decode(data))
        return at


class Formatter:
    def __init__(self, tokenizer: Any, text_bytes: Callable[[int], bytes] | None = None) -> None:
        self.tok = tokenizer
        # what a generated token adds to the text (the engine's rule: a skipped special token adds nothing)
        self.text_bytes = text_bytes or tokenizer.token_bytes

    def token_str(self, token_id: int) -> str:
        return self.tok.token_bytes(token_id).decode("utf-8", errors="replace")

    def completion_logprobs(self, entries: list[TokenLogprob | None], token_ids: list[int],
                            offsets: OffsetTracker, in_text: int | None = None, prompt: bool = False
                            ) -> dict[str, list]:
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

    def chat_logprob(self, entry: TokenLogprob) -> dict[str, Any]:
        def one(token_id: int, lp: float) -> dict[str, Any]:
            data = self.tok.token_bytes(token_id)
            return {"token": data.decode("utf-8", errors="replace"), "logprob": _lp(lp), "bytes": list(data)}

        return {**one(entry.token_id, entry.logprob), "top_logprobs": [one(t, lp) for t, lp in entry.top]}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"


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
    pass


def job_error(exc: Any) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ShuttingDown):
        return APIError(503, str(exc), code="shutting_down")
    if isinstance(exc, ChatforgeError):
        return from_user_error(exc)
    return server_error()


# ---- one generation request ------------------------------------------------------------------------


class OutputGuard:
    """Moderates generated text as it grows. A trailing partial word is held back ("bomb" may become
    "bombastic"), so the check always sees whole words; `push` returns the text that may be shown,
    or None once the output is flagged (then nothing more of it is shown)."""

    _PARTIAL_WORD = re.compile(r"\w+$")

    def __init__(self, check: Callable[[str], Any]) -> None:
        self.check = check
        self.sent = ""
        self.pending = ""
        self.flagged = False

    def push(self, text: str, final: bool = False) -> str | None:
        if self.flagged:
            return None
        self.pending += text
        hold = "" if final else (m.group() if (m := self._PARTIAL_WORD.search(self.pending)) else "")
        part = self.pending[: len(self.pending) - len(hold)]
        if (part or final) and self.check(self.sent + part):
            self.flagged = True
            return None
        self.sent += part
        self.pending = hold
        return part


@dataclass
class _Choice:
    index: int
    text: str = ""
    finished: bool = False
    offsets: OffsetTracker | None = None
    guard: OutputGuard | None = None


class Generation:
    """One HTTP generation request: its prompts, params, job and output, for either endpoint."""

    def __init__(self, state: ServerState, kind: str, prompts: list[Prompt], params: SamplingParams, *,
                 logprobs_limit: int, include_usage: bool = False, user_texts: list[str] | None = None,
                 dropped_messages: int | None = None) -> None:
        self.state, self.kind, self.prompts, self.params = state, kind, prompts, params
        self.dropped_messages = dropped_messages  # with truncation "auto": reported in a header and the body
        self.logprobs_limit, self.include_usage = logprobs_limit, include_usage
        self.user_texts = user_texts if user_texts is not None else [p.text for p in prompts]
        self.fmt = Formatter(state.tokenizer, lambda token: state.engine.text_bytes(token, params))
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.completion_tokens = 0
        self.job: Job | None = None
        self.n = params.n
        self.choices = {(i, j): _Choice(i * self.n + j) for i in range(len(prompts)) for j in range(self.n)}

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.dropped_messages is None else {DROPPED_HEADER: str(self.dropped_messages)}

    def _with_dropped(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self.dropped_messages is not None:
            obj["dropped_messages"] = self.dropped_messages
        return obj

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def input_flagged(self) -> bool:
        check = getattr(self.state.moderator, "check", None)
        return check is not None and any(check(t) for t in self.user_texts if t)

    def output_flagged(self, text: str) -> bool:
        return self.state.moderator is not None and bool(text) and self.state.moderator.check(text) is not None

    def new_guard(self) -> OutputGuard | None:
        return OutputGuard(self.output_flagged) if self.state.moderator is not None else None

    def submit(self) -> Job:
        subs = [SubRequest(p.ids, self.params, self.logprobs_limit) for p in self.prompts]
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

    async def messages(self, request: Request | None = None) -> AsyncIterator[tuple]:
        """The job's messages until every sub is done or cancelled (or an error); with `request`,
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
                kind, i, payload = message
                if kind == "event" and payload.token_ids:
                    self._saw_token()
                elif kind == "cancelled":
                    self.completion_tokens += payload
                    remaining.discard(i)
                elif kind == "done":
                    self.completion_tokens += payload.completion_tokens
                    remaining.discard(i)
                elif kind == "error":
                    remaining.clear()
                yield message

    # ---- whole responses ---------------------------------------------------------------------

    async def respond(self, request: Request) -> Response:
        if self.input_flagged():
            self.finish_metrics()
            return JSONResponse(self.refusal_object(), headers=self.headers)
        self.submit()
        results: list[Completion | None] = [None] * len(self.prompts)
        try:
            async for kind, i, payload in self.messages(request):
                if kind == "done":
                    results[i] = payload
                elif kind == "error":
                    raise job_error(payload)
        except ClientGone:
            return Response(status_code=499)
        finally:
            self.cancel()
            self.finish_metrics()
        return JSONResponse(self.response_object(results), headers=self.headers)

    def refusal_object(self) -> dict[str, Any]:
        choices = [self._choice_object(c.index, self.state.refusal, None, "content_filter")
                   for c in self.choices.values()]
        return self._with_dropped({"id": self.id, "object": self.object, "created": self.created,
                                   "model": self.state.model_name, "choices": choices, "usage": self.usage()})

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
                logprobs = None
                if self.kind == "chat":
                    if self.params.logprobs is not None:
                        logprobs = {"content": [self.fmt.chat_logprob(e) for e in entries or []], "refusal": None}
                else:
                    if self.params.echo:
                        text = prompt.text + text
                    if self.params.logprobs is not None:
                        logprobs = self._completion_logprobs(prompt, completion, tokens, entries or [])
                choices.append(self._choice_object(i * self.n + out.index, text, logprobs, reason))
        choices.sort(key=lambda c: c["index"])
        return self._with_dropped({"id": self.id, "object": self.object, "created": self.created,
                                   "model": self.state.model_name, "choices": choices, "usage": self.usage()})

    def _completion_logprobs(self, prompt: Prompt, completion: Completion, tokens: list[int],
                             entries: list[TokenLogprob]) -> dict[str, list]:
        if self.params.echo:
            offsets = OffsetTracker(0)
            head = self.fmt.completion_logprobs(list(completion.prompt_logprobs or [None] * len(prompt.ids)),
                                                prompt.ids, offsets, prompt=True)
            offsets.offset = len(prompt.text)
            tail = self.fmt.completion_logprobs(entries, [e.token_id for e in entries], offsets, len(tokens))
            return {k: head[k] + tail[k] for k in head}
        return self.fmt.completion_logprobs(entries, [e.token_id for e in entries], OffsetTracker(len(prompt.text)),
                                            len(tokens))

    def _choice_object(self, index: int, text: str, logprobs: Any, reason: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": logprobs, "finish_reason": reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

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

    # ---- streams -----------------------------------------------------------------------------

    def stream_response(self) -> Response:
        if self.input_flagged():
            self.finish_metrics()
            return SSEResponse(self._refusal_stream(), on_close=lambda: None, headers=self.headers)
        self.submit()
        return SSEResponse(self._stream(), on_close=self._closed, headers=self.headers)

    def _closed(self) -> None:
        self.cancel()

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = "omit", first: bool = False) -> str:
        obj: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat"
                               else "text_completion", "created": self.created, "model": self.state.model_name,
                               "choices": choices}
        if self.include_usage:
            obj["usage"] = None if usage == "omit" else usage
        return sse(self._with_dropped(obj) if first else obj)

    def _delta(self, index: int, text: str | None, logprobs: Any = None, reason: str | None = None,
               role: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}

    def _role_chunks(self) -> list[str]:
        if self.kind != "chat":
            return []
        return [self._chunk([self._delta(c.index, None, role=True)], first=True) for c in self.choices.values()]

    async def _refusal_stream(self) -> AsyncIterator[str]:
        for chunk in self._role_chunks():
            yield chunk
        for c in self.choices.values():
            yield self._chunk([self._delta(c.index, self.state.refusal, None, "content_filter")])
        if self.include_usage:
            yield self._chunk([], self.usage())
        yield DONE

    async def _stream(self) -> AsyncIterator[str]:
        try:
            for chunk in self._role_chunks():
                yield chunk
            async for kind, i, payload in self.messages():
                if kind == "start":
                    for chunk in self._on_start(i, payload):
                        yield chunk
                elif kind == "event":
                    for chunk in self._on_event(i, payload):
                        yield chunk
                elif kind == "error":
                    yield sse(job_error(payload).payload())
                    yield DONE
                    return
            if self.include_usage:
                yield self._chunk([], self.usage())
            yield DONE
        finally:
            self.finish_metrics()

    def _on_start(self, i: int, prompt_logprobs: list[TokenLogprob | None] | None) -> list[str]:
        """With echo, each of the prompt's choices begins with the prompt (and its logprobs)."""
        if self.kind == "chat" or not self.params.echo:
            return []
        prompt = self.prompts[i]
        out = []
        for j in range(self.n):
            c = self.choices[(i, j)]
            c.offsets = OffsetTracker(0)
            logprobs = None
            if self.params.logprobs is not None:
                entries = list(prompt_logprobs or [None] * len(prompt.ids))
                logprobs = self.fmt.completion_logprobs(entries, prompt.ids, c.offsets, prompt=True)
            c.offsets.offset = len(prompt.text)
            out.append(self._chunk([self._delta(c.index, prompt.text, logprobs)]))
        return out

    def _on_event(self, i: int, event: StreamEvent) -> list[str]:
        c = self.choices.get((i, event.index))
        if c is None or c.finished or event.finish_reason == "cancelled":
            return []
        text, reason = event.text, event.finish_reason
        if self.state.moderator is not None:
            if c.guard is None:
                c.guard = self.new_guard()
            text = c.guard.push(text, final=reason is not None)
            if text is None:
                c.finished = True
                self._cancel_if_all_finished(i)
                return [self._chunk([self._delta(c.index, None, None, "content_filter")])]
        c.text += text
        logprobs = None
        if self.params.logprobs is not None and event.logprobs:
            tokens = [e.token_id for e in event.logprobs]
            if self.kind == "chat":
                logprobs = {"content": [self.fmt.chat_logprob(e) for e in event.logprobs], "refusal": None}
            else:
                if c.offsets is None:
                    c.offsets = OffsetTracker(len(self.prompts[i].text))
                logprobs = self.fmt.completion_logprobs(list(event.logprobs), tokens, c.offsets, len(event.token_ids))
        if reason is not None:
            c.finished = True
        if not text and logprobs is None and reason is None:
            return []
        return [self._chunk([self._delta(c.index, text, logprobs, reason)])]

    def _cancel_if_all_finished(self, i: int) -> None:
        if all(self.choices[(i, j)].finished for j in range(self.n)):
            self.state.runner.cancel(self.job, i)


# ---- the two endpoints -------------------------------------------------------------------------------


async def create_completion(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    check_model(state, body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported: this model continues text and cannot fill in before a "
                       "suffix; put all the text in prompt", param="suffix")
    include_usage = check_stream_options(body)
    prompts = completion_prompts(state, body.prompt)
    params = build_params(state, body, max_tokens=_or(body.max_tokens, 16), logprobs=body.logprobs,
                          echo=bool(body.echo), best_of=body.best_of)
    check_params(state, params, prompts, stream=bool(body.stream), logprobs_limit=COMPLETION_LOGPROBS,
                 prompt_param="prompt")
    gen = Generation(state, "completion", prompts, params, logprobs_limit=COMPLETION_LOGPROBS,
                     include_usage=include_usage)
    return gen.stream_response() if body.stream else await gen.respond(request)


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    check_model(state, body.model)
    if body.tools or body.functions:
        raise APIError(400, "tools and functions are not supported by this server", param="tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
    include_usage = check_stream_options(body)
    if not body.messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    conv = chat_conversation(state, body.messages)
    if body.top_logprobs is not None:
        if not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
        if not 0 <= body.top_logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {body.top_logprobs}",
                           param="top_logprobs")
    logprobs = _or(body.top_logprobs, 0) if body.logprobs else None
    max_tokens = _or(body.max_completion_tokens, body.max_tokens)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"{param} must be at least 1, got {max_tokens}", param=param)
    dropped = 0
    if body.truncation == "auto":
        prompt, dropped, max_tokens = fit_chat(state, conv, max_tokens)
    else:
        prompt = Prompt(state.template.generation_prompt(conv), "")
    if max_tokens is None:
        max_tokens = max(state.context_length - len(prompt.ids), 1)
    user_texts = [m.content for m in conv.messages if m.role == "user"]
    stop_ids = state.template.stop_ids if state.template is not None else []
    params = build_params(state, body, max_tokens=max_tokens, logprobs=logprobs, stop_token_ids=stop_ids, chat=True)
    check_params(state, params, [prompt], stream=bool(body.stream), logprobs_limit=MAX_LOGPROBS,
                 prompt_param="messages", logprobs_param="top_logprobs")
    gen = Generation(state, "chat", [prompt], params, logprobs_limit=MAX_LOGPROBS, include_usage=include_usage,
                     user_texts=user_texts, dropped_messages=dropped if body.truncation == "auto" else None)
    return gen.stream_response() if body.stream else await gen.respond(request)
