"""The web chat store's tables (SQLAlchemy 2.x models) and how a database is opened: URLs, SQLite's
pragmas, and the columns added to an older database. `store.py` is the repository on top.

Schema (ids are integers; times are UTC):

- ``conversations``: ``id``, ``title``, ``system_prompt`` (the one the page shows and sends next),
  ``settings`` (JSON: model, temperature, top_p, max_tokens), ``active_leaf_id`` (the message the
  shown branch ends at), ``created_at``, ``updated_at``.
- ``messages``: a tree per conversation. ``id``, ``conversation_id``, ``parent_id`` (NULL for the
  first user turn), ``role`` (``user`` | ``assistant``), ``content``, and for answers the
  ``system`` prompt, sampling ``params`` (JSON), ``model`` and ``finish_reason`` they were made
  with. Regenerating an answer adds a sibling (same parent); the shown branch is the path from the
  root to ``active_leaf_id``. A user turn follows an answer (or starts the tree); an answer
  follows a user turn. An answer also keeps ``tool_turns`` (JSON, NULL: none): the server's
  built-in tool calls it made and their results, and ``tools`` (JSON, NULL: none or unknown): the
  functions the model was shown (their specs, as `chatforge.tools.Tool.spec` writes them).
- ``ratings``: thumbs on answers. ``id``, ``message_id`` (unique), ``value`` (+1 up, -1 down).
- ``comparisons``: two answers to one prompt and which one the user preferred. ``id``,
  ``conversation_id`` (NULL for a comparison made outside a conversation), ``prompt`` (JSON: the
  OpenAI messages the answers were made from, system turn included, ending with the user turn),
  ``answer_a``, ``answer_b``, ``choice`` (``a`` | ``b`` | ``tie``), ``message_a_id`` and
  ``message_b_id`` (the answers, stored as sibling messages too), ``params``, ``model``,
  ``tool_turns_a``, ``tool_turns_b`` and ``tools`` (as on messages).

A tool turn is the server's ``tool_results`` item (``{"type": "function", "function": {"name",
"arguments"}, "content", "ok"}``) plus where it happened: ``at``, the number of characters (code
points) of the answer's content written before the call, and ``round``, counting the answer's tool
rounds from 0 (the calls of one round were written together, then all their results read). The
turns are kept in a JSON column of the answer because they are part of it: always written and read
with its content, never queried on their own, like ``params`` and ``prompt``.

Tables are created when missing (``create_all``), which never alters a table that exists; so that a
database from before a column was added still opens, `Store` adds each missing column to an existing
table on open (``ALTER TABLE … ADD COLUMN``; every column added later is nullable, so old rows read
as "none"). Older chatforge versions ignore the extra columns.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text, create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import StaticPool

from chatforge.errors import ChatforgeError


class StoreError(ChatforgeError):
    """A request the store cannot carry out (bad role, parent, rating, choice …)."""


class NotFoundError(StoreError):
    """No conversation, message or comparison with that id."""


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso_time(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite keeps no time zone: every time stored is UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat()


class Base(DeclarativeBase):
    pass


class ConversationRow(Base):
    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(200), default="")
    system_prompt: Mapped[str] = mapped_column(Text, default="")
    settings: Mapped[dict] = mapped_column(JSON, default=dict)
    # no foreign key: a conversation and its messages would point at each other
    active_leaf_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now, index=True)


class MessageRow(Base):
    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), nullable=True,
                                                  index=True)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    system: Mapped[str | None] = mapped_column(Text, nullable=True)  # answers: the system prompt in effect
    params: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # answers: temperature, top_p, max_tokens
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    # added after the first release: nullable, so `add_missing_columns` can add them to an old database
    tool_turns: Mapped[list | None] = mapped_column(JSON, nullable=True)  # answers: built-in calls and results
    tools: Mapped[list | None] = mapped_column(JSON, nullable=True)  # answers: the functions the model was shown


class RatingRow(Base):
    __tablename__ = "ratings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), unique=True)
    value: Mapped[int] = mapped_column(Integer)  # +1 thumbs up, -1 thumbs down
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class ComparisonRow(Base):
    __tablename__ = "comparisons"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int | None] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"),
                                                        nullable=True, index=True)
    prompt: Mapped[list] = mapped_column(JSON)  # OpenAI messages ending with the user turn
    answer_a: Mapped[str] = mapped_column(Text)
    answer_b: Mapped[str] = mapped_column(Text)
    choice: Mapped[str] = mapped_column(String(8))  # "a", "b" or "tie"
    message_a_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"), nullable=True)
    message_b_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"), nullable=True)
    params: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    # added after the first release (see MessageRow)
    tool_turns_a: Mapped[list | None] = mapped_column(JSON, nullable=True)
    tool_turns_b: Mapped[list | None] = mapped_column(JSON, nullable=True)
    tools: Mapped[list | None] = mapped_column(JSON, nullable=True)


# ---------------------------------------------------------------------------------------------
# Opening a database


def database_url(value: str | Path) -> str:
    """A SQLAlchemy URL; a plain path (no ``://``) names a SQLite file."""
    text = str(value).strip()
    if not text:
        raise StoreError("database: empty URL; expected a SQLAlchemy URL such as sqlite:///chats.db or a file path")
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser()}"
    return text


