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

    def keep(prompt: list[dict], chosen: str, rejected: str, extra: dict[str, Any]) -> bool:
        if chosen == rejected:
            stats.identical += 1
            return False
        if not _valid(prompt, chosen, rejected):
            stats.invalid += 1
            return False
        key = json.dumps([prompt, chosen, rejected], sort_keys=True)
        if key in seen:
            stats.duplicates += 1
            return False
        seen.add(key)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra})
        return True

    comparisons = store.list_comparisons()
    stats.comparisons = len(comparisons)
    for c in comparisons:
        if c["choice"] not in ("a", "b"):
            stats.ties += 1
            continue
        chosen, rejected = (c["answer_a"], c["answer_b"]) if c["choice"] == "a" else (c["answer_b"], c["answer_a"])
        if keep(c["prompt"], chosen, rejected, {"source": "comparison", "comparison_id": c["id"]}):
            stats.from_comparisons += 1

    rated = store.rated_answers()
    stats.rated = len(rated)
    groups: dict[str, dict[str, Any]] = defaultdict(lambda: {"up": [], "down": []})
    for answer in rated:
        group = groups[json.dumps(answer["prompt"], sort_keys=True)]
        group["prompt"] = answer["prompt"]
        group["up" if answer["rating"] > 0 else "down"].append(answer)
    for group in groups.values():
        for good in group["up"]:
            for bad in group["down"]:
                extra = {"source": "thumbs", "message_ids": [good["message_id"], bad["message_id"]]}
                if keep(group["prompt"], good["content"], bad["content"], extra):
                    stats.from_thumbs += 1
    stats.records = len(records)
    return records, stats


def _valid(prompt: list[dict], chosen: str, rejected: str) -> bool:
    """Whether `read_preferences` accepts the record (checked by its own parser)."""
    from chatforge.data.chat_readers import prompt_messages

    if not chosen.strip() or not rejected.strip():
        return False
    try:
        messages = prompt_messages(prompt, "export")
    except DataError:
        return False
    return messages[-1].role == "user"


def export_preferences(db: str | Path, out: str | Path) -> ExportStats:
    """Write the preference records of database `db` to the JSON Lines file `out`, atomically.

    Raises DataError when there is nothing to write (the file `out` is then left as it was).
    """
    url = database_url(db)
    _require_database(url)
    store = Store(url, create=False)
    try:
        records, stats = preference_records(store)
    except StoreError:
        raise
    except Exception as e:  # not a chatforge database: missing tables, wrong schema
        raise DataError(f"{_display(url)}: cannot read feedback ({type(e).__name__}: {e}); expected a database "
                        "written by `chatforge serve`") from e
    finally:
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
