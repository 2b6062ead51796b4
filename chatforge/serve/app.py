"""The OpenAI-compatible server: `create_app(engine, config)` builds the FastAPI app.

Routes:

    GET  /health                 open even with an API key; 503 while shutting down
    GET  /metrics                Prometheus text (see metrics.py)
    GET  /v1/models              the one served model (id = config.model_name)
    GET  /v1/models/{model}
    POST /v1/completions         see handlers.py
    POST /v1/chat/completions
    POST /v1/detect              is a text watermarked? (see detect.py; with --watermark-key every answer is)
    POST /tokenize, /detokenize  the served tokenizer (see tokenize.py)
    /  and /api/...              the web chat page, when `chatforge.serve.web` is there and web is on

Middleware, outermost first: metrics (requests by endpoint and status), CORS (only with
`cors_origins`), the API key (Bearer, constant-time comparison; /v1, /api, /metrics and the tokenizer
routes), and the
body limit (413 past `max_body_bytes`). The engine runs in the runner's thread, started and
stopped with the app's lifespan.
"""

from __future__ import annotations

import hmac
import json
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from chatforge.chat import ChatTemplate
from chatforge.generate.engine import Engine
from chatforge.serve.config import ServeConfig
from chatforge.serve.detect import detect, server_watermark
from chatforge.serve.errors import APIError, error_payload, install_error_handlers
from chatforge.serve.handlers import ServerState, create_chat_completion, create_completion
from chatforge.serve.metrics import Metrics
from chatforge.serve.runner import EngineRunner
from chatforge.serve.schemas import ChatCompletionRequest, CompletionRequest, DetectRequest
from chatforge.serve.tokenize import tokenizer_router
from chatforge.tools import builtin_tools

log = logging.getLogger("chatforge.serve")

PROTECTED_PREFIXES = ("/v1/", "/api/", "/metrics", "/tokenize", "/detokenize")
_BODY_DRAIN_FACTOR = 16  # read (and drop) at most this many times the limit before giving up on a body


# ---- middleware (plain ASGI) ---------------------------------------------------------------------


async def _send_json(send: Any, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def endpoint_label(path: str) -> str:
    if path in ("/v1/completions", "/v1/chat/completions", "/v1/detect", "/v1/models", "/health", "/metrics",
                "/tokenize", "/detokenize"):
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path in ("/", "/favicon.ico") or path.startswith(("/api/", "/static/")):
        return "web"
    return "other"


class MetricsMiddleware:
    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            self.metrics.observe_request(endpoint_label(scope["path"]), status["code"])


class AuthMiddleware:
    """Bearer API key on /v1, /api and /metrics (compared in constant time); /health and the page stay open."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"].startswith(PROTECTED_PREFIXES):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                message = ("missing API key: send it as 'Authorization: Bearer KEY'" if not header
                           else "incorrect API key provided")
                await _send_json(send, 401, error_payload(message, code="invalid_api_key"),
                                 {"WWW-Authenticate": "Bearer"})
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Read the whole body first; past `max_bytes` answer 413 (the app never sees the request)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        body, size, more = bytearray(), 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                too_big = True
            if not too_big:
                body += chunk
            more = message.get("more_body", False)
            if size > self.max_bytes * _BODY_DRAIN_FACTOR:
                break
        if too_big:
            await _send_json(send, 413, error_payload(
                f"request body too large: {int(declared) if declared and declared.isdigit() else size} bytes; "
                f"the limit is {self.max_bytes} bytes", code="request_too_large"), {"Connection": "close"})
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ---- the app ---------------------------------------------------------------------------------------


def _attach_web(app: FastAPI, db_url: str) -> bool:
    import importlib.util

    if importlib.util.find_spec("chatforge.serve.web") is None:
        log.info("web page: chatforge.serve.web is not installed; serving the API only")
        return False
    from chatforge.serve.web import attach_web

    attach_web(app, db_url)
    return True


def create_app(engine: Engine, config: ServeConfig | None = None, *, moderator: Any = None,
               template: ChatTemplate | None = None, examples: tuple[list[str], str] | None = None) -> FastAPI:
    """The server for `engine` (its model and tokenizer). `moderator`: an object with
    `check(text) -> reason | None` and `REFUSAL` (chatforge.serve.moderation.Moderator); `examples`:
    the prompts the web page offers and their source (`chatforge.data.examples.example_prompts`)."""
    config = config or ServeConfig()
    tokenizer = engine.tokenizer
    if template is None and hasattr(tokenizer, "special_ids"):
        try:
            template = ChatTemplate(tokenizer)
        except KeyError:  # a tokenizer without the chat special tokens: completions only
            template = None
    watermark, watermark_settings = server_watermark(config, engine.config.vocab_size)
    runner = EngineRunner(engine, max_queue=config.max_queue)
    metrics = Metrics(gauges=runner.gauges)
    state = ServerState(engine=engine, runner=runner, tokenizer=tokenizer, template=template,
                        model_name=config.model_name or "chatforge", metrics=metrics, moderator=moderator,
                        max_prompts=config.max_prompts, max_beams=max(16, engine.max_batch_size),
                        builtin_tools=builtin_tools() if config.builtin_tools else {}, watermark=watermark,
                        watermark_settings=watermark_settings)
    if examples is not None:
        state.examples, state.examples_source = list(examples[0]), examples[1]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        try:
            yield
        finally:
            runner.stop()

    # no /docs, /redoc or /openapi.json: they would stay open without the key and load Swagger UI from a CDN
    app = FastAPI(title="chatforge", description="OpenAI-compatible API of a chatforge model", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.chatforge = state  # what the web page's routes may use: runner, template, tokenizer, model name
    app.state.api_key = config.api_key  # the web page's /api routes check the same key
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        info = {"status": "draining" if runner.draining else "ok", "model": state.model_name,
                **runner.gauges()}
        return JSONResponse(info, status_code=503 if runner.draining else 200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict[str, Any]:
        """OpenAI's model object, with the context length and whether answers are watermarked (the
        settings, never the key; null: not watermarked), which the web page's check panel reads."""
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "chatforge",
                "context_length": state.context_length,
                "watermark": state.watermark.public() if state.watermark is not None else None}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        if model != state.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{state.model_name}`",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(state, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(state, body, request)

    @app.post("/v1/detect")
    async def detect_texts(body: DetectRequest) -> dict[str, Any]:
        return await detect(state, body)

    app.include_router(tokenizer_router())
    if config.web:
        _attach_web(app, config.db_url)

    # add_middleware puts each new one outside the previous: the last added runs first
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(AuthMiddleware, api_key=config.api_key)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in config.cors_origins)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
