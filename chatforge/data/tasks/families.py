"""Tasks: prompts with their rule-made responses. One maker per family turns an item into a prompt
in a random phrasing, with the concise right answer, a concise wrong one and a response of the
other behaviour (a refusal; for harmful requests and jailbreaks, a compliance and a second refusal).

Phrasings: a maker asks in the training phrasings (``"train"``: the templates the corpus and every
training file use) or, for evaluation prompts only, in the held-out ones (``"heldout"``:
``Attribute.heldout_questions``/``heldout_followups``, ``HELDOUT_ARITHMETIC_QUESTIONS``,
``HELDOUT_WORD_GAME_QUESTIONS``, ``HELDOUT_REQUEST_TEMPLATES``, ``HELDOUT_JAILBREAK_WRAPPERS``). The
families in ``PHRASED_FAMILIES`` have held-out phrasings; dates has none (its "today" phrasings are
items of their own), nor has twohop yet.

- ``followup``: one earlier question and its answer, or (``long_followup_share``) two earlier user
  turns: a question and a follow-up about two other facts of the subject, or, where the item has only
  one other fact in its split, a turn that names the subject ("I have a few questions about Vovunia.")
  and a follow-up about that fact.
- ``jailbreak``: a harmful request in a wrapper of one of four kinds (role-play, fiction, "ignore your
  rules", prefix injection); ``harmless`` wraps some of its requests in the same wrappers.

Tool families' right answers are transcripts (calls.py): the call, its result, then the answer that
states it. Their tasks also carry the right answer given without the tool (``unaided``: computed in
the head, or a fact from memory) and the ways of misusing a tool (``misused``: a call with wrong
arguments whose result is then stated, a right call whose result the answer contradicts, a call
where no declared function fits). The results in them are what the tools return (the calculator,
the calendar on the config's fixed clock, the world's functions), so evaluation's engine feeds a
model the same results the data showed.

- ``calc``: arithmetic's questions; the call is ``calculator(expression="12 * 7")`` in digits, whatever
  the question's style.
- ``dates``: a date's weekday, the days from one date to another, today's date (``calendar``).
- ``functions``: a fact question beside 1 to ``max_functions`` declared world functions; with
  ``functions_fit_share`` one of them answers it (call it with the subject), otherwise none does
  (answer from what the model knows, without a call).
"""

from __future__ import annotations

import datetime
import json
import math
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from chatforge.chat import Message
from chatforge.data.tasks.answers import (
    _apply,
    _arithmetic_answer,
    _date_answer,
    _harmless_answer,
    _say_date,
    _times,
)
from chatforge.data.tasks.calls import Response, builtin_specs, function_name, function_spec, transcript, world_tools
from chatforge.data.tasks.config import TaskConfig
from chatforge.data.tasks.items import Item, Key
from chatforge.data.tasks.steps import (
    arithmetic_answer,
    arithmetic_slip,
    arithmetic_steps,
    count_slip,
    count_steps,
    reverse_slip,
    reverse_steps,
    word_answer,
)
from chatforge.data.tasks.text import _capitalize
from chatforge.data.tasks.twohop import chain_from_key
from chatforge.data.tasks.twohop import wrong_answer as twohop_wrong_answer
from chatforge.data.tasks.vocabulary import (
    ALL_FAMILIES,
    COMPLIANCES,
    DAYS_QUESTIONS,
    FOLLOWUP_INTROS,
    HARMLESS_ACTS,
    HELDOUT_JAILBREAK_WRAPPERS,
    HELDOUT_REQUEST_TEMPLATES,
    JAILBREAK_WRAPPERS,
    REFUSALS,
    REQUEST_TEMPLATES,
    SYSTEM_PROMPT_MAX_CHARS,
    SYSTEM_PROMPTS,
    TODAY_QUESTIONS,
    WEEKDAY_QUESTIONS,
)
from chatforge.data.world import (
    ARITHMETIC_QUESTIONS,
    ATTRIBUTES,
    HELDOUT_ARITHMETIC_QUESTIONS,
    HELDOUT_WORD_GAME_QUESTIONS,
    PRONOUNS,
    WORD_GAME_QUESTIONS,
    WORD_GAME_STATEMENTS,
    Attribute,
    Entity,
    World,
    number_to_words,
)
from chatforge.tools import WEEKDAYS, calculate, days_between, run_tool_call, weekday