def make_engine(url: str | Path) -> Engine:
    """An engine for `url`: SQLite gets a connection usable from any thread and enforced foreign keys;
    an in-memory SQLite database is one connection shared by every session (else each would be empty)."""
    text = database_url(url)
    try:
        parsed = make_url(text)
    except ArgumentError as e:
        raise StoreError(f"database: cannot parse URL {text!r}; expected a SQLAlchemy URL such as "
                         "sqlite:///chats.db") from e
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"check_same_thread": False}
        if parsed.database in (None, "", ":memory:"):
            kwargs["poolclass"] = StaticPool
        else:
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(parsed, **kwargs)
    except Exception as e:  # a driver that is not installed, a bad option
        raise StoreError(f"database: cannot open {parsed.render_as_string(hide_password=True)} ({e})") from e
    if parsed.get_backend_name() == "sqlite":
        in_file = "poolclass" not in kwargs
        event.listen(engine, "connect", lambda connection, _record: _sqlite_pragmas(connection, in_file))
    return engine


def _sqlite_pragmas(dbapi_connection, in_file: bool) -> None:
    """Enforced foreign keys; for a file, write-ahead logging: readers never wait for the writer, and a
    commit is one append (synchronous=NORMAL: a power cut may lose the last commits, never the file)."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    if in_file:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def add_missing_columns(engine: Engine) -> list[str]:
    """Add to each existing table the (nullable) columns it lacks; returns them as ``table.column``.

    ``create_all`` creates missing tables but never alters one that exists, so a database written before
    a column was added would otherwise fail on every query that reads that column. Tables that do not
    exist are left alone (not a chatforge database, or not created yet)."""
    added = []
    existing = set(inspect(engine).get_table_names())
    quote = engine.dialect.identifier_preparer.quote
    for table in Base.metadata.sorted_tables:
        if table.name not in existing:
            continue
        have = {c["name"] for c in inspect(engine).get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            if not column.nullable:  # only nullable columns can be added to rows that exist
                raise StoreError(f"database: table {table.name} lacks column {column.name}, which cannot be "
                                 "added to an existing table; expected a database written by `chatforge serve`")
            kind = column.type.compile(dialect=engine.dialect)
            try:
                with engine.begin() as connection:
                    connection.execute(text(f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column.name)} "
                                            f"{kind}"))
            except DBAPIError as e:  # another process may have added it meanwhile
                if column.name not in {c["name"] for c in inspect(engine).get_columns(table.name)}:
                    raise StoreError(f"database: cannot add column {column.name} to table {table.name} of an "
                                     f"older database ({e.orig}); open it once with write access") from e
            added.append(f"{table.name}.{column.name}")
    return added
