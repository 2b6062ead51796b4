"""`POST /tokenize` and `POST /detokenize`: the served tokenizer, for clients that count tokens remotely.

The shapes are vLLM's and llama.cpp's, both accepted, so either kind of client works unchanged:

- ``/tokenize``: ``{"prompt": text}`` (vLLM) or ``{"content": text}`` (llama.cpp), or ``{"messages":
  [...], "add_generation_prompt": true}`` (rendered with the chat template, as /v1/chat/completions
  would render them, with ``tools`` and the server's built-in tools declared) -> ``{"tokens": [ids], "count",
  "max_model_len"}``; with ``return_token_strs``
  (vLLM) ``token_strs`` too, with ``with_pieces`` (llama.cpp) ``tokens`` become ``[{"id", "piece"}]``.
- ``/detokenize``: ``{"tokens": [ids]}`` -> ``{"prompt": text, "content": text}`` (vLLM's and
  llama.cpp's names for the same text).

Text is encoded as /v1/completions encodes a prompt: special-token strings a user types stay text.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from fastapi import APIRouter, Request

from chatforge.serve.errors import APIError
from chatforge.serve.handlers import chat_conversation
from chatforge.serve.schemas import DetokenizeRequest, TokenizeRequest
from chatforge.serve.tools import read_function_calling


def _state(request: Request) -> Any:
    return request.app.state.chatforge


def _check_model(state: Any, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(404, f"The model `{name}` does not exist; this server serves `{state.model_name}`",
                       param="model", code="model_not_found")


def _ids(state: Any, body: TokenizeRequest) -> list[int]:
    given = [name for name in ("prompt", "content", "messages") if getattr(body, name) is not None]
    if len(given) != 1:
        raise APIError(400, "expected exactly one of prompt, content (text) or messages (a chat), got "
                       f"{', '.join(given) or 'none'}", param="prompt")
    if body.messages is not None:
        # the functions a chat request would declare: the server's built-in tools and the body's tools
        declared = SimpleNamespace(tools=body.tools, functions=None, tool_choice=None, function_call=None,
                                   parallel_tool_calls=None)
        calling = read_function_calling(declared, state.builtin_tools)
        conv = chat_conversation(state, body.messages, calling.functions if calling else None)
        rendered = state.template.render(conv).ids
        return rendered + [state.template.role_ids["assistant"]] if body.add_generation_prompt else rendered
    return state.tokenizer.encode(body.prompt if body.prompt is not None else body.content)


def tokenizer_router() -> APIRouter:
    router = APIRouter()

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
        state = _state(request)
        _check_model(state, body.model)
        ids = _ids(state, body)
        pieces = [state.tokenizer.token_bytes(t).decode("utf-8", errors="replace") for t in ids]
        out: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": state.context_length}
        if body.with_pieces:
            out["tokens"] = [{"id": t, "piece": p} for t, p in zip(ids, pieces)]
        if body.return_token_strs:
            out["token_strs"] = pieces
        return out

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
        state = _state(request)
        _check_model(state, body.model)
        bad = [t for t in body.tokens if not 0 <= t < state.tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"tokens: id {bad[0]} is outside the vocabulary (0..{state.tokenizer.vocab_size - 1})",
                           param="tokens")
        text = state.tokenizer.decode(body.tokens)
        return {"prompt": text, "content": text}

    return router
