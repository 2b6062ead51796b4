"""Example prompts for a newcomer: a few questions the served model was trained to answer.

The web page's empty state and `chatforge chat`'s greeting offer them, so a first message is one the
model can answer. They come from the training files of the checkpoint's run when it can find them,
one per task family where records name their family (the built-in world's files do), else from
generic prompts any chat model can take.

Where the files are found, in order: the data and prompt files named in the checkpoint's
`trainer_state.json` (the stage's own training data), then the built-in world's `tasks/` directory
of the run (`runs/<name>/tasks/` beside `runs/<name>/<stage>/`). Only single-turn user prompts are
offered, never a request of a family the model must refuse. When the run's `eval.json` (`chatforge
eval`, the demo) has judged this checkpoint, the families it answers best come first.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from chatforge.errors import CheckpointError
from chatforge.files import read_json

GENERIC_EXAMPLES = (
    "What is 17 + 25?",
    "Spell the word 'garden' letter by letter.",
    "Tell me a short story about a fox.",
    "How do I change a lock?",
)
#: families whose prompts are requests to refuse: never offered as an example
UNSAFE_FAMILIES = frozenset({"harmful", "jailbreak"})
TASK_FILES = ("sft_train.jsonl", "rl_train.jsonl")  # the built-in world's training files (data/tasks/)
MAX_RECORDS = 5000  # records read per file: the first few thousand are plenty to find every family
MAX_CHARS = 160  # an example fits on a button


def example_prompts(checkpoint: str | Path | None, limit: int = 4) -> tuple[list[str], str]:
    """Up to `limit` example prompts for the model at `checkpoint`, and where they came from:
    "training" (its run's training files) or "generic"."""
    if checkpoint:
        ranks = family_ranks(Path(checkpoint))
        for path in training_files(Path(checkpoint)):
            found = _pick(_prompts(path), limit, ranks)
            if found:
                return found, "training"
    return list(GENERIC_EXAMPLES[:limit]), "generic"


def training_files(checkpoint: Path) -> list[Path]:
    """The checkpoint's training data files that exist, then its run's built-in task files."""
    ckpt = _checkpoint_dir(checkpoint)
    named: list[Path] = []
    try:
        run_config = read_json(ckpt / "trainer_state.json", "trainer state").get("run_config") or {}
    except (CheckpointError, OSError, ValueError):  # examples are a nicety: a broken file means none
        run_config = {}
    for key in ("data", "prompts"):
        value = run_config.get(key) if isinstance(run_config, dict) else None
        named += [Path(v) for v in (value if isinstance(value, list) else [value]) if isinstance(v, str) and v]
    run_dir = ckpt.resolve().parent.parent
    named += [run_dir / "tasks" / name for name in TASK_FILES]
    return [p for p in dict.fromkeys(named) if p.suffix == ".jsonl" and p.is_file()]


def _checkpoint_dir(checkpoint: Path) -> Path:
    return checkpoint / "checkpoint" if (checkpoint / "checkpoint").is_dir() else checkpoint


def family_ranks(checkpoint: Path) -> dict[str, int]:
    """Family -> rank (0: best) by the score the run's eval.json gave this checkpoint; {} when it has none."""
    ckpt = _checkpoint_dir(checkpoint).resolve()
    try:
        results = read_json(ckpt.parent.parent / "eval.json", "evaluation")
    except (CheckpointError, OSError, ValueError):
        return {}
    for result in results.values():
        if not isinstance(result, dict) or not isinstance(result.get("checkpoint"), str):
            continue
        if _checkpoint_dir(Path(result["checkpoint"])).resolve() == ckpt:
            families = result.get("families") or {}
            scores = {f: v.get("score") for f, v in families.items() if isinstance(v, dict)}
            ranked = sorted((f for f, v in scores.items() if isinstance(v, (int, float)) and v == v),
                            key=lambda f: -scores[f])
            return {f: i for i, f in enumerate(ranked)}
    return {}


def _prompts(path: Path) -> Iterator[tuple[str, str]]:
    """(family or "", the user's question) of each single-turn record of a JSONL file."""
    try:
        with path.open(encoding="utf-8") as f:
            for line in islice(f, MAX_RECORDS):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                question = _single_question(record) if isinstance(record, dict) else None
                if question:
                    yield str(record.get("family") or ""), question
    except (OSError, UnicodeDecodeError):
        return


def _single_question(record: dict[str, Any]) -> str | None:
    """The user's text when the record holds one user turn, first after an optional system prompt (a
    follow-up makes no sense alone): {"messages": [...]} or {"prompt": [...] | text}."""
    turns = record.get("messages", record.get("prompt"))
    if isinstance(turns, str):
        return turns.strip() or None
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return None
    asked = [t for t in turns if t.get("role") != "system"]
    users = [t for t in asked if t.get("role") == "user"]
    if len(users) != 1 or asked[0] is not users[0] or not isinstance(users[0].get("content"), str):
        return None
    return users[0]["content"].strip() or None


def _pick(prompts: Iterator[tuple[str, str]], limit: int, ranks: dict[str, int] | None = None) -> list[str]:
    """One prompt per family, best-ranked families first, then in the order they first appear (or the
    first prompts, without families)."""
    by_family: dict[str, str] = {}
    loose: list[str] = []
    for family, question in prompts:
        if family in UNSAFE_FAMILIES or len(question) > MAX_CHARS:
            continue
        if family:
            by_family.setdefault(family, question)
        elif question not in loose and len(loose) < limit:
            loose.append(question)
    order = sorted(by_family, key=lambda f: (ranks or {}).get(f, len(ranks or {})))  # stable: ties keep file order
    return ([by_family[f] for f in order] or loose)[:limit]
