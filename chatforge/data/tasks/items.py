"""Items and splits: the underlying items of every family and the split each belongs to.

Every underlying item (a fact (subject, attribute), an arithmetic (op, a, b), a word task (task,
word), a request (template, act)) belongs to exactly one of ``sft``, ``rm``, ``rl``, ``heldout``, so
no phrasing of a held-out item is ever trained on. A follow-up's earlier turns reveal other facts,
so they are always facts from the same split; a two-hop question's answer states two facts, so it is
an item only of the split that holds both (twohop.py).
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Sequence
from dataclasses import dataclass

from chatforge.data.tasks.config import TaskConfig
from chatforge.data.tasks.twohop import chains
from chatforge.data.tasks.vocabulary import (
    ALL_FAMILIES,
    HARMFUL_ACTS,
    HARMLESS_ACTS,
    JAILBREAK_WRAPPERS,
    REQUEST_TEMPLATES,
    SPLITS,
    TODAY_QUESTIONS,
    WORD_TASKS,
)
from chatforge.data.world import COLOURS, COUNTABLE_ITEMS, PETS, PRODUCTS, PROFESSIONS, World

Key = tuple[str, ...]


@dataclass(frozen=True)
class Item:
    """An underlying item: every phrasing of it lands in the split of its ``key``.

    Keys: ("fact", subject, attribute) for facts, follow-ups and functions alike, ("arithmetic", op, a,
    b) for arithmetic and calc, ("words", task, word), ("harmful"|"harmless", template, act),
    ("jailbreak", wrapper, act) and, for the harmless requests in a jailbreak's wrapper, ("harmless",
    wrapper, act) (the wrapper is one of ``JAILBREAK_WRAPPERS``; a wrapper that holds a whole request
    takes a random training template), ("dates", "weekday", date) / ("dates", "days", start, end) /
    ("dates", "today", phrasing), and ("twohop", composition, subject1, attribute1, subject2,
    attribute2), which names both of its facts. A follow-up item also lists the subject's other
    attributes in the same split (``partners``), which its earlier turns may ask about.

    The template or wrapper in a key is the training phrasing; an evaluation prompt with a held-out
    phrasing asks the same item in a held-out one (a held-out template, or a held-out wrapper of
    the same kind).
    """

    family: str
    key: Key
    partners: tuple[str, ...] = ()


def _apportion(n: int, weights: Sequence[float]) -> list[int]:
    """Split ``n`` into integer parts proportional to ``weights`` (largest remainder, ties to the first)."""
    total = sum(weights)
    raw = [n * w / total for w in weights]
    parts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: parts[i] - raw[i])[: n - sum(parts)]:
        parts[i] += 1
    return parts


def _cut(keys: list[Key], shares: dict[str, float], rng: random.Random) -> dict[Key, str]:
    keys = sorted(keys)
    rng.shuffle(keys)
    out, start = {}, 0
    for split, size in zip(SPLITS, _apportion(len(keys), [shares[s] for s in SPLITS])):
        out.update(dict.fromkeys(keys[start:start + size], split))
        start += size
    return out


def _game_words(world: World) -> list[str]:
    """The world's vocabulary, as the corpus's word games use it: pools, names and named values."""
    words = {w.lower() for w in (*PROFESSIONS, *PETS, *COLOURS, *PRODUCTS, *COUNTABLE_ITEMS)}
    words |= {e.name.lower() for e in world.entities}
    words |= {v.lower() for e in world.entities_of("country") for a, v in e.attributes.items()
              if a in ("river", "language", "currency")}
    return sorted(words)


def _wrapped_keys(family: str, acts: Sequence[str]) -> list[Key]:
    return [(family, w, a) for wrappers in JAILBREAK_WRAPPERS.values() for w in wrappers for a in acts]


def _wrapped_harmless_keys(rng: random.Random, share: float) -> list[Key]:
    """Harmless requests in jailbreak wrappers: as many as make ``share`` of all harmless items (at most all)."""
    keys = _wrapped_keys("harmless", sorted(HARMLESS_ACTS))
    plain = len(REQUEST_TEMPLATES) * len(HARMLESS_ACTS)
    return rng.sample(keys, min(len(keys), round(plain * share / (1 - share))))


def _arithmetic_keys(rng: random.Random, per_op: int) -> list[Key]:
    keys: list[Key] = []
    for op in ("plus", "minus", "times"):
        if op == "times":  # 2-digit x 1-digit: few enough to enumerate
            pairs = rng.sample([(a, b) for a in range(10, 100) for b in range(2, 10)], per_op)
        else:
            seen: dict[tuple[int, int], None] = {}
            while len(seen) < per_op:
                if op == "plus":  # 2-3 digits each, sum at most 999 so it can be said in words
                    a = rng.randint(10, 989)
                    b = rng.randint(10, 999 - a)
                else:
                    a = rng.randint(20, 999)
                    b = rng.randint(10, a)
                seen[(a, b)] = None
            pairs = list(seen)
        keys += [("arithmetic", op, str(a), str(b)) for a, b in pairs]
    return keys


DATES_PER_KIND = 400  # weekday dates and day spans in the pool
_FIRST_DAY = datetime.date(2000, 1, 1).toordinal()
_LAST_DAY = datetime.date(2039, 12, 31).toordinal()


def _date_keys(rng: random.Random) -> list[Key]:
    """Weekday questions over 2000-2039, spans of 2 to 400 days, and one item per "today" phrasing."""
    def day(ordinal: int) -> str:
        return datetime.date.fromordinal(ordinal).isoformat()

    weekdays = rng.sample(range(_FIRST_DAY, _LAST_DAY + 1), DATES_PER_KIND)
    spans: dict[tuple[int, int], None] = {}
    while len(spans) < DATES_PER_KIND:
        start = rng.randint(_FIRST_DAY, _LAST_DAY - 400)
        spans[(start, start + rng.randint(2, 400))] = None
    return ([("dates", "weekday", day(d)) for d in weekdays]
            + [("dates", "days", day(a), day(b)) for a, b in spans]
            + [("dates", "today", str(i)) for i in range(len(TODAY_QUESTIONS))])


def build_items(world: World, seed: int = 0, config: TaskConfig | None = None) -> dict[str, dict[str, list[Item]]]:
    """The items of every split and family: ``items[split][family]``, each item in exactly one split."""
    config = config or TaskConfig()
    shares = config.split_shares()

    def rng(group: str) -> random.Random:
        return random.Random(f"chatforge-tasks-items:{world.seed}:{seed}:{group}")

    fact_keys = [("fact", f.subject, f.attribute) for f in world.facts]
    words = _game_words(world)
    groups = {
        "facts": fact_keys,
        "arithmetic": _arithmetic_keys(rng("arithmetic-pool"), config.arithmetic_items_per_op),
        "words": [("words", t, w) for t in WORD_TASKS for w in words if t != "reverse" or w != w[::-1]],
        "harmful": [("harmful", t, a) for t in REQUEST_TEMPLATES for a in HARMFUL_ACTS],
        "harmless": [("harmless", t, a) for t in REQUEST_TEMPLATES for a in HARMLESS_ACTS],
        "harmless-wrapped": _wrapped_harmless_keys(rng("harmless-wrapped-pool"), config.wrapped_harmless_share),
        "jailbreak": _wrapped_keys("jailbreak", HARMFUL_ACTS),
    }
    split_of: dict[Key, str] = {}
    for group, keys in groups.items():
        split_of.update(_cut(keys, shares, rng(group)))
    date_keys = _date_keys(rng("dates-pool"))
    split_of.update(_cut(date_keys, shares, rng("dates")))
    items: dict[str, dict[str, list[Item]]] = {s: {f: [] for f in ALL_FAMILIES} for s in SPLITS}
    for group, keys in groups.items():
        family = group.removesuffix("-wrapped")
        for key in keys:
            items[split_of[key]][family].append(Item(family, key))
    for key in groups["arithmetic"]:  # the same questions, with the calculator
        items[split_of[key]]["calc"].append(Item("calc", key))
    for key in fact_keys:  # the same facts, beside declared functions
        items[split_of[key]]["functions"].append(Item("functions", key))
    for key in date_keys:
        items[split_of[key]]["dates"].append(Item("dates", key))
    for key in fact_keys:  # a follow-up's first turn reveals a fact too: only one from the same split
        _, subject, attribute = key
        partners = tuple(a for a in world.entity(subject).attributes
                         if a != attribute and split_of[("fact", subject, a)] == split_of[key])
        if partners:
            items[split_of[key]]["followup"].append(Item("followup", key, partners))
    for chain in chains(world):  # a two-hop question states two facts: only where both are in one split
        splits = {split_of[("fact", f.subject, f.attribute)] for f in (chain.first, chain.second)}
        if len(splits) == 1:
            items[splits.pop()]["twohop"].append(Item("twohop", chain.key))
    return items
