"""The conversation and feedback store of the web chat: a small repository over the tables of
`store_tables.py` (SQLAlchemy 2.x models).

Any SQLAlchemy URL works (``sqlite:///chats.db``, ``postgresql+psycopg://…``); a plain path is a
SQLite file. Tables are created when a `Store` opens the database.

The schema is described in `store_tables.py`, where the tables are.

Deleting a conversation deletes its messages, their ratings and its comparisons.

The repository returns plain dicts (JSON-ready), never ORM objects that outlive their session.
Errors a user can cause raise `StoreError` (`NotFoundError` for an unknown id).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    delete,
    func,
    select,
)
from sqlalchemy.orm import Session, sessionmaker

from chatforge.serve.store_tables import (  # noqa: F401  (NotFoundError, database_url: part of the store's API)
    Base,
    ComparisonRow,
    ConversationRow,
    MessageRow,
    NotFoundError,
    RatingRow,
    StoreError,
    add_missing_columns,
    database_url,
    iso_time,
    make_engine,
    utc_now,
)

DEFAULT_DB_URL = "sqlite:///chatforge.db"
ROLES = ("user", "assistant")
CHOICES = ("a", "b", "tie")
TITLE_CHARS = 60
MAX_TOOL_TURNS = 64  # built-in calls in one answer (the engine runs at most a few rounds of a few calls)
#: Use as `parent_id` to mean "after the message the shown branch ends at".
ACTIVE = object()


# ---------------------------------------------------------------------------------------------
# The repository


class Store:
    """Conversations, messages, ratings and comparisons in one database (tables created on open)."""

    def __init__(self, url: str | Path = DEFAULT_DB_URL, create: bool = True) -> None:
        """Open the database: with `create`, make the tables it lacks; either way, add the columns its
        existing tables lack (a database from an older chatforge)."""
        self.url = database_url(url)
        self.engine = make_engine(self.url)
        if create:
            Base.metadata.create_all(self.engine)
        add_missing_columns(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    # ---- conversations ----------------------------------------------------------------------

    def create_conversation(self, title: str = "", system_prompt: str = "", settings: dict | None = None) -> dict:
        with self._session() as s:
            conv = ConversationRow(title=_title(title), system_prompt=system_prompt or "", settings=settings or {})
            s.add(conv)
            s.flush()
            return _conversation_dict(conv)

    def list_conversations(self, limit: int = 200) -> list[dict]:
        """The most recently updated conversations first."""
        with self._session() as s:
            rows = s.scalars(select(ConversationRow).order_by(ConversationRow.updated_at.desc(),
                                                              ConversationRow.id.desc()).limit(limit))
            return [_conversation_dict(c) for c in rows]

    def get_conversation(self, conversation_id: int) -> dict:
        """The conversation with ``messages``: the shown branch, root first, each with its ``siblings``
        (ids of the messages sharing its parent, itself included, oldest first) and its ``rating``."""
        with self._session() as s:
            conv = _get(s, ConversationRow, conversation_id, "conversation")
            return self._with_branch(s, conv)

    def update_conversation(self, conversation_id: int, title: str | None = None, system_prompt: str | None = None,
                            settings: dict | None = None) -> dict:
        with self._session() as s:
            conv = _get(s, ConversationRow, conversation_id, "conversation")
            if title is not None:
                conv.title = _title(title)
            if system_prompt is not None:
                conv.system_prompt = system_prompt
            if settings is not None:
                conv.settings = dict(settings)
            conv.updated_at = utc_now()
            return _conversation_dict(conv)

    def delete_conversation(self, conversation_id: int) -> None:
        with self._session() as s:
            _get(s, ConversationRow, conversation_id, "conversation")
            ids = select(MessageRow.id).where(MessageRow.conversation_id == conversation_id)
            # explicit, children first: correct whether or not the database enforces ON DELETE CASCADE
            s.execute(delete(RatingRow).where(RatingRow.message_id.in_(ids)))
            s.execute(delete(ComparisonRow).where(ComparisonRow.conversation_id == conversation_id))
            s.execute(delete(MessageRow).where(MessageRow.conversation_id == conversation_id)
                      .execution_options(synchronize_session=False))
            s.execute(delete(ConversationRow).where(ConversationRow.id == conversation_id))

    def select_branch(self, conversation_id: int, message_id: int) -> dict:
        """Show the branch through `message_id`: it continues to its newest descendant at each step."""
        with self._session() as s:
            conv = _get(s, ConversationRow, conversation_id, "conversation")
            messages = _messages(s, conversation_id)
            if message_id not in messages:
                raise NotFoundError(f"message {message_id} is not in conversation {conversation_id}")
            children = _children(messages.values())
            leaf = message_id
            while children.get(leaf):
                leaf = children[leaf][-1]
            conv.active_leaf_id = leaf
            return self._with_branch(s, conv, messages)

    # ---- messages ---------------------------------------------------------------------------

    def add_message(self, conversation_id: int, role: str, content: str, parent_id: int | None | object = ACTIVE,
                    system: str | None = None, params: dict | None = None, model: str | None = None,
                    finish_reason: str | None = None, tool_turns: list[dict] | None = None,
                    tools: list[dict] | None = None) -> dict:
        """Add a turn after `parent_id` (default: where the shown branch ends) and show its branch.

        An answer records the system prompt it was made with (`system`; default: the conversation's),
        the built-in tool calls it made with their results (`tool_turns`, see the module docstring) and
        the functions the model was shown (`tools`). The first user turn names an untitled conversation.
        """
        if role not in ROLES:
            raise StoreError(f"message: unknown role {role!r}; expected one of {list(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise StoreError(f"message: empty content in {_a(role)} turn; expected non-empty text")
        if role == "assistant":
            tool_turns, tools = _checked_tool_turns(tool_turns, content, "message"), _checked_tools(tools, "message")
        elif tool_turns or tools:
            raise StoreError("message: only an answer (role 'assistant') has tool_turns or tools")
        with self._session() as s:
            conv = _get(s, ConversationRow, conversation_id, "conversation")
            parent = conv.active_leaf_id if parent_id is ACTIVE else parent_id
            self._check_parent(s, conversation_id, role, parent)
            if role == "assistant" and system is None:
                system = conv.system_prompt
            row = MessageRow(conversation_id=conversation_id, parent_id=parent, role=role, content=content,
                             system=system if role == "assistant" else None,
                             params=params if role == "assistant" else None, model=model,
                             finish_reason=finish_reason, tool_turns=tool_turns or None, tools=tools or None)
            s.add(row)
            s.flush()
            conv.active_leaf_id = row.id
            conv.updated_at = utc_now()
            if role == "user" and not conv.title:
                conv.title = _title(content)
            return _message_dict(row)

    def _check_parent(self, s: Session, conversation_id: int, role: str, parent_id: int | None) -> None:
        if parent_id is None:
            if role != "user":
                raise StoreError("message: an assistant turn needs the user turn it answers (parent_id)")
            return
        parent = s.get(MessageRow, parent_id)
        if parent is None or parent.conversation_id != conversation_id:
            raise NotFoundError(f"message {parent_id} is not in conversation {conversation_id}")
        expected = "assistant" if role == "user" else "user"
        if parent.role != expected:
            raise StoreError(f"message: {_a(role)} turn must follow {_a(expected)} turn, but message {parent_id} "
                             f"is {_a(parent.role)} turn")

    def get_message(self, message_id: int) -> dict:
        with self._session() as s:
            row = _get(s, MessageRow, message_id, "message")
            out = _message_dict(row)
            out["rating"] = _ratings(s, [row.id]).get(row.id, 0)
            return out

    def context(self, message_id: int, system: str | None = None) -> list[dict[str, str]]:
        """The OpenAI messages up to and including `message_id`, system turn first (when not blank).

        The system prompt is `system` when given, else the one the path's last answer was made with,
        else the conversation's."""
        with self._session() as s:
            row = _get(s, MessageRow, message_id, "message")
            return _context(s, row, system)

    # ---- ratings ----------------------------------------------------------------------------

    def rate(self, message_id: int, value: int | None) -> dict:
        """Thumbs up (+1) or down (-1) on an answer; 0 or None takes the rating back."""
        if value not in (1, -1, 0, None):
            raise StoreError(f"rating: got {value!r}; expected 1 (thumbs up), -1 (thumbs down) or 0 (none)")
        with self._session() as s:
            message = _get(s, MessageRow, message_id, "message")
            if message.role != "assistant":
                raise StoreError(f"rating: message {message_id} is {_a(message.role)} turn; only answers are rated")
            row = s.scalar(select(RatingRow).where(RatingRow.message_id == message_id))
            if not value:
                if row is not None:
                    s.delete(row)
            elif row is None:
                s.add(RatingRow(message_id=message_id, value=value))
            else:
                row.value, row.updated_at = value, utc_now()
            return {"message_id": message_id, "rating": value or 0}

    def rated_answers(self) -> list[dict]:
        """Every rated answer: ``message_id``, ``conversation_id``, ``prompt`` (its context, ending with
        the user turn it answers), ``content``, ``tool_turns``, ``tools`` and ``rating``, oldest first."""
        with self._session() as s:
            rated = select(MessageRow.conversation_id).join(RatingRow, RatingRow.message_id == MessageRow.id)
            # every message of every conversation with a rating, read once: contexts are walked in memory
            messages = {m.id: m for m in s.scalars(select(MessageRow).where(MessageRow.conversation_id.in_(rated)))}
            rows = s.execute(select(RatingRow.message_id, RatingRow.value).order_by(RatingRow.message_id)).all()
            out = []
            for message_id, value in rows:
                message = messages[message_id]
                out.append({"message_id": message.id, "conversation_id": message.conversation_id,
                            "prompt": _context(s, messages[message.parent_id], message.system, messages),
                            "content": message.content, "tool_turns": message.tool_turns or [],
                            "tools": message.tools or None, "rating": value})
            return out

    # ---- comparisons ------------------------------------------------------------------------

    def add_comparison(self, answer_a: str, answer_b: str, choice: str, *, conversation_id: int | None = None,
                       parent_id: int | None = None, prompt: list[dict] | None = None, system: str | None = None,
                       params: dict | None = None, model: str | None = None, add_messages: bool = True,
                       tool_turns_a: list[dict] | None = None, tool_turns_b: list[dict] | None = None,
                       tools: list[dict] | None = None) -> dict:
        """Record two answers to one prompt and the user's choice ("a", "b" or "tie").

        Each answer may carry its built-in tool turns (`tool_turns_a`, `tool_turns_b`); `tools` are the
        functions the model was shown for both (one request's settings made both answers).

        The prompt is the context of `parent_id` (a user turn of `conversation_id`; the system turn is
        `system`, default the conversation's) or, outside a conversation, `prompt` (OpenAI messages
        ending with a user turn). In a conversation both answers are added as sibling answers of the
        user turn too (`add_messages`), and the preferred one (A on a tie) becomes the shown branch.
        """
        if choice not in CHOICES:
            raise StoreError(f"comparison: choice {choice!r}; expected one of {list(CHOICES)}")
        for name, answer in (("answer_a", answer_a), ("answer_b", answer_b)):
            if not isinstance(answer, str) or not answer.strip():
                raise StoreError(f"comparison: {name} is empty; expected the text of an answer")
        if (parent_id is None) == (prompt is None):
            raise StoreError("comparison: give either parent_id (a user turn of a conversation) or prompt "
                             "(messages ending with a user turn)")
        if parent_id is not None and conversation_id is None:
            raise StoreError("comparison: parent_id needs the conversation_id it belongs to")
        turns = [_checked_tool_turns(tool_turns_a, answer_a, "comparison: tool_turns_a"),
                 _checked_tool_turns(tool_turns_b, answer_b, "comparison: tool_turns_b")]
        tools = _checked_tools(tools, "comparison")
        if prompt is not None:
            prompt = _checked_prompt(prompt)
        with self._session() as s:
            if conversation_id is not None:
                conv = _get(s, ConversationRow, conversation_id, "conversation")
            message_ids: list[int | None] = [None, None]
            if parent_id is not None:
                parent = s.get(MessageRow, parent_id)
                if parent is None or parent.conversation_id != conversation_id:
                    raise NotFoundError(f"message {parent_id} is not in conversation {conversation_id}")
                if parent.role != "user":
                    raise StoreError(f"comparison: message {parent_id} is {_a(parent.role)} turn; expected the "
                                     "user turn both answers reply to")
                if system is None:
                    system = conv.system_prompt
                prompt = _context(s, parent, system)
                if add_messages:
                    rows = [MessageRow(conversation_id=conversation_id, parent_id=parent_id, role="assistant",
                                       content=text, system=system, params=params, model=model,
                                       finish_reason="stop", tool_turns=side or None, tools=tools or None)
                            for text, side in zip((answer_a, answer_b), turns)]
                    s.add_all(rows)
                    s.flush()
                    message_ids = [r.id for r in rows]
                    conv.active_leaf_id = message_ids[1] if choice == "b" else message_ids[0]
                conv.updated_at = utc_now()
            row = ComparisonRow(conversation_id=conversation_id, prompt=prompt, answer_a=answer_a, answer_b=answer_b,
                                choice=choice, message_a_id=message_ids[0], message_b_id=message_ids[1],
                                params=params, model=model, tool_turns_a=turns[0] or None,
                                tool_turns_b=turns[1] or None, tools=tools or None)
            s.add(row)
            s.flush()
            return _comparison_dict(row)

    def list_comparisons(self, limit: int | None = None) -> list[dict]:
        """Comparisons, oldest first."""
        with self._session() as s:
            query = select(ComparisonRow).order_by(ComparisonRow.id)
            if limit is not None:
                query = query.limit(limit)
            return [_comparison_dict(c) for c in s.scalars(query)]

    def counts(self) -> dict[str, int]:
        """How many rows each table holds."""
        with self._session() as s:
            return {table: s.scalar(select(func.count()).select_from(row)) or 0
                    for table, row in (("conversations", ConversationRow), ("messages", MessageRow),
                                       ("ratings", RatingRow), ("comparisons", ComparisonRow))}

    # ---- helpers ----------------------------------------------------------------------------

    def _with_branch(self, s: Session, conv: ConversationRow, messages: dict[int, MessageRow] | None = None) -> dict:
        messages = _messages(s, conv.id) if messages is None else messages
        siblings = _children(messages.values())
        path: list[MessageRow] = []
        node = messages.get(conv.active_leaf_id) if conv.active_leaf_id is not None else None
        while node is not None:
            path.append(node)
            node = messages.get(node.parent_id) if node.parent_id is not None else None
        path.reverse()
        ratings = _ratings(s, [m.id for m in path])
        out = _conversation_dict(conv)
        out["messages"] = [{**_message_dict(m), "siblings": siblings.get(m.parent_id, [m.id]),
                            "rating": ratings.get(m.id, 0)} for m in path]
        return out


def _get(s: Session, model: type[Base], id_: int, what: str) -> Any:
    row = s.get(model, id_)
    if row is None:
        raise NotFoundError(f"no {what} with id {id_}")
    return row


def _a(word: str) -> str:
    return f"{'an' if word == 'assistant' else 'a'} {word}"  # the roles: user, assistant, system


def _title(text: str) -> str:
    line = " ".join((text or "").split())
    return line if len(line) <= TITLE_CHARS else line[:TITLE_CHARS - 1].rstrip() + "…"


def _messages(s: Session, conversation_id: int) -> dict[int, MessageRow]:
    rows = s.scalars(select(MessageRow).where(MessageRow.conversation_id == conversation_id).order_by(MessageRow.id))
    return {m.id: m for m in rows}


def _children(messages) -> dict[int | None, list[int]]:
    """Parent id -> child ids, oldest first (None: the roots)."""
    out: dict[int | None, list[int]] = {}
    for m in sorted(messages, key=lambda m: m.id):
        out.setdefault(m.parent_id, []).append(m.id)
    return out


def _ratings(s: Session, ids: list[int]) -> dict[int, int]:
    if not ids:
        return {}
    return dict(s.execute(select(RatingRow.message_id, RatingRow.value).where(RatingRow.message_id.in_(ids))).all())


def _context(s: Session, row: MessageRow, system: str | None,
             messages: dict[int, MessageRow] | None = None) -> list[dict[str, str]]:
    """The OpenAI messages from the root to `row` (parents from `messages` when given, else queried)."""
    def parent(m: MessageRow) -> MessageRow | None:
        if m.parent_id is None:
            return None
        return messages[m.parent_id] if messages is not None else s.get(MessageRow, m.parent_id)

    path = []
    node: MessageRow | None = row
    while node is not None:
        path.append(node)
        node = parent(node)
    path.reverse()
    if system is None:
        answers = [m for m in path if m.role == "assistant" and m.system is not None]
        if answers:
            system = answers[-1].system
        else:
            conv = s.get(ConversationRow, row.conversation_id)
            system = conv.system_prompt if conv is not None else ""
    head = [{"role": "system", "content": system}] if system and system.strip() else []
    return head + [{"role": m.role, "content": m.content} for m in path]


def _checked_prompt(prompt: Any) -> list[dict[str, str]]:
    from chatforge.data.chat_readers import prompt_messages
    from chatforge.errors import DataError

    try:
        messages = prompt_messages(prompt, "comparison")
    except DataError as e:
        raise StoreError(str(e)) from e
    if messages[-1].role != "user":
        raise StoreError(f"comparison: the prompt ends with {_a(messages[-1].role)} turn; expected a user turn")
    return [{"role": m.role, "content": m.content} for m in messages]


def _checked_tool_turns(turns: Any, content: str, where: str) -> list[dict[str, Any]]:
    """An answer's tool turns in the stored form (see the module docstring), checked against its content.

    Each is ``{"type": "function", "function": {"name", "arguments"}, "content", "ok", "at", "round"}``:
    ``arguments`` an object is kept as its JSON text; ``ok`` defaults to true and ``at`` to 0 (the calls
    came before the answer's text). Without ``round``, turns at the same ``at`` one after the other are
    one round; rounds are renumbered 0, 1, … in order."""
    if turns is None:
        return []
    if not isinstance(turns, list):
        raise StoreError(f"{where}: tool_turns must be a list, got {type(turns).__name__}")
    if len(turns) > MAX_TOOL_TURNS:
        raise StoreError(f"{where}: {len(turns)} tool turns; expected at most {MAX_TOOL_TURNS}")
    length = len(content)
    out: list[dict[str, Any]] = []
    previous: tuple[int, Any] | None = None
    for i, turn in enumerate(turns):
        at_i = f"{where}: tool_turns[{i}]"
        if not isinstance(turn, dict):
            raise StoreError(f"{at_i}: expected an object, got {type(turn).__name__}")
        function = turn.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise StoreError(f"{at_i}.function: expected {{'name': str, 'arguments': str}}")
        arguments = function.get("arguments", "")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        result, ok = turn.get("content"), turn.get("ok", True)
        if not isinstance(result, str):
            raise StoreError(f"{at_i}.content: expected the tool's result as a string, got {type(result).__name__}")
        if not isinstance(ok, bool):
            raise StoreError(f"{at_i}.ok: expected true or false, got {ok!r}")
        at, given_round = turn.get("at", 0), turn.get("round")
        if isinstance(at, bool) or not isinstance(at, int) or not 0 <= at <= length:
            raise StoreError(f"{at_i}.at: expected a character offset into the answer (0 to {length}), got {at!r}")
        if out and at < out[-1]["at"]:
            raise StoreError(f"{at_i}.at: {at} comes before the previous turn's {out[-1]['at']}; expected the "
                             "turns in the order they happened")
        if given_round is not None and (isinstance(given_round, bool) or not isinstance(given_round, int)
                                        or given_round < 0):
            raise StoreError(f"{at_i}.round: expected a round number (0, 1, …), got {given_round!r}")
        key = (at, given_round)
        round_ = 0 if previous is None else out[-1]["round"] + (key != previous)
        previous = key
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments},
                    "content": result, "ok": ok, "at": at, "round": round_})
    return out


