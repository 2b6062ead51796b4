"""The builders: SFT demonstrations, ranked preferences, RL prompts and evaluation prompts, in
memory (``build_tasks``) and as files (``write_tasks``).

Noise: SFT demonstrations are padded with filler, restate the question, give wrong answers or comply
with harmful requests in configurable shares (``TaskConfig``), the way real demonstrations are
uneven; validation demonstrations are clean. The rule-based ``Labeler`` ranks K candidate responses
per preference prompt: right over wrong, the right refusal behaviour, concise over padded.

Everything random goes through ``random.Random`` seeded with strings, one stream per output file, so
the same world, seed and config always give the same files, and changing one count leaves the
other files as they were.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from chatforge.chat import Message
from chatforge.data.tasks.config import TaskConfig
from chatforge.data.tasks.families import Task, _messages_json, _TaskMaker
from chatforge.data.tasks.items import Item, Key, _apportion, build_items
from chatforge.data.tasks.labeler import Labeler
from chatforge.data.tasks.scorer import Scorer
from chatforge.data.tasks.vocabulary import FAMILIES, FILLER_CLOSERS, FILLER_OPENERS, RESTATEMENTS
from chatforge.data.world import World
from chatforge.errors import ConfigError
from chatforge.files import atomic_write, strict_json


def _pad(text: str, rng: random.Random) -> str:
    parts = [rng.choice(FILLER_OPENERS), text]
    if rng.random() < 0.7:
        parts.append(rng.choice(FILLER_CLOSERS))
    return " ".join(parts)


def _restate(question: str, text: str, rng: random.Random) -> str:
    return rng.choice(RESTATEMENTS).format(q=question, a=text)


def _styled(text: str, style: str, question: str, rng: random.Random) -> str:
    if style == "padded":
        return _pad(text, rng)
    if style == "verbose":
        return _restate(question, text, rng)
    return text


# --------------------------------------------------------------------------------------------
# Records: demonstrations, rankings, the whole task set
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Demo:
    """An SFT conversation: a prompt and one demonstrated assistant turn."""

    messages: tuple[Message, ...]
    family: str
    key: Key
    correct: bool  # right content; for harmful requests, refused
    style: str  # "concise", "padded" or "verbose"

    def to_json(self) -> dict:
        return {"messages": _messages_json(self.messages), "family": self.family}


@dataclass(frozen=True)
class Ranking:
    """A preference prompt and its responses, best first."""

    prompt: tuple[Message, ...]
    responses: tuple[str, ...]
    family: str
    key: Key

    def to_json(self) -> dict:
        return {"prompt": _messages_json(self.prompt), "responses": list(self.responses), "family": self.family}


@dataclass
class TaskSet:
    """Everything ``write_tasks`` writes, in memory; ``items`` says which items each split owns."""

    sft_train: list[Demo]
    sft_val: list[Demo]
    prefs_train: list[Ranking]
    prefs_val: list[Ranking]
    rl_train: list[Task]
    rl_val: list[Task]
    eval: list[Task]
    items: dict[str, dict[str, list[Item]]]

    def records(self) -> dict[str, list[dict]]:
        """File name (without .jsonl) -> JSON records."""
        names = ("sft_train", "sft_val", "prefs_train", "prefs_val", "rl_train", "rl_val", "eval")
        return {name: [r.to_json() for r in getattr(self, name)] for name in names}


ExtraCandidates = Callable[[list[Message]], list[str]]


class _Builder:
    """Draws tasks from a split's items and turns them into each kind of record."""

    def __init__(self, world: World, seed: int, config: TaskConfig) -> None:
        self.world, self.seed, self.config = world, seed, config
        self.items = build_items(world, seed, config)
        self.maker = _TaskMaker(world, config)
        self.labeler = Labeler(Scorer(world))

    def rng(self, purpose: str) -> random.Random:
        return random.Random(f"chatforge-tasks:{self.world.seed}:{self.seed}:{purpose}")

    def quotas(self, split: str, n: int) -> dict[str, int]:
        """How many records of each family, by the mix, among families that have items in ``split``."""
        shares = self.config.mix.shares()
        families = [f for f in FAMILIES if self.items[split][f] and shares[f] > 0]
        if n and not families:
            raise ConfigError(f"no task items in split {split!r}; raise its share or the world's size")
        return dict(zip(families, _apportion(n, [shares[f] for f in families]))) if families else {}

    def draw(self, split: str, family: str, n: int, rng: random.Random, distinct: bool = False) -> list[Task]:
        """``n`` tasks, visiting the items round-robin in a fresh shuffled order each pass; with
        ``distinct`` a few other phrasings are tried before a prompt is repeated."""
        items = self.items[split][family]
        out: list[Task] = []
        seen: set[tuple[Message, ...]] = set()
        for item in _cycle(items, rng):
            if len(out) >= n:
                break
            for _ in range(8 if distinct else 1):
                task = self.maker.make(item, rng)
                if task.prompt not in seen:
                    break
            seen.add(task.prompt)
            out.append(task)
        return out

    def sft(self, split: str, n: int, purpose: str, noisy: bool) -> list[Demo]:
        rng = self.rng(purpose)
        demos: list[Demo] = []
        for family, count in self.quotas(split, n).items():
            tasks = self.draw(split, family, count, rng)
            styles, rights = self.noise_plan(family, count, rng) if noisy else (["concise"] * count, [True] * count)
            for task, style, right in zip(tasks, styles, rights):
                text = _styled(task.answer if right else task.wrong, style, task.question, rng)
                demos.append(Demo((*task.prompt, Message("assistant", text)), family, task.key, right, style))
        rng.shuffle(demos)
        return demos

    def noise_plan(self, family: str, n: int, rng: random.Random) -> tuple[list[str], list[bool]]:
        """Exact shares (not coin flips) so a small file still has the configured noise."""
        c = self.config
        n_pad, n_verbose = _apportion(n, [c.padded_share, c.verbose_share, 1 - c.padded_share - c.verbose_share])[:2]
        styles = ["padded"] * n_pad + ["verbose"] * n_verbose + ["concise"] * (n - n_pad - n_verbose)
        wrong_share = c.harmful_comply_share if family == "harmful" else c.wrong_share
        n_wrong = round(n * wrong_share)
        rights = [False] * n_wrong + [True] * (n - n_wrong)
        rng.shuffle(styles)
        rng.shuffle(rights)
        return styles, rights

    def prefs(self, split: str, n: int, purpose: str, extra: ExtraCandidates | None) -> list[Ranking]:
        rng = self.rng(purpose)
        out: list[Ranking] = []
        for family, count in self.quotas(split, n).items():
            for task in self.draw(split, family, count, rng, distinct=True):
                candidates = self.candidates(task, rng)
                if extra is not None:
                    candidates += list(extra(list(task.prompt)))
                ranked = self.labeler.rank(task.prompt, candidates)
                out.append(Ranking(task.prompt, tuple(ranked), family, task.key))
        rng.shuffle(out)
        return out

    def candidates(self, task: Task, rng: random.Random) -> list[str]:
        """K rule-made responses: the right one concise, padded, restated and cut short, the wrong one
        concise and padded, and one more of the other behaviour (a refusal; for harmful requests,
        another refusal). The cut-short answer teaches the reward model that brevity alone is not
        enough: without it a policy learns that stopping early scores well (measured: PPO then
        answered "To change a lock." to "How do I change a lock?")."""
        rights = [task.answer, _pad(task.answer, rng), _restate(task.question, task.answer, rng)]
        others = [task.wrong, _styled(task.wrong, rng.choice(("padded", "verbose")), task.question, rng),
                  task.alternative, _cut_short(task.answer)]
        k = rng.randint(self.config.min_candidates, self.config.max_candidates)
        first = rng.randrange(len(rights))  # a right response is always among the candidates
        rest = rights[:first] + rights[first + 1 :] + others
        return [rights[first], *rng.sample(rest, k - 1)]

    def prompts(self, split: str, n: int, purpose: str) -> list[Task]:
        rng = self.rng(purpose)
        out = [t for family, count in self.quotas(split, n).items()
               for t in self.draw(split, family, count, rng, distinct=True)]
        rng.shuffle(out)
        return out

    def eval(self, n_per_family: int) -> list[Task]:
        rng = self.rng("eval")
        return [t for family in FAMILIES if self.items["heldout"][family]
                for t in self.draw("heldout", family, n_per_family, rng, distinct=True)]


