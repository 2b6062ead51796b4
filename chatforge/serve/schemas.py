"""Request bodies of the OpenAI-compatible routes (pydantic, strict types).

Types are strict (``"5"`` is not an integer, ``true`` is not a number) and non-finite numbers are
refused, so a malformed body is a 422 naming the field; value ranges are checked later, with the
engine's own rules (`SamplingParams.validate`), as 400s. Unknown fields are ignored, as most
OpenAI-compatible servers do. The extras beyond OpenAI's parameters (`top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids` and beam search) are plain
body fields: the official client sends them with ``extra_body={...}``.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool | None = None


class WatermarkFields(_Body):
    """The extra field ``watermark``: watermark this request's answers with the client's own key, on a
    server that has none (`chatforge serve --watermark-key` decides for every request otherwise). Unset
    settings are the server's (--watermark-gamma ...); an unknown field is a mistake, not ignored."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    key: Union[str, int]  # noqa: UP007
    gamma: float | None = None
    delta: float | None = None
    seeding_scheme: str | None = None
    context_width: int | None = None


class SamplingFields(_Body):
    """What both endpoints share: OpenAI's decoding parameters and the engine's extras."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None  # noqa: UP007 (pydantic reports the union members by name)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    # extras (vLLM / transformers names)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    num_beams: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | None = None
    no_repeat_ngram_size: int | None = None
    skip_special_tokens: bool | None = None  # default: true on chat (vLLM's default), false on completions
    watermark: WatermarkFields | None = None  # chatforge's extra: see WatermarkFields


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]  # noqa: UP007
    suffix: str | None = None
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: Union[str, list[ContentPart], None] = None  # noqa: UP007
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None  # legacy: an assistant's one call


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None  # noqa: UP007
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None  # legacy function calling: the same path as tools
    function_call: Union[str, dict[str, Any], None] = None  # noqa: UP007
    response_format: dict[str, Any] | None = None
    # extra: "auto" drops the oldest whole turns after the system prompt when the conversation outgrows
    # the context, as OpenAI's Responses API and `chatforge chat` do (Chat Completions itself answers 400)
    truncation: Literal["auto", "disabled"] | None = None


# ---- /tokenize and /detokenize (vLLM's and llama.cpp's fields both) ----


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    content: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Any] | None = None  # with messages: declared in the system turn, as on /v1/chat/completions
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


# ---- /v1/detect ----


class DetectRequest(_Body):
    """Is this text machine-written? `method` "watermark" (the only one yet) counts the green tokens of
    the server's watermark, or of `key`'s; the settings default to the server's (see serve/detect.py)."""

    input: Union[str, list[str]]  # noqa: UP007
    context: str | None = None  # the prompt the texts answered: seeds their first tokens, is not scored
    method: str = "watermark"
    model: str | None = None
    key: Union[str, int, None] = None  # noqa: UP007 (default: the server's --watermark-key)
    gamma: float | None = None
    seeding_scheme: str | None = None
    context_width: int | None = None
    z_threshold: float = 4.0
    ignore_repeated_ngrams: bool = True
    windowed: bool = False
