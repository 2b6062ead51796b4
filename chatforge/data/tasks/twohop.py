"""Two-hop questions: questions that need two of the world's facts, answered by stating the first
fact, then the second ("Which language is spoken in the country whose capital is Kesh?" -> "The
capital of Veloria is Kesh. People in Veloria speak Velorian.").

A ``Composition`` is two attributes chained: the first hop goes from what the question names to an
intermediate entity, the second from that entity to the answer. The first hop runs forward (a
person's home city, a city's country, a country's neighbour: a lookup, always one value) or
backward (``inverse``: "the country whose capital is Kesh", which has an answer only because one
country has that capital). ``chains`` keeps only chains with exactly one answer -- a backward hop
whose value belongs to exactly one entity, and an answer other than the thing asked about -- so the
scorer can check every question. A question about three hops (the language of a person's country)
is never asked.

Answers use the attributes' canonical statements (``Attribute.answer``): step by step, the first
fact then the second; without steps (``TaskConfig.step_by_step=False``), the second fact alone.
Wrong answers go through a wrong intermediate entity (consistently: its own fact after it) or state
a wrong final value after the right first fact. The scorer (``twohop_checker``) asks for the final
value and no other value of its kind, and no entity of the intermediate's kind other than the right
one (a chain through a wrong country is wrong even when it lands on the right value).

Items: a chain's key names both facts, ``("twohop", composition, subject1, attribute1, subject2,
attribute2)``, and the chain is an item only of the split that holds both facts (items.py), so a
held-out two-hop question only uses held-out facts.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from chatforge.data.tasks.text import _capitalize, _has_phrase, _norm, _template_regex, _word_forms
from chatforge.data.world import ATTRIBUTES, Fact, World


@dataclass(frozen=True)
class Composition:
    """Two attributes chained: ``first`` from the question's subject (or, ``inverse``, to it), then
    ``second`` from the intermediate entity. ``questions`` use ``{s}`` for what the question names."""

    name: str
    first: str
    inverse: bool
    second: str
    questions: tuple[str, ...]


def _comp(name: str, first: str, inverse: bool, second: str, *questions: str) -> Composition:
    return Composition(name, first, inverse, second, questions)


COMPOSITIONS: dict[str, Composition] = {c.name: c for c in (
    _comp("home_country", "home", False, "country", "Which country does {s} live in?",
          "In which country does {s} live?", "In what country is the home city of {s}?"),
    _comp("home_famous_for", "home", False, "famous_for", "What is the home city of {s} famous for?",
          "What is the city where {s} lives known for?", "What is the city {s} lives in famous for?"),
    _comp("city_capital", "country", False, "capital", "What is the capital of the country {s} is in?",
          "Which city is the capital of the country where {s} lies?",
          "What is the capital of the country that {s} is in?"),
    _comp("city_language", "country", False, "language", "What language do people speak in the city of {s}?",
          "Which language is spoken in the city of {s}?", "What is the language of the country {s} is in?"),
    _comp("city_currency", "country", False, "currency", "What money do people use in the city of {s}?",
          "What is the currency of the country {s} is in?", "Which currency do people pay with in the city of {s}?"),
    _comp("city_river", "country", False, "river", "What is the main river of the country {s} is in?",
          "Which river flows through the country where {s} lies?", "Which river flows through the country {s} is in?"),
    _comp("city_neighbour", "country", False, "neighbour", "Which country borders the country {s} is in?",
          "What is the neighbour of the country where {s} lies?",
          "Which country is the neighbour of the country {s} is in?"),
    _comp("neighbour_capital", "neighbour", False, "capital", "What is the capital of the country that borders {s}?",
          "What is the capital of the neighbour of {s}?", "Which city is the capital of the country bordering {s}?"),
    _comp("neighbour_language", "neighbour", False, "language",
          "What language do people speak in the country that borders {s}?",
          "What is the language of the neighbour of {s}?", "Which language is spoken in the country bordering {s}?"),
    _comp("neighbour_currency", "neighbour", False, "currency", "What is the currency of the country that borders {s}?",
          "What money do people use in the country bordering {s}?", "What is the currency of the neighbour of {s}?"),
    _comp("neighbour_river", "neighbour", False, "river", "What is the main river of the country that borders {s}?",
          "Which river flows through the country bordering {s}?", "What is the main river of the neighbour of {s}?"),
    _comp("capital_language", "capital", True, "language",
          "Which language is spoken in the country whose capital is {s}?",
          "What language do people speak in the country whose capital is {s}?",
          "What is the language of the country with the capital {s}?"),
    _comp("capital_currency", "capital", True, "currency", "What is the currency of the country whose capital is {s}?",
          "What money do people use in the country whose capital is {s}?",
          "Which currency is used in the country with the capital {s}?"),
    _comp("capital_river", "capital", True, "river", "What is the main river of the country whose capital is {s}?",
          "Which river flows through the country whose capital is {s}?",
          "What river flows through the country with the capital {s}?"),
    _comp("capital_neighbour", "capital", True, "neighbour", "Which country borders the country whose capital is {s}?",
          "What is the neighbour of the country whose capital is {s}?",
          "Which country is the neighbour of the country with the capital {s}?"),
    _comp("language_capital", "language", True, "capital",
          "What is the capital of the country where people speak {s}?",
          "Which city is the capital of the country where {s} is spoken?",
          "What is the capital of the land where people speak {s}?"),
    _comp("language_currency", "language", True, "currency", "What is the currency of the country where {s} is spoken?",
          "What money do people use in the land where people speak {s}?",
          "Which currency is used in the country where people speak {s}?"),
    _comp("river_capital", "river", True, "capital", "What is the capital of the country the river {s} flows through?",
          "Which city is the capital of the country where the river {s} flows?",
          "What is the capital of the country whose main river is the {s}?"),
    _comp("river_language", "river", True, "language",
          "What language do people speak in the country whose main river is the {s}?",
          "Which language is spoken in the country the river {s} flows through?",
          "What is the language of the country where the river {s} flows?"),
    _comp("currency_capital", "currency", True, "capital", "What is the capital of the country that pays with the {s}?",
          "Which city is the capital of the country whose currency is the {s}?",
          "What is the capital of the country where people pay with the {s}?"),
)}


@dataclass(frozen=True)
class Chain:
    """One two-hop question's facts: ``first`` links what the question names (``subject``) to the
    intermediate entity, ``second`` the intermediate entity to the answer."""

    composition: Composition
    subject: str
    first: Fact
    second: Fact

    @property
    def key(self) -> tuple[str, ...]:
        return ("twohop", self.composition.name, self.first.subject, self.first.attribute, self.second.subject,
                self.second.attribute)

    @property
    def middle(self) -> str:
        return self.second.subject

    @property
    def value(self) -> str:
        return self.second.value

    def question(self, variant: int) -> str:
        return _capitalize(self.composition.questions[variant % len(self.composition.questions)]
                           .format(s=self.subject))

    def answer(self, steps: bool = True) -> str:
        """The first fact then the second, or (without steps) the second alone."""
        return _say(self.first, self.second, steps)


def _say(first: Fact, second: Fact, steps: bool) -> str:
    final = ATTRIBUTES[second.attribute].answer(second.subject, second.value)
    return f"{ATTRIBUTES[first.attribute].answer(first.subject, first.value)} {final}" if steps else final


def _chain(world: World, composition: Composition, subject: str, middle: str) -> Chain | None:
    first = (Fact(middle, composition.first, subject) if composition.inverse
             else Fact(subject, composition.first, middle))
    attributes = world.entity(middle).attributes
    if composition.second not in attributes or attributes[composition.second].lower() == subject.lower():
        return None
    return Chain(composition, subject, first, Fact(middle, composition.second, attributes[composition.second]))


def _owners(world: World, attribute: str) -> dict[str, list[str]]:
    """Each value of ``attribute`` (lowercase) -> the entities that have it."""
    owners: dict[str, list[str]] = {}
    for e in world.entities:
        if attribute in e.attributes:
            owners.setdefault(e.attributes[attribute].lower(), []).append(e.name)
    return owners


def chains(world: World) -> list[Chain]:
    """Every two-hop question the world answers uniquely, composition by composition, in world order."""
    out: list[Chain] = []
    for composition in COMPOSITIONS.values():
        attr = ATTRIBUTES[composition.first]
        if composition.inverse:
            owners = _owners(world, composition.first)
            pairs = [(value, names[0]) for value in world.values_of(composition.first)
                     if len(names := owners[value.lower()]) == 1]
        else:
            pairs = [(e.name, e.attributes[attr.name]) for e in world.entities_of(attr.subject_kind)]
        out += [c for subject, middle in pairs if (c := _chain(world, composition, subject, middle)) is not None]
    return out


def chain_from_key(world: World, key: tuple[str, ...]) -> Chain:
    """The chain an item's key names."""
    _, name, subject1, attribute1, _, _ = key
    composition = COMPOSITIONS[name]
    value1 = world.lookup(subject1, attribute1)
    subject, middle = (value1, subject1) if composition.inverse else (subject1, value1)
    chain = _chain(world, composition, subject, middle)
    if chain is None or chain.key != key:
        raise KeyError(f"no two-hop chain for {key}")
    return chain


