"""Human feedback from the web chat as preference data for the reward model.

`chatforge feedback export --db URL --out prefs.jsonl` writes one JSON line per preference, in the
format `chatforge reward` (and DPO) read (`chatforge.data.chat_readers.read_preferences`):

    {"prompt": [{"role": "system", ...}, {"role": "user", ...}, ...], "chosen": "...", "rejected": "...",
     "source": "comparison" | "thumbs", ...ids}

Two kinds of feedback become pairs:

- a comparison with a choice: the preferred answer is chosen, the other rejected (ties teach no
  order and are left out);
- thumbs: for each prompt context (the same messages, system turn included, up to the user turn
  answered), every thumbs-up answer against every thumbs-down answer. Regenerating an answer and
  rating both versions makes such a pair.

Pairs whose chosen and rejected are the same text, pairs already written and prompts the reader
would refuse are skipped and counted. The file is written atomically: a failed export leaves an
earlier file whole.

Tools. An answer that used the server's built-in tools (``chatforge serve --builtin-tools``) exports
as the list of OpenAI messages the model wrote and read, TRL's conversational preference form
(`response_messages`): for each tool round an assistant message with the text written before the
calls (often "") and their ``tool_calls`` (ids ``call_1``, ``call_2``, … counted per response), then
one ``role: "tool"`` message per result, then an assistant message with the rest of the answer. An
answer without tool turns exports as its text, exactly as before.

A record carries a top-level ``"tools"`` (OpenAI's ``[{"type": "function", "function": {...}}]``)
whenever its answers were made with functions declared, whether or not they called one: a server
with built-in tools shows them to the model in the system turn of every chat request, so they are
part of the prompt both answers were sampled from, and the reward model should score each answer in
that same prompt. (Adding them only to the records that used a tool would also make their mere
presence a cue for "this answer calls a tool".) The declared functions are those the server recorded
with the answer (`web.py`); an older answer that used tools but has none recorded gets the built-in
tools' specs. Thumbs pair only answers shown the same functions (the same prompt).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from chatforge.errors import DataError
from chatforge.files import atomic_write, strict_json
from chatforge.serve.store import DEFAULT_DB_URL, Store, StoreError, database_url

#: An exported answer: its text, or (when it used tools) the OpenAI messages it is made of.
Response = str | list[dict[str, Any]]


@dataclass
class ExportStats:
    records: int = 0  # preference records written
    from_comparisons: int = 0
    from_thumbs: int = 0
    comparisons: int = 0  # comparisons in the database
    rated: int = 0  # rated answers in the database
    ties: int = 0  # comparisons without a preferred answer
    identical: int = 0  # pairs whose two answers are the same text
    duplicates: int = 0  # pairs already written once
    invalid: int = 0  # pairs the preference reader would refuse (an empty turn, ...)


def preference_records(store: Store) -> tuple[list[dict[str, Any]], ExportStats]:
    """The preference records the store's comparisons and thumbs make, comparisons first."""
    stats = ExportStats()
    records: list[dict[str, Any]] = []
    seen: set[str] = set()

    def keep(prompt: list[dict], chosen: Response, rejected: Response, tools: list[dict] | None,
             extra: dict[str, Any]) -> bool:
        if chosen == rejected:
            stats.identical += 1
            return False
        if not _valid(prompt, chosen, rejected, tools):
            stats.invalid += 1
            return False
        key = json.dumps([prompt, chosen, rejected, tools], sort_keys=True)
        if key in seen:
            stats.duplicates += 1
            return False
        seen.add(key)
        record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if tools:
            record["tools"] = tools
        records.append({**record, **extra})
        return True

    comparisons = store.list_comparisons()
    stats.comparisons = len(comparisons)
    for c in comparisons:
        if c["choice"] not in ("a", "b"):
            stats.ties += 1
            continue
        a = response_messages(c["answer_a"], c.get("tool_turns_a"))
        b = response_messages(c["answer_b"], c.get("tool_turns_b"))
        chosen, rejected = (a, b) if c["choice"] == "a" else (b, a)
        tools = record_tools(c.get("tools"), [c.get("tool_turns_a"), c.get("tool_turns_b")])
        if keep(c["prompt"], chosen, rejected, tools, {"source": "comparison", "comparison_id": c["id"]}):
            stats.from_comparisons += 1

    rated = store.rated_answers()
    stats.rated = len(rated)
    groups: dict[str, dict[str, Any]] = defaultdict(lambda: {"up": [], "down": []})
    for answer in rated:
        # one prompt: the same messages and the same declared functions (the system turn shows them)
        group = groups[json.dumps([answer["prompt"], answer.get("tools")], sort_keys=True)]
        group["prompt"] = answer["prompt"]
        group["up" if answer["rating"] > 0 else "down"].append(answer)
    for group in groups.values():
        for good in group["up"]:
            for bad in group["down"]:
                extra = {"source": "thumbs", "message_ids": [good["message_id"], bad["message_id"]]}
                tools = record_tools(good.get("tools"), [good.get("tool_turns"), bad.get("tool_turns")])
                if keep(group["prompt"], response_messages(good["content"], good.get("tool_turns")),
                        response_messages(bad["content"], bad.get("tool_turns")), tools, extra):
                    stats.from_thumbs += 1
    stats.records = len(records)
    return records, stats


