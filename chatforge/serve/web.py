"""The web chat: the page at ``/`` (static files, no build step) and its JSON routes under ``/api/``.

The page talks to the OpenAI-compatible ``/v1/chat/completions`` (streamed) for answers and to
these routes to keep conversations, thumbs and comparisons in the database (`store.Store`):

=======  =====================================  ==============================================
GET      /api/conversations                     list, most recently updated first (``?limit=``)
POST     /api/conversations                     create ``{title?, system_prompt?, settings?}``
GET      /api/conversations/{id}                one, with ``messages``: the shown branch
PATCH    /api/conversations/{id}                ``{title?, system_prompt?, settings?}``
DELETE   /api/conversations/{id}                with its messages, ratings and comparisons
POST     /api/conversations/{id}/messages       add a turn ``{role, content, parent_id?, system?,
                                                params?, model?, finish_reason?, tool_turns?,
                                                tools?}``
POST     /api/conversations/{id}/branch         show the branch through ``{message_id}``
PUT      /api/messages/{id}/rating              ``{rating: 1 | -1 | 0}`` on an answer
GET      /api/comparisons                       every comparison, oldest first
POST     /api/comparisons                       ``{answer_a, answer_b, choice: a|b|tie,
                                                conversation_id + parent_id | prompt,
                                                tool_turns_a?, tool_turns_b?, tools?, ...}``
GET      /api/examples                          prompts the empty page offers: ``{examples: [str],
                                                source: "training" | "generic"}``
GET      /favicon.ico                           the page's icon (an SVG), public like the page
=======  =====================================  ==============================================

An answer's ``tool_turns`` are the built-in tool calls the server ran while making it, as its
``tool_results`` delta sent them (``{"type": "function", "function": {"name", "arguments"}, "content",
"ok"}``), each with ``at``: how many characters (code points) of the answer came before the call, and
``round``: which tool round of the answer it belongs to (see `store`). ``tools`` are the functions the
model was shown; left out, they are this server's built-in tools (``app.state.chatforge.builtin_tools``,
which ``chatforge serve --builtin-tools`` declares to every chat request, so to the answers the page
saves), and ``null`` or ``[]`` says none. Conversations and comparisons return both as stored.

The examples are the server's (``app.state.chatforge.examples`` and ``.examples_source``: prompts
from the model's training files, see `chatforge.data.examples`) when it has any, else the generic
ones (`chatforge.data.examples.GENERIC_EXAMPLES`).

When the server has an API key (``attach_web(..., api_key=)`` or ``app.state.api_key``) the
``/api/`` routes want it as ``Authorization: Bearer KEY``, like ``/v1/``; the page itself is public
(it holds no data) and keeps the key the user types in localStorage.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from chatforge.data.examples import GENERIC_EXAMPLES  # what any chat model can take a go at
from chatforge.serve.store import ACTIVE, MAX_TOOL_TURNS, NotFoundError, Store, StoreError

log = logging.getLogger("chatforge.serve")
STATIC_DIR = Path(__file__).parent / "static"
MAX_TEXT = 200_000  # characters in one message or answer
MAX_SHORT = 20_000  # a system prompt
#: The page loads only its own files and talks only to its own server: even a bug that let model text
#: become markup could neither run inline script nor load anything from elsewhere.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

Settings = dict[str, Any]
FAVICON = STATIC_DIR / "favicon.svg"


class ConversationIn(BaseModel):
    title: str = Field("", max_length=200)
    system_prompt: str = Field("", max_length=MAX_SHORT)
    settings: Settings = Field(default_factory=dict)


class ConversationPatch(BaseModel):
    title: str | None = Field(None, max_length=200)
    system_prompt: str | None = Field(None, max_length=MAX_SHORT)
    settings: Settings | None = None


class ToolFunctionIn(BaseModel):
    name: str = Field(..., max_length=200)
    arguments: str | dict[str, Any] = Field("", max_length=MAX_TEXT)


class ToolTurnIn(BaseModel):
    """A built-in call the server ran for an answer, and its result (`store` checks it against the answer)."""

    type: Literal["function"] = "function"
    function: ToolFunctionIn
    content: str = Field(..., max_length=MAX_TEXT)
    ok: bool = True
    at: int | None = Field(None, ge=0)  # characters of the answer before the call; left out: 0
    round: int | None = Field(None, ge=0)


ToolTurns = list[ToolTurnIn] | None
Tools = list[dict[str, Any]] | None


class MessageIn(BaseModel):
    role: Literal["user", "assistant"]
    content: str = Field(..., max_length=MAX_TEXT)
    parent_id: int | None = None  # left out: after the message the shown branch ends at
    system: str | None = Field(None, max_length=MAX_SHORT)
    params: Settings | None = None
    model: str | None = Field(None, max_length=200)
    finish_reason: str | None = Field(None, max_length=32)
    tool_turns: ToolTurns = Field(None, max_length=MAX_TOOL_TURNS)
    tools: Tools = Field(None, max_length=100)  # left out: the server's built-in tools


class BranchIn(BaseModel):
    message_id: int


class RatingIn(BaseModel):
    rating: Literal[-1, 0, 1] | None


class ComparisonIn(BaseModel):
    answer_a: str = Field(..., max_length=MAX_TEXT)
    answer_b: str = Field(..., max_length=MAX_TEXT)
    choice: Literal["a", "b", "tie"]
    conversation_id: int | None = None
    parent_id: int | None = None
    prompt: list[dict[str, Any]] | str | None = None
    system: str | None = Field(None, max_length=MAX_SHORT)
    params: Settings | None = None
    model: str | None = Field(None, max_length=200)
    tool_turns_a: ToolTurns = Field(None, max_length=MAX_TOOL_TURNS)
    tool_turns_b: ToolTurns = Field(None, max_length=MAX_TOOL_TURNS)
    tools: Tools = Field(None, max_length=100)  # left out: the server's built-in tools


def _turns(turns: ToolTurns) -> list[dict[str, Any]] | None:
    return None if turns is None else [t.model_dump(exclude_none=True) for t in turns]


def _tools(app: FastAPI, body: BaseModel) -> list[dict[str, Any]] | None:
    """The functions the model was shown: the body's when it names them, else the server's built-in tools."""
    return body.tools if "tools" in body.model_fields_set else served_tools(app)


def attach_web(app: FastAPI, db_url: str, api_key: str | None = None) -> None:
    """Serve the chat page at ``/`` and its ``/api/`` routes on `app`, storing into `db_url`.

    The store (tables created now) is left at ``app.state.chat_store``; an empty `db_url` keeps it in
    memory. `api_key` (default: whatever ``app.state.api_key`` holds when a request comes) protects the
    ``/api/`` routes.
    """
    if not db_url:
        log.warning("web page: no database URL given; conversations and feedback are kept in memory only")
        db_url = "sqlite://"
    store = Store(db_url)
    app.state.chat_store = store

    def require_key(request: Request) -> None:
        expected = api_key if api_key is not None else getattr(request.app.state, "api_key", None)
        if not expected:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), str(expected).encode()):
            raise HTTPException(status_code=401, detail="invalid or missing API key; send it as "
                                                        "'Authorization: Bearer KEY'",
                                headers={"WWW-Authenticate": "Bearer"})

    router = APIRouter(prefix="/api", dependencies=[Depends(require_key)], tags=["web chat"])

    @router.get("/conversations")
    def list_conversations(limit: int = Query(200, ge=1, le=1000)) -> list[dict]:
        return store.list_conversations(limit)

    @router.post("/conversations", status_code=201)
    def create_conversation(body: ConversationIn) -> dict:
        with _errors():
            return store.create_conversation(body.title, body.system_prompt, body.settings)

    @router.get("/conversations/{conversation_id}")
    def get_conversation(conversation_id: int) -> dict:
        with _errors():
            return store.get_conversation(conversation_id)

    @router.patch("/conversations/{conversation_id}")
    def update_conversation(conversation_id: int, body: ConversationPatch) -> dict:
        with _errors():
            return store.update_conversation(conversation_id, body.title, body.system_prompt, body.settings)

    @router.delete("/conversations/{conversation_id}", status_code=204)
    def delete_conversation(conversation_id: int) -> Response:
        with _errors():
            store.delete_conversation(conversation_id)
        return Response(status_code=204)

    @router.post("/conversations/{conversation_id}/messages", status_code=201)
    def add_message(conversation_id: int, body: MessageIn, request: Request) -> dict:
        parent = body.parent_id if "parent_id" in body.model_fields_set else ACTIVE
        tools = _tools(request.app, body) if body.role == "assistant" else body.tools
        with _errors():
            return store.add_message(conversation_id, body.role, body.content, parent, system=body.system,
                                     params=body.params, model=body.model, finish_reason=body.finish_reason,
                                     tool_turns=_turns(body.tool_turns), tools=tools)

    @router.post("/conversations/{conversation_id}/branch")
    def select_branch(conversation_id: int, body: BranchIn) -> dict:
        with _errors():
            return store.select_branch(conversation_id, body.message_id)

    @router.put("/messages/{message_id}/rating")
    def rate(message_id: int, body: RatingIn) -> dict:
        with _errors():
            return store.rate(message_id, body.rating)

    @router.get("/comparisons")
    def list_comparisons() -> list[dict]:
        return store.list_comparisons()

    @router.post("/comparisons", status_code=201)
    def add_comparison(body: ComparisonIn, request: Request) -> dict:
        with _errors():
            return store.add_comparison(body.answer_a, body.answer_b, body.choice,
                                        conversation_id=body.conversation_id, parent_id=body.parent_id,
                                        prompt=body.prompt, system=body.system, params=body.params,
                                        model=body.model, tool_turns_a=_turns(body.tool_turns_a),
                                        tool_turns_b=_turns(body.tool_turns_b), tools=_tools(request.app, body))

    @router.get("/examples")
    def examples(request: Request) -> dict:
        return served_examples(request.app)

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="web-static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    # Browsers and other clients ask for /favicon.ico on their own, without reading the page's <link>: no 404s.
    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(FAVICON, media_type="image/svg+xml",
                            headers={"Cache-Control": "max-age=86400", "X-Content-Type-Options": "nosniff"})


def served_tools(app: FastAPI) -> list[dict[str, Any]]:
    """The specs of the built-in tools this server declares to every chat request (none without
    ``--builtin-tools``, or when the page is served without the model server)."""
    state = getattr(app.state, "chatforge", None)
    builtin = getattr(state, "builtin_tools", None) or {}
    return [tool.spec() for tool in builtin.values()]


def served_examples(app: FastAPI) -> dict:
    """The server's example prompts (``app.state.chatforge.examples``) when it has some, else the generic ones."""
    state = getattr(app.state, "chatforge", None)
    found = [str(e) for e in getattr(state, "examples", None) or [] if str(e).strip()]
    if found:
        return {"examples": found, "source": getattr(state, "examples_source", None) or "training"}
    return {"examples": list(GENERIC_EXAMPLES), "source": "generic"}


class _errors:
    """Turn the store's errors into HTTP errors: 404 for an unknown id, 400 for the rest."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, NotFoundError):
            raise HTTPException(status_code=404, detail=str(error)) from error
        if isinstance(error, StoreError):
            raise HTTPException(status_code=400, detail=str(error)) from error
        return False