def read_chain(world: World, composition: Composition, named: str) -> Chain | None:
    """The chain a question of ``composition`` asks about, naming ``named`` (lowercase); None when it
    names nothing the world knows or (backward) something several entities share."""
    attr = ATTRIBUTES[composition.first]
    if composition.inverse:
        owners = _owners(world, composition.first).get(named, [])
        if len(owners) != 1:
            return None
        middle = owners[0]
        subject = world.lookup(middle, composition.first)
    else:
        entity = next((e for e in world.entities_of(attr.subject_kind) if e.name.lower() == named), None)
        if entity is None:
            return None
        subject, middle = entity.name, entity.attributes[attr.name]
    return _chain(world, composition, subject, middle)


def question_patterns() -> list[tuple[re.Pattern, Composition]]:
    """Regexes of every composition's questions (normalised text), for the scorer."""
    return [(_template_regex(q, {"s": r"[a-z][a-z'-]*"}), c) for c in COMPOSITIONS.values() for q in c.questions]


def twohop_checker(world: World, chain: Chain, pools: dict[str, list[str]]) -> Callable[[str], bool]:
    """Right: the final value is stated, no other value of its kind is, and no entity of the
    intermediate's kind but the right one (the subject and the value may be named: they are of the
    chain too)."""
    value = chain.value.lower()
    own = {value, chain.middle.lower(), chain.subject.lower()}
    others = [v for v in pools[ATTRIBUTES[chain.second.attribute].value_kind] if v not in own]
    kind = world.entity(chain.middle).kind
    others += [e.name.lower() for e in world.entities_of(kind) if e.name.lower() not in own]

    def is_correct(response: str) -> bool:
        forms, normed = _word_forms(response), _norm(response)
        present = value in forms or _has_phrase(normed, value)
        return present and not any(o in forms or (" " in o and _has_phrase(normed, o)) for o in others)

    return is_correct