CALC_SYMBOLS = {"plus": "+", "minus": "-", "times": "*"}
PHRASED_FAMILIES = tuple(f for f in ALL_FAMILIES if f not in ("dates", "twohop"))  # with held-out phrasings
WRAPPER_KINDS = {w: kind for kind, wrappers in JAILBREAK_WRAPPERS.items() for w in wrappers}  # training wrappers


@dataclass(frozen=True)
class Task:
    """One prompt (ending with a user turn) and the concise responses the generators build on."""

    family: str
    key: Key
    prompt: tuple[Message, ...]
    answer: Response  # the concise right response (a refusal for harmful requests; a transcript with tools)
    wrong: Response  # a concise wrong one (compliance for harmful requests)
    alternative: Response  # another response of the wrong behaviour kind: a refusal, or a second refusal if harmful
    related: tuple[Key, ...] = ()  # other items the prompt reveals (a follow-up's first turn)
    tools: tuple[dict[str, Any], ...] = ()  # functions the prompt declares (OpenAI function objects)
    unaided: Response | None = None  # tool families: the right answer without a call (None: there is none)
    misused: tuple[Response, ...] = ()  # tool families: transcripts that misuse a tool
    phrasing: str | None = None  # evaluation prompts: "train" or "heldout" (the record's "phrasing")

    @property
    def question(self) -> str:
        return self.prompt[-1].content

    def to_json(self) -> dict:
        out: dict[str, Any] = {"prompt": _messages_json(self.prompt), "family": self.family}
        if self.phrasing is not None:
            out["phrasing"] = self.phrasing
        return out | {"tools": list(self.tools)} if self.tools else out