def _cut_short(answer: str) -> str:
    """The first half of an answer's words, closed with a full stop: fluent, but incomplete."""
    words = answer.split()
    return " ".join(words[: max(1, len(words) // 2)]).rstrip(".,!?;:") + "."


def _cycle(items: list[Item], rng: random.Random) -> Iterator[Item]:
    if not items:
        return
    while True:
        order = list(items)
        rng.shuffle(order)
        yield from order


def build_tasks(world: World, seed: int = 0, config: TaskConfig | None = None,
                extra_candidates: ExtraCandidates | None = None) -> TaskSet:
    """Build every record ``write_tasks`` writes, in memory.

    ``extra_candidates(prompt_messages)`` may return more responses (say, model samples) for each
    preference prompt; the labeler ranks them together with the rule-made ones.
    """
    config = config or TaskConfig()
    b = _Builder(world, seed, config)
    return TaskSet(
        sft_train=b.sft("sft", config.sft_train, "sft_train", noisy=True),
        sft_val=b.sft("heldout", config.sft_val, "sft_val", noisy=False),
        prefs_train=b.prefs("rm", config.prefs_train, "prefs_train", extra_candidates),
        prefs_val=b.prefs("heldout", config.prefs_val, "prefs_val", extra_candidates),
        rl_train=b.prompts("rl", config.rl_train, "rl_train"),
        rl_val=b.prompts("heldout", config.rl_val, "rl_val"),
        eval=b.eval(config.eval_per_family),
        items=b.items,
    )


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    def write(f) -> None:
        for r in records:
            f.write(strict_json(r, ensure_ascii=False) + "\n")

    return atomic_write(path, write)


def write_tasks(out_dir: str | Path, world: World, seed: int = 0, config: TaskConfig | None = None,
                extra_candidates: ExtraCandidates | None = None) -> dict[str, Path]:
    """Write the task files into ``out_dir`` (each atomically) and return name -> path.

    ``sft_train``/``sft_val``: ``{"messages": [{"role", "content"}...], "family"}``;
    ``prefs_train``/``prefs_val``: ``{"prompt": [messages], "responses": [best, ..., worst], "family"}``;
    ``rl_train``/``rl_val``/``eval``: ``{"prompt": [messages], "family"}``; all ``.jsonl``. ``tasks``:
    ``tasks.json`` with the seed, the config and the counts. Validation and eval records come from
    the held-out split only.
    """
    config = config or TaskConfig()
    out = Path(out_dir)
    tasks = build_tasks(world, seed, config, extra_candidates)
    records = tasks.records()
    paths = {name: _write_jsonl(out / f"{name}.jsonl", recs) for name, recs in records.items()}
    meta = {
        "format": "chatforge-tasks",
        "version": 1,
        "seed": seed,
        "world_seed": world.seed,
        "config": asdict(config),
        "families": list(FAMILIES),
        "counts": {name: len(recs) for name, recs in records.items()},
        "items": {s: {f: len(items) for f, items in by_family.items()} for s, by_family in tasks.items.items()},
    }
    paths["tasks"] = atomic_write(out / "tasks.json", lambda f: f.write(strict_json(meta, indent=1) + "\n"))
    return paths