def wrong_answer(world: World, chain: Chain, rng: random.Random, steps: bool) -> str:
    """Half the time through a wrong intermediate entity (its own fact after it), otherwise the right
    first fact and a wrong final value; both kinds are drawn every time, so the draws do not depend on
    ``steps``."""
    via = _wrong_middle(world, chain, rng)
    own = (chain.value, chain.middle, chain.subject)
    values = [v for v in world.values_of(chain.second.attribute) if v not in own]
    wrong_value = rng.choice(values)
    if rng.random() < 0.5 and via is not None:
        middle, value = via
        first = (Fact(middle, chain.first.attribute, chain.subject) if chain.composition.inverse
                 else Fact(chain.subject, chain.first.attribute, middle))
        return _say(first, Fact(middle, chain.second.attribute, value), steps)
    return _say(chain.first, Fact(chain.middle, chain.second.attribute, wrong_value), steps)


def _wrong_middle(world: World, chain: Chain, rng: random.Random) -> tuple[str, str] | None:
    """Another entity of the intermediate's kind, and its value, neither of them one of the chain's."""
    own = {chain.value, chain.middle, chain.subject}
    kind = world.entity(chain.middle).kind
    attribute = chain.second.attribute
    options = [(e.name, e.attributes[attribute]) for e in world.entities_of(kind)
               if e.name not in own and attribute in e.attributes and e.attributes[attribute] not in own]
    return rng.choice(options) if options else None