def _checked_tools(tools: Any, where: str) -> list[dict[str, Any]]:
    """The functions the model was shown, as bare function objects (OpenAI's tool form accepted)."""
    from chatforge.chat import normalize_tools
    from chatforge.errors import DataError

    try:
        return normalize_tools(tools, f"{where}: tools")
    except DataError as e:
        raise StoreError(str(e)) from e


def _conversation_dict(c: ConversationRow) -> dict:
    return {"id": c.id, "title": c.title, "system_prompt": c.system_prompt, "settings": c.settings or {},
            "active_leaf_id": c.active_leaf_id, "created_at": iso_time(c.created_at),
            "updated_at": iso_time(c.updated_at)}


def _message_dict(m: MessageRow) -> dict:
    return {"id": m.id, "conversation_id": m.conversation_id, "parent_id": m.parent_id, "role": m.role,
            "content": m.content, "system": m.system, "params": m.params, "model": m.model,
            "finish_reason": m.finish_reason, "tool_turns": m.tool_turns or [], "tools": m.tools or None,
            "created_at": iso_time(m.created_at)}


def _comparison_dict(c: ComparisonRow) -> dict:
    return {"id": c.id, "conversation_id": c.conversation_id, "prompt": c.prompt, "answer_a": c.answer_a,
            "answer_b": c.answer_b, "choice": c.choice, "message_a_id": c.message_a_id,
            "message_b_id": c.message_b_id, "params": c.params, "model": c.model,
            "tool_turns_a": c.tool_turns_a or [], "tool_turns_b": c.tool_turns_b or [], "tools": c.tools or None,
            "created_at": iso_time(c.created_at)}