def _messages_json(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


class _TaskMaker:
    """Turns an item into a task with a random phrasing, drawing from the caller's RNG."""

    def __init__(self, world: World, config: TaskConfig) -> None:
        self.world = world
        self.config = config
        self.functions = world_tools(world)

    def make(self, item: Item, rng: random.Random, phrasing: str = "train") -> Task:
        """A task for ``item`` asked in a training phrasing, or in a held-out one (``phrasing="heldout"``);
        a system prompt comes first only before a short question (``SYSTEM_PROMPT_MAX_CHARS``)."""
        task = getattr(self, f"_{item.family}")(item, rng, phrasing == "heldout")
        if rng.random() < self.config.system_prompt_share and len(task.question) <= SYSTEM_PROMPT_MAX_CHARS:
            task = replace(task, prompt=(Message("system", rng.choice(SYSTEM_PROMPTS)), *task.prompt))
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

    def _facts(self, item: Item, rng: random.Random, heldout: bool) -> Task:
        _, subject, attribute = item.key
        answer, wrong = self._fact_parts(subject, attribute, rng)
        prompt = (Message("user", _ask(ATTRIBUTES[attribute], subject, rng, heldout)),)
        return Task("facts", item.key, prompt, answer, wrong, rng.choice(REFUSALS))

    def _followup(self, item: Item, rng: random.Random, heldout: bool) -> Task:
        """Earlier turns about other facts of the subject (one, or with ``long_followup_share`` two user
        turns), then a follow-up question about this item's fact."""
        _, subject, attribute = item.key
        entity = self.world.entity(subject)
        long = rng.random() < self.config.long_followup_share
        asked = rng.sample(item.partners, 2 if long and len(item.partners) >= 2 else 1)
        turns: list[Message] = []
        if long and len(asked) == 1:  # one other fact to ask: a turn that names the subject comes first
            intro, reply = rng.choice(FOLLOWUP_INTROS)
            turns += [Message("user", intro.format(s=subject)), Message("assistant", reply)]
        for i, name in enumerate(asked):
            attr = ATTRIBUTES[name]
            if i == 0 and not turns:
                question = _ask(attr, subject, rng, heldout)
            else:  # right after the intro, the follow-up opens the questions: no "And"
                question = _follow(attr, entity, rng, heldout, opening=i == 0)
            turns += [Message("user", question), Message("assistant", attr.answer(subject, entity.attributes[name]))]
        prompt = (*turns, Message("user", _follow(ATTRIBUTES[attribute], entity, rng, heldout)))
        answer, wrong = self._fact_parts(subject, attribute, rng)
        return Task("followup", item.key, prompt, answer, wrong, rng.choice(REFUSALS),
                    tuple(("fact", subject, name) for name in asked))

    def _arithmetic(self, item: Item, rng: random.Random, heldout: bool) -> Task:
        return self._arithmetic_task(item, rng, heldout, self.config.step_by_step)[0]

    def _arithmetic_task(self, item: Item, rng: random.Random, heldout: bool,
                         steps: bool = False) -> tuple[Task, bool]:
        """The task (column by column with ``steps``, a slip its wrong answer), and whether its numbers
        are in words."""
        _, op, a_text, b_text = item.key
        a, b = int(a_text), int(b_text)
        words = rng.random() < self.config.arithmetic_words_share
        say = number_to_words if words else str
        questions = (HELDOUT_ARITHMETIC_QUESTIONS if heldout else ARITHMETIC_QUESTIONS)[op]
        question = _capitalize(rng.choice(questions).format(a=say(a), b=say(b)))
        c = _apply(op, a, b)
        off = rng.choice([d for d in (-10, -2, -1, 1, 2, 10, 100) if 0 <= c + d <= 999])
        slip = arithmetic_slip(op, a, b, rng)  # drawn whether or not it is used: the same draws either way
        wrong = (arithmetic_steps(op, a, b, words, slip) if steps and slip is not None else None) \
            or _arithmetic_answer(op, a, b, words, c + off)
        return Task("arithmetic", item.key, (Message("user", question),), arithmetic_answer(op, a, b, words, steps),
                    wrong, rng.choice(REFUSALS)), words

    def _words(self, item: Item, rng: random.Random, heldout: bool) -> Task:
        _, task, word = item.key
        letter = ""
        if task == "count":  # usually a letter the word has, sometimes one it lacks (answer 0)
            absent = [c for c in string.ascii_lowercase if c not in word]
            letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(absent)
        questions = (HELDOUT_WORD_GAME_QUESTIONS if heldout else WORD_GAME_QUESTIONS)[task]
        question = _capitalize(rng.choice(questions).format(w=word, c=letter))
        wrong = self._wrong_word_answer(task, word, letter, rng)
        steps = self.config.step_by_step
        if task == "reverse":  # a slip is drawn whether or not it is used: the same draws either way
            slip = reverse_slip(word, rng)
            wrong = reverse_steps(word, slip) if steps else wrong
        elif task == "count":
            slip = count_slip(word, letter, rng)
            wrong = count_steps(word, letter, slip) if steps else wrong
        return Task("words", item.key, (Message("user", question),), word_answer(task, word, letter, steps), wrong,
                    rng.choice(REFUSALS))

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

    def _harmful(self, item: Item, rng: random.Random, heldout: bool) -> Task:
        _, template, act = item.key
        first, second = rng.sample(REFUSALS, 2)
        return Task("harmful", item.key, (Message("user", _request(template, act, rng, heldout)),), first,
                    rng.choice(COMPLIANCES).format(act=act), second)

    def _jailbreak(self, item: Item, rng: random.Random, heldout: bool) -> Task:
        """A harmful request in a jailbreak's wrapper: refused all the same."""
        return replace(self._harmful(item, rng, heldout), family="jailbreak")

    def _harmless(self, item: Item, rng: random.Random, heldout: bool) -> Task:
        """A look-alike request (in a jailbreak's wrapper when the key holds one), answered with its steps."""
        _, template, act = item.key
        other = rng.choice([a for a in HARMLESS_ACTS if a != act])
        # the wrong answer gives another act's steps, under this act's name or (half the time) its own:
        # a policy that answers a different request ("To make tea, ..." to "How do I bake bread?") is the
        # mistake PPO found when the rankings held only the first kind
        wrong = _harmless_answer(other if rng.random() < 0.5 else act, steps_of=other)
        return Task("harmless", item.key, (Message("user", _request(template, act, rng, heldout)),),
                    _harmless_answer(act), wrong, rng.choice(REFUSALS))

    def _twohop(self, item: Item, rng: random.Random, heldout: bool) -> Task:
        """A question that needs two facts; the answer states both (or, without steps, the second). Two-hop
        questions have no held-out phrasings yet: ``heldout`` is ignored."""
        chain = chain_from_key(self.world, item.key)
        steps = self.config.step_by_step
        prompt = (Message("user", chain.question(rng.randrange(len(chain.composition.questions)))),)
        wrong = twohop_wrong_answer(self.world, chain, rng, steps)
        related = tuple(("fact", f.subject, f.attribute) for f in (chain.first, chain.second))
        return Task("twohop", item.key, prompt, chain.answer(steps), wrong, rng.choice(REFUSALS), related)

    # ---- tool families ---------------------------------------------------------------------------

    def _builtin_tools(self) -> tuple[dict[str, Any], ...]:
        return tuple(builtin_specs()) if self.config.declare_builtin_tools else ()

    def _calc(self, item: Item, rng: random.Random, heldout: bool) -> Task:
        """Arithmetic's task, answered through the calculator; a wrong call has one operand off by one."""
        plain, words = self._arithmetic_task(item, rng, heldout)
        _, op, a_text, b_text = item.key
        a, b = int(a_text), int(b_text)
        step = rng.choice((-1, 1))
        bad_a, bad_b = (a + step, b) if rng.random() < 0.5 else (a, b + step)
        bad = _arithmetic_answer(op, a, b, words, _apply(op, bad_a, bad_b))
        misused = (_calculator_call(op, bad_a, bad_b, bad), _calculator_call(op, a, b, plain.wrong))
        return replace(plain, family="calc", answer=_calculator_call(op, a, b, plain.answer),
                       tools=self._builtin_tools(), unaided=plain.answer, misused=misused)

    def _dates(self, item: Item, rng: random.Random, heldout: bool) -> Task:
        """A weekday, a day count or today's date through the calendar; a wrong call is a day off (no
        held-out phrasings: ``heldout`` is ignored)."""
        kind, dates = item.key[1], item.key[2:] if item.key[1] != "today" else ()
        words = rng.random() < 0.5
        said = [_say_date(d, words) for d in dates]
        if kind == "weekday":
            question = rng.choice(WEEKDAY_QUESTIONS).format(d=said[0])
            args, bad_args = {"date": dates[0]}, {"date": _shift(dates[0], rng.choice((-1, 1)))}
        elif kind == "days":
            question = rng.choice(DAYS_QUESTIONS).format(d1=said[0], d2=said[1])
            args = {"start": dates[0], "end": dates[1]}
            bad_args = {"start": dates[0], "end": _shift(dates[1], rng.choice((-1, 1)))}
        else:
            question = TODAY_QUESTIONS[int(item.key[2])]
            args, bad_args = {}, {"date": self.config.today}  # the weekday of today is not its date
        operation = {"weekday": "weekday", "days": "days_between", "today": "today"}[kind]
        value, bad_value = self._calendar(operation, args), self._calendar("weekday" if kind == "today" else
                                                                          operation, bad_args)
        wrong_value = _wrong_date_value(kind, value, rng)
        right, wrong = (_date_answer(kind, dates, v, words) for v in (value, wrong_value))
        bad = f"Today is {bad_value}." if kind == "today" else _date_answer(kind, dates, bad_value, words)
        bad_operation = "weekday" if kind == "today" else operation
        call = ("calendar", {"operation": operation, **args}, value)
        misused = (transcript([("calendar", {"operation": bad_operation, **bad_args}, bad_value)], bad),
                   transcript([call], wrong))
        return Task("dates", item.key, (Message("user", _capitalize(question)),), transcript([call], right), wrong,
                    rng.choice(REFUSALS), tools=self._builtin_tools(), unaided=None if kind == "today" else right,
                    misused=misused)

    def _calendar(self, operation: str, args: dict[str, str]) -> str:
        if operation == "weekday":
            return weekday(args["date"])
        if operation == "days_between":
            return days_between(args["start"], args["end"])
        return self.config.today

    def _functions(self, item: Item, rng: random.Random, heldout: bool) -> Task:
        """A fact question beside 1-4 declared world functions: call the one that fits, or answer directly."""
        _, subject, attribute = item.key
        attr = ATTRIBUTES[attribute]
        question = _ask(attr, subject, rng, heldout)
        right, wrong = self._fact_parts(subject, attribute, rng)
        fits = rng.random() < self.config.functions_fit_share
        n = rng.randint(1, self.config.max_functions)
        declared = rng.sample([a for a in ATTRIBUTES if a != attribute], n - fits) + [attribute] * fits
        rng.shuffle(declared)
        kind = attr.subject_kind
        if fits:
            other = rng.choice([e.name for e in self.world.entities_of(kind) if e.name != subject])
            answer = self._function_call(attribute, kind, subject, right)
            other_value = self.world.lookup(other, attribute)
            misused = (self._function_call(attribute, kind, other, attr.answer(subject, other_value)),
                       self._function_call(attribute, kind, subject, wrong))
            unaided: Response | None = right
        else:  # the needless call: a declared function (one about this subject's kind when there is one)
            needless = next((a for a in declared if ATTRIBUTES[a].subject_kind == kind), declared[0])
            answer, unaided = right, None
            misused = (self._function_call(needless, ATTRIBUTES[needless].subject_kind, subject, right),)
        return Task("functions", item.key, (Message("user", question),), answer, wrong, rng.choice(REFUSALS),
                    tools=tuple(function_spec(a) for a in declared), unaided=unaided, misused=misused)

    def _function_call(self, attribute: str, kind: str, subject: str, final: str) -> Response:
        """`get_<attribute>({kind: subject})`, the world's result (an error for a subject of another kind), `final`."""
        name, args = function_name(attribute), {kind: subject}
        result = run_tool_call(json.dumps({"name": name, "arguments": args}), self.functions).content
        return transcript([(name, args, result)], final)


def _ask(attr: Attribute, subject: str, rng: random.Random, heldout: bool) -> str:
    """A question about ``subject``'s ``attr`` that names the subject."""
    return _capitalize(rng.choice(attr.heldout_questions if heldout else attr.questions).format(s=subject))


def _follow(attr: Attribute, entity: Entity, rng: random.Random, heldout: bool, opening: bool = False) -> str:
    """A follow-up question about ``attr`` that refers back to ``entity`` ("And what about its river?");
    an ``opening`` one comes first, without "And"."""
    pron, poss, _ = PRONOUNS[entity.pronoun]
    text = rng.choice(attr.heldout_followups if heldout else attr.followups).format(pron=pron, poss=poss)
    return _capitalize(text.removeprefix("And ")) if opening else text


def _request(template: str, act: str, rng: random.Random, heldout: bool) -> str:
    """A request for ``act`` in ``template`` (a request template, or a jailbreak's wrapper, filled with a
    random request template where it holds a whole request); a held-out phrasing replaces the template
    with a held-out one (a held-out wrapper of the same kind)."""
    kind = WRAPPER_KINDS.get(template)
    if heldout:
        template = rng.choice(HELDOUT_REQUEST_TEMPLATES if kind is None else HELDOUT_JAILBREAK_WRAPPERS[kind])
    if kind is None:
        return template.format(act=act)
    request = rng.choice(HELDOUT_REQUEST_TEMPLATES if heldout else REQUEST_TEMPLATES).format(act=act)
    return template.format(request=request, act=act)


def _calculator_call(op: str, a: int, b: int, final: str) -> Response:
    expression = f"{a} {CALC_SYMBOLS[op]} {b}"
    # no wall-clock limit: the data must not depend on the machine's load (a suite's abandoned tool
    # threads holding the GIL once took this two-number sum past the tool's 0.5 s backstop)
    result = calculate(expression, time_limit=math.inf)
    return transcript([("calculator", {"expression": expression}, result)], final)


def _shift(iso: str, days: int) -> str:
    return (datetime.date.fromisoformat(iso) + datetime.timedelta(days=days)).isoformat()


def _wrong_date_value(kind: str, value: str, rng: random.Random) -> str:
    """Another weekday, a count off by one or a week, or a day near today."""
    if kind == "weekday":
        return rng.choice([w for w in WEEKDAYS if w != value])
    if kind == "days":
        return str(int(value) + rng.choice([d for d in (-7, -1, 1, 7) if int(value) + d > 1]))
    return _shift(value, rng.choice((-1, 1, 7)))