def response_messages(content: str, tool_turns: list[dict] | None) -> Response:
    """An answer as exported: its text when it used no tools, else the OpenAI messages it is made of.

    `tool_turns` are the store's (``function``, ``content``, ``at``: characters of `content` written
    before the call, ``round``); the calls of one round share one assistant message, their results
    follow as ``tool`` messages, and the text after the last round ends the list (left out when blank).
    Call ids are ``call_1``, ``call_2``, … in order."""
    if not tool_turns:
        return content
    rounds: list[list[dict]] = []
    for turn in tool_turns:
        if rounds and rounds[-1][0].get("round", 0) == turn.get("round", 0) and rounds[-1][0]["at"] == turn["at"]:
            rounds[-1].append(turn)
        else:
            rounds.append([turn])
    messages: list[dict[str, Any]] = []
    done, number = 0, 0
    for turns in rounds:
        at = max(done, turns[0]["at"])
        before, done = content[done:at], at
        calls, results = [], []
        for turn in turns:
            number += 1
            call_id = f"call_{number}"
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": turn["function"]["name"], "arguments": turn["function"]["arguments"]}})
            results.append({"role": "tool", "tool_call_id": call_id, "content": turn["content"]})
        messages.append({"role": "assistant", "content": before if before.strip() else "", "tool_calls": calls})
        messages.extend(results)
    rest = content[done:]
    if rest.strip():
        messages.append({"role": "assistant", "content": rest})
    return messages


def record_tools(declared: list[dict] | None, tool_turns: list[list[dict] | None]) -> list[dict] | None:
    """A record's top-level ``tools`` in OpenAI's form: the functions declared when its answers were
    made; when none were recorded but an answer called some, the built-in tools (what a server with
    ``--builtin-tools`` shows), plus a bare ``{"name"}`` for any other name called. None: no tools."""
    functions = [dict(f) for f in declared or []]
    called = [t["function"]["name"] for turns in tool_turns for t in turns or []]
    if called and not functions:
        from chatforge.tools import builtin_tools

        functions = [t.spec() for t in builtin_tools().values()]
    names = {f.get("name") for f in functions}
    for name in called:
        if name not in names:
            functions.append({"name": name})
            names.add(name)
    return [{"type": "function", "function": f} for f in functions] or None


def _valid(prompt: list[dict], chosen: Response, rejected: Response, tools: list[dict] | None = None) -> bool:
    """Whether the preference reader accepts the record: the prompt by its own parser, an answer with
    tool turns as a conversation (prompt, then the answer's messages) the chat template can render, ending
    with an assistant message (an answer that stopped right after a tool result is refused)."""
    from chatforge.chat import Conversation
    from chatforge.data.chat_readers import prompt_messages

    try:
        messages = prompt_messages(prompt, "export")
        for response in (chosen, rejected):
            if isinstance(response, str):
                if not response.strip():
                    return False
            elif response[-1]["role"] != "assistant":  # ends on a tool result: nothing the model wrote to judge
                return False
            else:
                Conversation.from_openai(list(prompt) + response, "export", tools=tools)
    except DataError:
        return False
    return messages[-1].role == "user"


def export_preferences(db: str | Path, out: str | Path) -> ExportStats:
    """Write the preference records of database `db` to the JSON Lines file `out`, atomically.

    Raises DataError when there is nothing to write (the file `out` is then left as it was).
    """
    url = database_url(db)
    _require_database(url)
    store = None
    try:
        store = Store(url, create=False)  # adds the columns an older database lacks
        records, stats = preference_records(store)
    except StoreError:
        raise
    except Exception as e:  # not a chatforge database: missing tables, wrong schema
        raise DataError(f"{_display(url)}: cannot read feedback ({type(e).__name__}: {e}); expected a database "
                        "written by `chatforge serve`") from e
    finally:
        if store is not None:
            store.close()
    if not records:
        raise DataError(f"{_display(url)}: no preference pairs to export ({stats.comparisons} comparisons, "
                        f"{stats.ties} ties, {stats.rated} rated answers, {stats.identical} identical pairs); "
                        "expected a comparison with a choice, or a thumbs-up and a thumbs-down answer to one prompt")
    atomic_write(out, lambda f: f.writelines(strict_json(r, ensure_ascii=False) + "\n" for r in records))
    return stats


def _require_database(url: str) -> None:
    """A SQLite file that is not there is a typo, not an empty database: say so instead of making one."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    in_file = parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
    if in_file and not Path(parsed.database).expanduser().is_file():
        raise DataError(f"{parsed.database}: no such database file; expected the --db the server wrote to")


def _display(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@click.group()
def feedback() -> None:
    """Turn the web chat's ratings and comparisons into preference data."""


@feedback.command("export")
@click.option("--db", default=DEFAULT_DB_URL, show_default=True,
              help="The server's database: a SQLAlchemy URL or a SQLite file path (`chatforge serve` and "
                   "`chatforge demo` keep it in the run directory, e.g. runs/demo/chatforge.db, and name it "
                   "when they start).")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help='JSON Lines file of {"prompt", "chosen", "rejected"} records (for `chatforge reward --data`).')
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def feedback_export(db: str, out: str, as_json: bool) -> None:
    """Export comparisons and thumbs-up/thumbs-down pairs as preference records."""
    stats = export_preferences(db, out)
    if as_json:
        click.echo(json.dumps(asdict(stats)))
        return
    skipped = ", ".join(f"{n} {what}" for n, what in ((stats.ties, "ties"), (stats.identical, "identical"),
                                                        (stats.duplicates, "duplicates"), (stats.invalid, "invalid"))
                        if n)
    records = f"{stats.records} preference record{'' if stats.records == 1 else 's'}"
    click.echo(f"feedback: {records} ({stats.from_comparisons} from comparisons, {stats.from_thumbs} from thumbs)"
               f"{f'; skipped {skipped}' if skipped else ''} -> {out}")
