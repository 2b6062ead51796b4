"""The builders: SFT demonstrations, ranked preferences, RL prompts and evaluation prompts, in
memory (``build_tasks``) and as files (``write_tasks``).

Noise: SFT demonstrations are padded with filler, restate the question, give wrong answers or comply
with harmful requests and jailbreaks in configurable shares (``TaskConfig``), the way real
demonstrations are uneven; validation demonstrations are clean. The rule-based ``Labeler`` ranks K
candidate responses per preference prompt: right over wrong, the right refusal behaviour, concise
over padded. Where answers reason in steps (steps.py, twohop.py) the same noise applies to them:
padding and restatements wrap the whole step-by-step answer, a wrong one is a slip in one step that
the rest follows, and the cut-short candidate stops halfway (inside the steps, or after the first of
two facts), before the answer.

Phrasings: every record asks in the training phrasings except evaluation prompts, where every other
prompt of a family with held-out phrasings (``PHRASED_FAMILIES``) asks in a held-out one; each eval
record says which (``"phrasing": "train"`` or ``"heldout"``), so evaluation can report both.

Tool families (on when the mix gives them a weight) follow the same plan with their own kinds of
noise: of the right demonstrations, ``unaided_share`` (calc and dates) answer without the tool, in the
head; of the wrong ones, half misuse the tool (a wrong expression, date or argument, whose result
the answer then states; for a functions prompt no function fits, a needless call) and half are a
wrong answer without a call. Their rankings hold the right transcript, the right answer without the
tool, the wrong answer, each misuse, the padded transcript and a refusal, ranked by the labeler.
Transcripts are written as OpenAI messages, with a top-level ``"tools"`` where the prompt declares
functions (``read_conversations``, ``read_preferences`` and ``read_prompts`` read them).

Everything random goes through ``random.Random`` seeded with strings, one stream per output file, so
the same world, seed and config always give the same files, and changing one count leaves the
other files as they were.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from chatforge.chat import Conversation, Message
from chatforge.data.tasks.calls import Response, final_text, response_json, with_final
from chatforge.data.tasks.config import TaskConfig, meta_config
from chatforge.data.tasks.families import PHRASED_FAMILIES, Task, _messages_json, _TaskMaker
from chatforge.data.tasks.items import Item, Key, _apportion, build_items
from chatforge.data.tasks.labeler import Labeler
from chatforge.data.tasks.scorer import Scorer
from chatforge.data.tasks.vocabulary import (
    ALL_FAMILIES,
    FAMILIES,
    FILLER_CLOSERS,
    FILLER_OPENERS,
    PHRASINGS,
    RESTATEMENTS,
    TOOL_FAMILIES,
)
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


def _styled(response: Response, style: str, question: str, rng: random.Random) -> Response:
    """The response in a labeler's style; a transcript's final answer is what gets padded or restated."""
    text = final_text(response)
    if style == "padded":
        return with_final(response, _pad(text, rng))
    if style == "verbose":
        return with_final(response, _restate(question, text, rng))
    return response


def _messages(response: Response) -> tuple[Message, ...]:
    return (Message("assistant", response),) if isinstance(response, str) else response


def _has_tool_turns(messages: tuple[Message, ...]) -> bool:
    return any(m.role in ("tool_call", "tool_result") for m in messages)


# --------------------------------------------------------------------------------------------
# Records: demonstrations, rankings, the whole task set
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Demo:
    """An SFT conversation: a prompt and one demonstrated answer (an assistant turn, or calls, results
    and the assistant's answer)."""

    messages: tuple[Message, ...]
    family: str
    key: Key
    correct: bool  # right content (and right tool use); for harmful requests, refused
    style: str  # "concise", "padded" or "verbose"
    tools: tuple[dict[str, Any], ...] = ()  # the functions the prompt declares
    kind: str = "plain"  # tool families: "tool", "unaided", "wrong" or "misused" (see the module docstring)

    def to_json(self) -> dict:
        if not self.tools and not _has_tool_turns(self.messages):
            return {"messages": _messages_json(self.messages), "family": self.family}
        out: dict[str, Any] = {"messages": Conversation(list(self.messages)).to_openai()}
        return out | ({"tools": list(self.tools)} if self.tools else {}) | {"family": self.family}


@dataclass(frozen=True)
class Ranking:
    """A preference prompt and its responses, best first."""

    prompt: tuple[Message, ...]
    responses: tuple[Response, ...]
    family: str
    key: Key
    tools: tuple[dict[str, Any], ...] = ()  # the functions the prompt declares

    def to_json(self) -> dict:
        out = {"prompt": _messages_json(self.prompt), "responses": [response_json(r) for r in self.responses]}
        return out | ({"tools": list(self.tools)} if self.tools else {}) | {"family": self.family}


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
        self.labeler = Labeler(Scorer(world, config.today))

    def rng(self, purpose: str) -> random.Random:
        return random.Random(f"chatforge-tasks:{self.world.seed}:{self.seed}:{purpose}")

    def quotas(self, split: str, n: int) -> dict[str, int]:
        """How many records of each family, by the mix, among families that have items in ``split``."""
        shares = self.config.mix.shares()
        families = [f for f in ALL_FAMILIES if self.items[split][f] and shares[f] > 0]
        if n and not families:
            raise ConfigError(f"no task items in split {split!r}; raise its share or the world's size")
        return dict(zip(families, _apportion(n, [shares[f] for f in families]))) if families else {}

    def draw(self, split: str, family: str, n: int, rng: random.Random, distinct: bool = False,
             phrasings: list[str] | None = None) -> list[Task]:
        """``n`` tasks, visiting the items round-robin in a fresh shuffled order each pass; with
        ``distinct`` a few other phrasings are tried before a prompt is repeated. ``phrasings`` (one
        per task) asks the i-th task in that phrasing and records it; without, all are training ones."""
        items = self.items[split][family]
        out: list[Task] = []
        seen: set[tuple[Message, ...]] = set()  # (a functions prompt is the same whatever it declares)
        for item in _cycle(items, rng):
            if len(out) >= n:
                break
            phrasing = phrasings[len(out)] if phrasings else "train"
            for _ in range(8 if distinct else 1):
                task = self.maker.make(item, rng, phrasing)
                if task.prompt not in seen:
                    break
            seen.add(task.prompt)
            out.append(replace(task, phrasing=phrasing) if phrasings else task)
        return out

    def sft(self, split: str, n: int, purpose: str, noisy: bool) -> list[Demo]:
        rng = self.rng(purpose)
        demos: list[Demo] = []
        for family, count in self.quotas(split, n).items():
            tasks = self.draw(split, family, count, rng)
            styles, rights = self.noise_plan(family, count, rng) if noisy else (["concise"] * count, [True] * count)
            if family not in TOOL_FAMILIES:
                for task, style, right in zip(tasks, styles, rights):
                    text = _styled(task.answer if right else task.wrong, style, task.question, rng)
                    demos.append(Demo((*task.prompt, Message("assistant", text)), family, task.key, right, style))
                continue
            for task, style, right, kind in zip(tasks, styles, rights, self.tool_plan(family, rights, rng)):
                response = _styled(_demonstrated(task, kind), style, task.question, rng)
                demos.append(Demo((*task.prompt, *_messages(response)), family, task.key, right, style, task.tools,
                                  kind))
        rng.shuffle(demos)
        return demos

    def tool_plan(self, family: str, rights: list[bool], rng: random.Random) -> list[str]:
        """How each tool-family demonstration answers, in exact shares: of the right ones ``unaided_share``
        without the tool (calc and dates only), of the wrong ones half misusing it."""
        n_right = sum(rights)
        n_unaided = round(n_right * self.config.unaided_share) if family != "functions" else 0
        n_misused = (len(rights) - n_right) // 2
        right_kinds = ["unaided"] * n_unaided + ["tool"] * (n_right - n_unaided)
        wrong_kinds = ["misused"] * n_misused + ["wrong"] * (len(rights) - n_right - n_misused)
        rng.shuffle(right_kinds)
        rng.shuffle(wrong_kinds)
        return [right_kinds.pop() if right else wrong_kinds.pop() for right in rights]

    def noise_plan(self, family: str, n: int, rng: random.Random) -> tuple[list[str], list[bool]]:
        """Exact shares (not coin flips) so a small file still has the configured noise."""
        c = self.config
        n_pad, n_verbose = _apportion(n, [c.padded_share, c.verbose_share, 1 - c.padded_share - c.verbose_share])[:2]
        styles = ["padded"] * n_pad + ["verbose"] * n_verbose + ["concise"] * (n - n_pad - n_verbose)
        wrong_share = c.harmful_comply_share if family in ("harmful", "jailbreak") else c.wrong_share
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
                tools = family in TOOL_FAMILIES
                candidates = self.tool_candidates(task, rng) if tools else self.candidates(task, rng)
                if extra is not None:
                    candidates += list(extra(list(task.prompt)))
                prompt = Conversation(list(task.prompt), list(task.tools)) if tools else task.prompt
                ranked = self.labeler.rank(prompt, candidates, family if tools else None)
                out.append(Ranking(task.prompt, tuple(ranked), family, task.key, task.tools))
        rng.shuffle(out)
        return out

    def candidates(self, task: Task, rng: random.Random) -> list[Response]:
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

    def tool_candidates(self, task: Task, rng: random.Random) -> list[Response]:
        """K responses to a tool family's prompt: the right transcript, and K - 1 of: the right answer
        without the tool, the wrong answer, each misuse of the tool, the right transcript padded, a refusal."""
        others = [r for r in (task.unaided, task.wrong, *task.misused) if r is not None]
        others += [_styled(task.answer, "padded", task.question, rng), task.alternative]
        k = min(rng.randint(self.config.min_candidates, self.config.max_candidates), len(others) + 1)
        return [task.answer, *rng.sample(others, k - 1)]

    def prompts(self, split: str, n: int, purpose: str) -> list[Task]:
        rng = self.rng(purpose)
        out = [t for family, count in self.quotas(split, n).items()
               for t in self.draw(split, family, count, rng, distinct=True)]
        rng.shuffle(out)
        return out

    def eval(self, n_per_family: int) -> list[Task]:
        """Each family's prompts from the held-out split; of a family with held-out phrasings, every other
        one (the 2nd, 4th, ...) asked in a held-out phrasing."""
        rng = self.rng("eval")
        out: list[Task] = []
        for family in self.families():
            if self.items["heldout"][family]:
                phrasings = [PHRASINGS[i % 2 if family in PHRASED_FAMILIES else 0] for i in range(n_per_family)]
                out += self.draw("heldout", family, n_per_family, rng, distinct=True, phrasings=phrasings)
        return out

    def families(self) -> tuple[str, ...]:
        """The families written: the plain ones, and the tool families the mix turns on."""
        return FAMILIES + self.config.tool_families


def _demonstrated(task: Task, kind: str) -> Response:
    """A tool family's demonstration of one kind (``Builder.tool_plan``)."""
    if kind == "unaided" and task.unaided is not None:
        return task.unaided
    if kind == "misused":
        return task.misused[0]
    return task.wrong if kind == "wrong" else task.answer


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
        items={s: {f: b.items[s][f] for f in b.families()} for s in b.items},
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
    ``rl_train``/``rl_val``: ``{"prompt": [messages], "family"}``; ``eval``: ``{"prompt": [messages],
    "family", "phrasing"}`` (``"train"`` or ``"heldout"``); all ``.jsonl``. ``tasks``:
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
        "config": meta_config(config),
        "families": list(FAMILIES + config.tool_families),
        "counts": {name: len(recs) for name, recs in records.items()},
        "items": {s: {f: len(items) for f, items in by_family.items()} for s, by_family in tasks.items.items()},
    }
    paths["tasks"] = atomic_write(out / "tasks.json", lambda f: f.write(strict_json(meta, indent=1) + "\n"))
    return paths
