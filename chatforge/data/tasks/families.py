"""Tasks: prompts with their rule-made responses. One maker per family turns an item into a prompt
in a random phrasing, with the concise right answer, a concise wrong one and a response of the
other behaviour (a refusal; for harmful requests, a compliance and a second refusal)."""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass

from chatforge.chat import Message
from chatforge.data.tasks.answers import _apply, _arithmetic_answer, _harmless_answer, _times, _word_answer
from chatforge.data.tasks.config import TaskConfig
from chatforge.data.tasks.items import Item, Key
from chatforge.data.tasks.text import _capitalize
from chatforge.data.tasks.vocabulary import COMPLIANCES, HARMLESS_ACTS, REFUSALS, SYSTEM_PROMPTS
from chatforge.data.world import (
    ARITHMETIC_QUESTIONS,
    ATTRIBUTES,
    PRONOUNS,
    WORD_GAME_QUESTIONS,
    WORD_GAME_STATEMENTS,
    World,
    number_to_words,
)


@dataclass(frozen=True)
class Task:
    """One prompt (ending with a user turn) and the concise responses the generators build on."""

    family: str
    key: Key
    prompt: tuple[Message, ...]
    answer: str  # the concise right response (a refusal for harmful requests)
    wrong: str  # a concise wrong one (compliance for harmful requests)
    alternative: str  # another response of the wrong behaviour kind: a refusal, or a second refusal if harmful
    related: tuple[Key, ...] = ()  # other items the prompt reveals (a follow-up's first turn)

    @property
    def question(self) -> str:
        return self.prompt[-1].content

    def to_json(self) -> dict:
        return {"prompt": _messages_json(self.prompt), "family": self.family}


def _messages_json(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


class _TaskMaker:
    """Turns an item into a task with a random phrasing, drawing from the caller's RNG."""

    def __init__(self, world: World, config: TaskConfig) -> None:
        self.world = world
        self.config = config

    def make(self, item: Item, rng: random.Random) -> Task:
        task = getattr(self, f"_{item.family}")(item, rng)
        if rng.random() < self.config.system_prompt_share:
            task = Task(task.family, task.key, (Message("system", rng.choice(SYSTEM_PROMPTS)), *task.prompt),
                        task.answer, task.wrong, task.alternative, task.related)
        return task

    def _wrong_value(self, subject: str, attribute: str, rng: random.Random) -> str:
        right = self.world.lookup(subject, attribute)
        pool = [v for v in self.world.values_of(attribute) if v not in (right, subject)]
        if ATTRIBUTES[attribute].value_kind == "number" or not pool:  # off by a few years
            return str(int(right) + rng.choice((-3, -2, -1, 1, 2, 3))) if right.isdigit() else rng.choice(pool)
        return rng.choice(pool)

    def _fact_parts(self, subject: str, attribute: str, rng: random.Random) -> tuple[str, str]:
        attr = ATTRIBUTES[attribute]
        return attr.answer(subject, self.world.lookup(subject, attribute)), attr.answer(
            subject, self._wrong_value(subject, attribute, rng))

    def _facts(self, item: Item, rng: random.Random) -> Task:
        _, subject, attribute = item.key
        attr = ATTRIBUTES[attribute]
        answer, wrong = self._fact_parts(subject, attribute, rng)
        prompt = (Message("user", attr.question(subject, rng.randrange(len(attr.questions)))),)
        return Task("facts", item.key, prompt, answer, wrong, rng.choice(REFUSALS))

    def _followup(self, item: Item, rng: random.Random) -> Task:
        _, subject, attribute = item.key
        first = ATTRIBUTES[rng.choice(item.partners)]
        entity = self.world.entity(subject)
        pron, poss, _ = PRONOUNS[entity.pronoun]
        prompt = (Message("user", first.question(subject, rng.randrange(len(first.questions)))),
                  Message("assistant", first.answer(subject, entity.attributes[first.name])),
                  Message("user", rng.choice(ATTRIBUTES[attribute].followups).format(pron=pron, poss=poss)))
        answer, wrong = self._fact_parts(subject, attribute, rng)
        return Task("followup", item.key, prompt, answer, wrong, rng.choice(REFUSALS),
                    (("fact", subject, first.name),))

    def _arithmetic(self, item: Item, rng: random.Random) -> Task:
        _, op, a_text, b_text = item.key
        a, b = int(a_text), int(b_text)
        words = rng.random() < self.config.arithmetic_words_share
        say = number_to_words if words else str
        question = _capitalize(rng.choice(ARITHMETIC_QUESTIONS[op]).format(a=say(a), b=say(b)))
        c = _apply(op, a, b)
        off = rng.choice([d for d in (-10, -2, -1, 1, 2, 10, 100) if 0 <= c + d <= 999])
        return Task("arithmetic", item.key, (Message("user", question),), _arithmetic_answer(op, a, b, words),
                    _arithmetic_answer(op, a, b, words, c + off), rng.choice(REFUSALS))

    def _words(self, item: Item, rng: random.Random) -> Task:
        _, task, word = item.key
        letter = ""
        if task == "count":  # usually a letter the word has, sometimes one it lacks (answer 0)
            absent = [c for c in string.ascii_lowercase if c not in word]
            letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(absent)
        question = _capitalize(rng.choice(WORD_GAME_QUESTIONS[task]).format(w=word, c=letter))
        return Task("words", item.key, (Message("user", question),), _word_answer(task, word, letter),
                    self._wrong_word_answer(task, word, letter, rng), rng.choice(REFUSALS))

    @staticmethod
    def _wrong_word_answer(task: str, word: str, letter: str, rng: random.Random) -> str:
        if task == "count":
            n = word.count(letter)
            x = _times(n + rng.choice((-1, 1)) if n > 0 else 1)
            return _capitalize(WORD_GAME_STATEMENTS["count"][0].format(w=word, c=letter, x=x))
        target = word[::-1] if task == "reverse" else word
        i = rng.randrange(len(target) - 1)
        swapped = target[:i] + target[i + 1] + target[i] + target[i + 2:]
        # Swapping two equal letters changes nothing: drop a letter instead.
        bad = swapped if swapped != target else target[:i] + target[i + 1:]
        x = bad if task == "reverse" else " ".join(bad)
        return _capitalize(WORD_GAME_STATEMENTS[task][0].format(w=word, x=x))

    def _harmful(self, item: Item, rng: random.Random) -> Task:
        _, template, act = item.key
        first, second = rng.sample(REFUSALS, 2)
        return Task("harmful", item.key, (Message("user", template.format(act=act)),), first,
                    rng.choice(COMPLIANCES).format(act=act), second)

    def _harmless(self, item: Item, rng: random.Random) -> Task:
        _, template, act = item.key
        other = rng.choice([a for a in HARMLESS_ACTS if a != act])
        # the wrong answer gives another act's steps, under this act's name or (half the time) its own:
        # a policy that answers a different request ("To make tea, ..." to "How do I bake bread?") is the
        # mistake PPO found when the rankings held only the first kind
        wrong = _harmless_answer(other if rng.random() < 0.5 else act, steps_of=other)
        return Task("harmless", item.key, (Message("user", template.format(act=act)),), _harmless_answer(act),
                    wrong, rng.choice(REFUSALS))
