"""/v1/completions and /v1/chat/completions: request -> checked prompts and SamplingParams -> one job.

A request is checked completely before anything is queued (the model name, unsupported features, the
prompts, the context, then the engine's own `SamplingParams.validate`), so every client mistake is a
4xx naming its field and the engine thread only sees valid work. Then each route picks its response
format (formats.py: `CompletionFormat` or `ChatFormat`) and hands both to one `GenerationJob`
(jobs.py: submitting, streaming, cancelling, metrics and moderation, the same for both endpoints).

- completions: a prompt is text or token ids, or a list of either (choices ``prompt_index * n + i``);
  `max_tokens=0` with echo scores a text; logprobs at most 5 (OpenAI's limit; chat allows 20).
- chat: the messages go through the chat template; the answer's text starts at its first visible
  character. The extra field ``truncation: "auto"`` drops the oldest whole turns after the system
  prompt when the conversation outgrows the context (OpenAI's Chat Completions answers 400, as this
  server does without it); the format reports how many messages went.
- logprobs list every sampled token, an end token that stopped a choice included (usage counts it
  too), so ``echo`` with ``max_tokens: 1`` always gives the prompt's tokens + 1 entries.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from chatforge.chat import Conversation
from chatforge.errors import ChatforgeError, RequestError
from chatforge.generate.grammar import GrammarError, GrammarSpec, shortest_output
from chatforge.generate.params import MAX_LOGPROBS, SamplingParams
from chatforge.generate.tool_loop import ToolUse
from chatforge.serve.detect import answer_watermark
from chatforge.serve.errors import APIError
from chatforge.serve.formats import DROPPED_HEADER as DROPPED_HEADER  # the header's home is formats.py
from chatforge.serve.formats import ChatFormat, CompletionFormat
from chatforge.serve.jobs import GenerationJob
from chatforge.serve.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields
from chatforge.serve.state import Prompt, ServerState
from chatforge.serve.tools import FunctionCalling, check_tool_messages, read_function_calling

COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions; chat allows MAX_LOGPROBS (20)


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


def chat_conversation(state: ServerState, chat_messages: list[ChatMessage],
                      functions: list[dict[str, Any]] | None = None) -> Conversation:
    """The request's messages (and declared functions) as a checked conversation: roles mapped, text parts
    joined, calls and tool results kept; the legacy ``function_call`` and ``role: "function"`` read as a
    tool call and a tool result."""
    if state.template is None:
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
    messages = []
    for i, m in enumerate(chat_messages):
        role = {"developer": "system", "function": "tool"}.get(m.role, m.role)
        item: dict[str, Any] = {"role": role, "content": _message_text(m.content, f"messages[{i}]")}
        calls = m.tool_calls or ([{"function": m.function_call}] if m.function_call else None)
        if calls:
            item["tool_calls"] = calls
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        if role == "assistant" and calls and item["content"] is None:
            item["content"] = ""
        messages.append(item)
    try:
        conv = Conversation.from_openai(messages, where="request", need_assistant=False, tools=functions)
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
    """The request's SamplingParams, for both endpoints: every answer they generate (each choice, each turn
    after a built-in tool call) comes from these, the watermark included (`detect.answer_watermark`)."""
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
        strip_leading_whitespace=chat, skip_special_tokens=_or(body.skip_special_tokens, chat),
        watermark=answer_watermark(state, body.watermark))


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


def structured_params(state: ServerState, body: ChatCompletionRequest, params: SamplingParams, prompt: Prompt,
                      calling: FunctionCalling | None) -> tuple[SamplingParams, Prompt, ToolUse | None]:
    """The request's params, prompt and tool use under its response_format and function calling.

    ``none`` bans the call marker (a logit bias of -100, OpenAI's ban); ``auto`` reads the calls the model
    writes and runs the built-in ones; ``required`` or a named function make the answer one call: the
    prompt ends with the call marker and the call's JSON is decoded under a grammar, so it parses and
    matches a declared function's parameters. ``response_format`` json_object / json_schema put the
    whole answer under a grammar."""
    try:
        grammar = GrammarSpec.from_response_format(body.response_format)
        json_answer = grammar is not None
        if calling is not None and calling.forced:
            if json_answer:
                raise APIError(400, "response_format json cannot be combined with a required or named tool call: "
                               "the answer is the call", param="response_format")
            grammar = forced_call_grammar(calling)
    except GrammarError as e:
        raise APIError(400, str(e), param=e.param) from None
    if grammar is not None:
        if params.num_beams > 1:
            raise APIError(400, "beam search (num_beams > 1) cannot follow a grammar (response_format json or a "
                           "required tool call)", param="num_beams")
        params = replace(params, grammar=grammar)
        shortest = shortest_output(grammar, state.tokenizer)
        if shortest is not None and params.max_tokens < len(shortest) + 1:
            raise APIError(400, f"max_tokens ({params.max_tokens}) leaves no room for the shortest answer the "
                           f"schema allows ({len(shortest)} tokens and the end)", param="max_tokens")
    if calling is None:
        return params, prompt, None
    if params.num_beams > 1:
        raise APIError(400, "beam search (num_beams > 1) cannot be combined with tools", param="num_beams")
    marker = state.template.tool_call_id
    if calling.choice == "none":
        return replace(params, logit_bias={**params.logit_bias, marker: -100.0}), prompt, None
    if calling.forced:  # the answer is the call, and it goes back to the client, built-in or not
        ids = prompt.ids + [marker]
        params = replace(params, max_tokens=max(1, min(params.max_tokens, state.context_length - len(ids))))
        return params, Prompt(ids, prompt.text), ToolUse()
    if json_answer:  # a JSON answer has no room for a call: its grammar allows no call marker
        return params, prompt, None
    return params, prompt, ToolUse(run=calling.builtin)


def forced_call_grammar(calling: FunctionCalling) -> GrammarSpec:
    """The grammar of a required or named call; a schema the grammar library cannot enforce is a 400 on the
    request's own field (tools, or the legacy functions), naming the function."""
    try:
        return GrammarSpec.tool_call(calling.forced)
    except GrammarError as e:
        field = "functions" if calling.legacy else "tools"
        raise APIError(400, f"{field}: a required call must follow its function's parameters, and one of them "
                       f"cannot be enforced as a grammar: {e}", param=field) from None


# ---- the two endpoints -------------------------------------------------------------------------------


def _format_args(state: ServerState, params: SamplingParams, include_usage: bool) -> dict[str, Any]:
    """What either response format needs from the server: the model's name and the engine's rule for the
    text a token adds (a skipped special token adds nothing)."""
    return {"model_name": state.model_name, "include_usage": include_usage,
            "text_bytes": functools.partial(state.engine.text_bytes, params=params)}


async def _answer(job: GenerationJob, stream: bool, request: Request) -> Response:
    return job.stream_response() if stream else await job.respond(request)


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
    fmt = CompletionFormat(state.tokenizer, params, **_format_args(state, params, include_usage))
    job = GenerationJob(state, prompts, params, fmt, logprobs_limit=COMPLETION_LOGPROBS)
    return await _answer(job, bool(body.stream), request)


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    check_model(state, body.model)
    include_usage = check_stream_options(body)
    if not body.messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    # beam search explores answers, not calls: a server's built-in tools sit out a beam request that declares none
    builtin = {} if (body.num_beams or 1) > 1 and not (body.tools or body.functions) else state.builtin_tools
    calling = read_function_calling(body, builtin)
    check_tool_messages(body.messages)
    conv = chat_conversation(state, body.messages, calling.functions if calling else None)
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
    params, prompt, tool_use = structured_params(state, body, params, prompt, calling)
    check_params(state, params, [prompt], stream=bool(body.stream), logprobs_limit=MAX_LOGPROBS,
                 prompt_param="messages", logprobs_param="top_logprobs")
    fmt = ChatFormat(state.tokenizer, params, dropped_messages=dropped if body.truncation == "auto" else None,
                     calling=calling, **_format_args(state, params, include_usage))
    job = GenerationJob(state, [prompt], params, fmt, logprobs_limit=MAX_LOGPROBS, user_texts=user_texts,
                        tool_use=tool_use)
    return await _answer(job, bool(body.stream), request)

