"""The built-in synthetic world: named entities with facts, and a seeded English corpus about them.

Why a synthetic world: it lets every stage run offline in minutes on a laptop CPU, and -- more
important -- a program can check what a model says about it, because every fact is stored as a
(subject, attribute, value) triple. See WORLD.md for how later stages use it.

Three parts, in the order a reader needs them:

1. Registries (``ATTRIBUTES``, arithmetic and word-game templates): every way the corpus states or
   asks something lives here, in one place, so later stages (SFT conversations, rankings, the
   scorer) generate questions and recognise answers from the same templates. Beside them are the
   held-out questions (``Attribute.heldout_questions``/``heldout_followups``,
   ``HELDOUT_ARITHMETIC_QUESTIONS``, ``HELDOUT_WORD_GAME_QUESTIONS``) that only evaluation prompts
   ask: the corpus never uses them.
2. ``World``: entities with invented, syllable-based names built deterministically from a seed,
   their facts, lookup, and JSON save/load so a run can keep the exact world it used.
3. The corpus: ``World.documents``/``World.corpus`` yield short documents of five kinds (fact
   paragraphs, stories, dialogues, arithmetic, word games) in configurable byte shares, and
   ``write_corpus`` writes them as ``{"text": ...}`` JSONL, the same format users bring.

Everything random goes through ``random.Random`` seeded with strings (SHA-512 based, stable across
processes and Python versions) and never iterates over a set, so output does not depend on
``PYTHONHASHSEED``.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

from chatforge.errors import ConfigError, DataError
from chatforge.files import atomic_write, strict_json

# --------------------------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------------------------

ENTITY_KINDS = ("country", "city", "person")


@dataclass(frozen=True)
class Attribute:
    """One kind of fact, with every phrasing the corpus (and later the chat data) uses for it.

    Templates use ``{s}`` for the subject and ``{v}`` for the value. Every statement names both,
    so a single sentence states the whole fact and can be found again by a program. Follow-up
    questions ("And what about its river?") refer back to a subject named in an earlier turn; they
    may use ``{pron}``/``{poss}`` (she/her, he/his, it/its).
    """

    name: str
    subject_kind: str  # which entities have it: "country", "city" or "person"
    value_kind: str  # what its values are; values of one kind make plausible wrong answers
    label: str  # the attribute as a noun phrase ("capital", "favourite colour")
    questions: tuple[str, ...]
    statements: tuple[str, ...]  # the first one is the canonical, concise answer
    followups: tuple[str, ...]
    # Held-out phrasings: asked only by the evaluation prompts, never in the corpus or training data,
    # so evaluation can tell a model that learned the fact from one that learned the question's words.
    heldout_questions: tuple[str, ...] = ()
    heldout_followups: tuple[str, ...] = ()

    def statement(self, subject: str, value: str, variant: int = 0) -> str:
        return _capitalize(self.statements[variant % len(self.statements)].format(s=subject, v=value))

    def question(self, subject: str, variant: int = 0) -> str:
        return _capitalize(self.questions[variant % len(self.questions)].format(s=subject))

    def heldout_question(self, subject: str, variant: int = 0) -> str:
        return _capitalize(self.heldout_questions[variant % len(self.heldout_questions)].format(s=subject))

    def answer(self, subject: str, value: str) -> str:
        """The canonical answer: short, direct, no filler."""
        return self.statement(subject, value, 0)


def _attr(name, subject_kind, value_kind, label, questions, statements, followups, heldout_questions=(),
          heldout_followups=()) -> Attribute:
    return Attribute(name, subject_kind, value_kind, label, tuple(questions), tuple(statements),
                     tuple(followups), tuple(heldout_questions), tuple(heldout_followups))


ATTRIBUTES: dict[str, Attribute] = {a.name: a for a in (
    _attr("capital", "country", "city", "capital",
          ["What is the capital of {s}?", "Which city is the capital of {s}?",
           "What city is the capital of {s}?"],
          ["The capital of {s} is {v}.", "{v} is the capital of {s}.", "{s} has {v} as its capital.",
           "The capital city of {s} is {v}."],
          ["And what about its capital?", "And what is its capital?"],
          ["Do you know the capital of {s}?", "Tell me the capital of {s}."],
          ["And its capital city?", "Which city is its capital?"]),
    _attr("river", "country", "river", "river",
          ["What is the main river of {s}?", "Which river flows through {s}?"],
          ["The main river of {s} is the {v}.", "The river {v} flows through {s}.",
           "{s} is crossed by the river {v}.", "The {v} is the main river of {s}."],
          ["And what about its river?", "And which river flows through it?"],
          ["Tell me the main river of {s}.", "Do you know the main river of {s}?"],
          ["And its main river?", "Do you know its main river?"]),
    _attr("language", "country", "language", "language",
          ["What language do people speak in {s}?", "What is the language of {s}?"],
          ["People in {s} speak {v}.", "The language of {s} is {v}.", "{v} is spoken in {s}.",
           "In {s}, people speak {v}."],
          ["And what about its language?", "And what language do people speak there?"],
          ["Tell me the language of {s}.", "What do people in {s} speak?"],
          ["And which language is spoken there?", "What do people speak there?"]),
    _attr("currency", "country", "currency", "currency",
          ["What is the currency of {s}?", "What money do people use in {s}?"],
          ["The currency of {s} is the {v}.", "In {s}, people pay with the {v}.",
           "The {v} is the money of {s}.", "People in {s} pay with the {v}."],
          ["And what about its currency?", "And what money do they use there?"],
          ["Tell me the currency of {s}.", "What do people in {s} pay with?"],
          ["And which currency is used there?", "What do people pay with there?"]),
    _attr("neighbour", "country", "country", "neighbour",
          ["Which country borders {s}?", "What is the neighbour of {s}?"],
          ["{s} borders {v}.", "{s} shares a border with {v}.", "The neighbour of {s} is {v}.",
           "{v} is the neighbour of {s}."],
          ["And what about its neighbour?", "And which country borders it?"],
          ["Do you know the neighbour of {s}?", "What country shares a border with {s}?"],
          ["Do you know its neighbour?", "What country shares a border with it?"]),
    _attr("country", "city", "country", "country",
          ["In which country is {s}?", "Which country is {s} in?"],
          ["{s} is a city in {v}.", "{s} lies in {v}.", "The city of {s} is in {v}.",
           "{s} is in {v}."],
          ["And which country is it in?", "And where is it?"],
          ["Do you know which country {s} is in?", "Tell me the country {s} lies in."],
          ["Do you know which country it is in?", "Which country does it lie in?"]),
    _attr("famous_for", "city", "product", "speciality",
          ["What is {s} famous for?", "What is {s} known for?"],
          ["{s} is famous for its {v}.", "{s} is known for its {v}.",
           "People travel to {s} for its {v}.", "The {v} of {s} is famous."],
          ["And what is it famous for?", "And what is it known for?"],
          ["What is {s} best known for?", "What do people travel to {s} for?"],
          ["And what is it best known for?", "What do people travel there for?"]),
    _attr("profession", "person", "profession", "job",
          ["What does {s} do for a living?", "What is the job of {s}?"],
          ["{s} is a {v}.", "{s} works as a {v}.", "By trade, {s} is a {v}.",
           "{s} earns a living as a {v}."],
          ["And what does {pron} do for a living?", "And what is {poss} job?"],
          ["Tell me the job of {s}.", "What does {s} work as?"],
          ["And what does {pron} work as?", "Do you know {poss} job?"]),
    _attr("home", "person", "city", "home city",
          ["Where does {s} live?", "In which city does {s} live?"],
          ["{s} lives in {v}.", "{s} has a home in {v}.", "{v} is where {s} lives.",
           "The home of {s} is in {v}."],
          ["And where does {pron} live?", "And what is {poss} home city?"],
          ["Which city is home to {s}?", "What city does {s} live in?"],
          ["And which city is {poss} home?", "What city does {pron} live in?"]),
    _attr("pet", "person", "pet", "pet",
          ["What pet does {s} have?", "What kind of pet does {s} keep?"],
          ["{s} has a pet {v}.", "{s} keeps a {v} as a pet.", "The pet of {s} is a {v}.",
           "{s} takes care of a pet {v}."],
          ["And what pet does {pron} have?", "And what about {poss} pet?"],
          ["Which pet does {s} keep?", "Tell me the pet of {s}."],
          ["And which pet does {pron} keep?", "Do you know {poss} pet?"]),
    _attr("favourite_colour", "person", "colour", "favourite colour",
          ["What is the favourite colour of {s}?", "Which colour does {s} like best?"],
          ["The favourite colour of {s} is {v}.", "{s} likes the colour {v} best.",
           "{s} loves the colour {v} more than any other.", "Of all colours, {s} likes {v} best."],
          ["And what is {poss} favourite colour?", "And which colour does {pron} like best?"],
          ["Which colour does {s} love more than any other?", "Which colour is the favourite of {s}?"],
          ["And which colour does {pron} love more than any other?", "Which colour is {poss} favourite?"]),
    _attr("age", "person", "number", "age",
          ["How old is {s}?", "What is the age of {s}?"],
          ["{s} is {v} years old.", "The age of {s} is {v}.", "{s} is {v} years of age.",
           "{s} turned {v} this year."],
          ["And how old is {pron}?", "And what is {poss} age?"],
          ["How many years old is {s}?", "What age is {s}?"],
          ["And how many years old is {pron}?", "What age is {pron}?"]),
)}

# Closed English word pools for values. Professions and pets start with a consonant so "a {v}" is
# always grammatical; products read well after "some" and "famous for its".
PROFESSIONS = ("baker", "farmer", "teacher", "doctor", "painter", "sailor", "miner", "weaver", "singer",
               "potter", "fisher", "builder", "tailor", "cook", "nurse", "poet", "judge", "guard")
PETS = ("dog", "cat", "parrot", "goat", "horse", "rabbit", "turtle", "hen", "pony", "duck", "mouse", "frog")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "brown",
           "grey", "gold")
PRODUCTS = ("bread", "cheese", "honey", "apples", "fish", "tea", "salt", "wool", "soap", "plums", "figs",
            "nuts", "candles", "carpets", "lamps", "clocks")
MIN_AGE, MAX_AGE = 18, 80

# Arithmetic. Templates use {a}, {b}, {c} with c = a op b; numbers are digits or number words.
ARITHMETIC_OPS: dict[str, Callable[[int, int], int]] = {
    "plus": lambda a, b: a + b,
    "minus": lambda a, b: a - b,
    "times": lambda a, b: a * b,
}
ARITHMETIC_STATEMENTS: dict[str, tuple[str, ...]] = {
    "plus": ("{a} plus {b} is {c}.", "{a} plus {b} equals {c}.", "The sum of {a} and {b} is {c}.",
             "Adding {a} and {b} gives {c}."),
    "minus": ("{a} minus {b} is {c}.", "{a} minus {b} equals {c}.",
              "The difference between {a} and {b} is {c}.", "Taking {b} away from {a} leaves {c}."),
    "times": ("{a} times {b} is {c}.", "{a} times {b} equals {c}.", "The product of {a} and {b} is {c}.",
              "{a} multiplied by {b} is {c}."),
}
ARITHMETIC_EQUATIONS: dict[str, str] = {  # digits only
    "plus": "{a} + {b} = {c}.", "minus": "{a} - {b} = {c}.", "times": "{a} * {b} = {c}.",
}
ARITHMETIC_QUESTIONS: dict[str, tuple[str, ...]] = {
    "plus": ("What is {a} plus {b}?", "What is the sum of {a} and {b}?", "How much is {a} plus {b}?"),
    "minus": ("What is {a} minus {b}?", "What is {a} take away {b}?", "How much is {a} minus {b}?"),
    "times": ("What is {a} times {b}?", "What is the product of {a} and {b}?",
              "How much is {a} multiplied by {b}?"),
}
# Held-out arithmetic questions: asked only by the evaluation prompts (see Attribute.heldout_questions).
HELDOUT_ARITHMETIC_QUESTIONS: dict[str, tuple[str, ...]] = {
    "plus": ("Tell me the sum of {a} and {b}.", "Do you know how much {a} plus {b} is?"),
    "minus": ("Tell me what {a} minus {b} is.", "If you take {b} away from {a}, what is left?"),
    "times": ("Tell me the product of {a} and {b}.", "Do you know how much {a} times {b} is?"),
}
# Word problems (digits only): {items} is a plural noun, {n_items} "1 apple"/"7 apples".
WORD_PROBLEMS: dict[str, str] = {
    "plus": "{name} had {a_items}. {friend} gave {obj} {b} more. Now {name} has {c_items}.",
    "minus": "{name} had {a_items} and gave {b} to {friend}. Now {name} has {c_items} left.",
    "times": "{name} has {a} bags with {b_items} in each, so {name} has {c_items} in all.",
}
COUNTABLE_ITEMS = ("apple", "egg", "book", "coin", "plum", "shell", "stone", "cup", "fig", "nut")

# Word games. {w} is a lowercase word, {x} the answer, {c} a letter.
WORD_GAME_STATEMENTS: dict[str, tuple[str, ...]] = {
    "spell": ("The word {w} is spelled {x}.", "{w} is spelled {x}."),
    "reverse": ("The word {w} reversed is {x}.", "{w} spelled backwards is {x}."),
    "length": ("The word {w} has {x} letters.", "There are {x} letters in the word {w}."),
    "count": ("The letter {c} appears {x} in the word {w}.", "In the word {w}, the letter {c} appears {x}."),
}
WORD_GAME_QUESTIONS: dict[str, tuple[str, ...]] = {
    "spell": ("How do you spell {w}?", "Can you spell {w} letter by letter?"),
    "reverse": ("What is {w} spelled backwards?", "What is the word {w} reversed?"),
    "length": ("How many letters are in the word {w}?", "How long is the word {w}?"),
    "count": ("How many times does the letter {c} appear in {w}?", "How many {c}'s are in the word {w}?"),
}
# Held-out word-game questions, for the games the chat data asks: evaluation prompts only.
HELDOUT_WORD_GAME_QUESTIONS: dict[str, tuple[str, ...]] = {
    "spell": ("Spell out the word {w} for me.", "What are the letters in the word {w}?"),
    "reverse": ("Write the word {w} backwards.", "Tell me the word {w} spelled backwards."),
    "count": ("Tell me how many times the letter {c} appears in the word {w}.",
              "Do you know how many {c}'s the word {w} has?"),
}

# Stories: whole-story templates over one person (and a friend) whose placeholders are filled from
# the world's facts, so a story never contradicts them. Placeholders that carry a fact are listed in
# _StoryContext.facts; the rest ({when}, {pron}, ...) are grammar or colour.
STORY_TEMPLATES: tuple[str, ...] = (
    "{when}, {name}, a {prof} from {city}, walked {poss} {pet} along the river {river}. The {pet} was "
    "happy and ran ahead. On the way home, {name} bought some {product}, because {city} is famous for "
    "its {product}.",
    "{name} lived in {city}, a city in {country}. {when}, {pron} travelled to {nb_capital}, the capital "
    "of {nb}. In {nb}, people speak {nb_language}, so {name} learned a few words of {nb_language}. "
    "{Pron} paid for a {colour} scarf with the {nb_currency}, because {colour} is {poss} favourite "
    "colour.",
    "{when}, {name} the {prof} met {friend} the {friend_prof} in {city}. \"What is your favourite "
    "colour?\" asked {friend}. \"I like {colour} best,\" said {name}. \"Mine is {friend_colour},\" said "
    "{friend}, and they both laughed.",
    "Today {name} turned {age}. {Poss} friends in {city} baked a {colour} cake, because {colour} is "
    "{poss} favourite colour. Even {poss} {pet} got a small piece. It was a good day in {city}.",
    "{name} is a {prof} who lives in {city}. Every evening {pron} sits by the river {river} with {poss} "
    "{pet}. {Pron} likes to watch the boats and think about the day. {name} is {age} years old.",
    "{when}, {name} wanted to buy some {product}. {Pron} went to the market in {city}, which is famous "
    "for its {product}. {name} paid with the {currency}, the money of {country}, and went home with a "
    "full basket.",
    "Dear {friend},\nI am writing to you from {city}. The weather here is {weather}. My {pet} says "
    "hello. Did you know that people in {country} pay with the {currency}? I will visit you in "
    "{friend_city} soon.\nYour friend,\n{name}",
    "Long ago, {country} was a quiet land. Its capital, {capital}, stood near the river {river}. The "
    "people spoke {language} and traded with their neighbours in {nb}. Today {capital} is still the "
    "capital of {country}, and {nb} still borders {country}.",
    "{friend} asked {name} for help. \"You are a {prof}, and I need one,\" said {friend}. {name} "
    "came from {city} with {poss} {pet} and helped all day. In the evening {friend} said thank you in "
    "{language}, the language of {country}.",
)
_WHEN = ("One morning", "Last spring", "On a cold day", "One sunny afternoon", "Early on Sunday",
         "Last week", "One evening", "Long ago")
_WEATHER = ("sunny", "rainy", "cold", "warm", "windy", "grey")
_PARAGRAPH_OPENERS = ("", "", "", "Here are some facts about {s}.", "Let me tell you about {s}.",
                      "This is what we know about {s}.")
_GREETINGS = (("Hi, {b}!", "Hello, {a}."), ("Good morning, {b}.", "Good morning, {a}!"),
              ("Can I ask you something, {b}?", "Of course, {a}."))
_THANKS = (("Thank you!", "You are welcome."), ("Thanks, {b}.", "Any time, {a}."), ("I see.", "Good."))

# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_to_words(n: int) -> str:
    """English words for 0..999 ("twenty-one", "one hundred five")."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_to_words supports 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{_ONES[hundreds]} hundred" + (f" {number_to_words(rest)}" if rest else "")


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _count_noun(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


# --------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    subject: str
    attribute: str
    value: str


@dataclass(frozen=True)
class Entity:
    name: str
    kind: str  # one of ENTITY_KINDS
    attributes: dict[str, str]  # attribute name -> value, in ATTRIBUTES order
    pronoun: str = "it"  # "she"/"he" for people: grammar in stories and follow-ups, not a fact


PRONOUNS = {"she": ("she", "her", "her"), "he": ("he", "his", "him"), "it": ("it", "its", "it")}

# Name shapes: consonant-vowel syllables from a small inventory, so a small BPE vocabulary covers
# every name, plus a suffix per kind (-ria, -land for countries; -ish, -ese for languages) that
# hints at what a name is, as real names do.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("n", "r", "l", "s")


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS)


_NAME_SHAPES: dict[str, Callable[[random.Random], str]] = {
    "country": lambda r: _syllable(r) + _syllable(r) + r.choice(("ria", "nia", "land", "stan", "mar")),
    "city": lambda r: _syllable(r) + r.choice(_CODAS + ("", "")) + _syllable(r) + r.choice(_CODAS),
    "river": lambda r: _syllable(r) + _syllable(r),
    "language": lambda r: _syllable(r) + r.choice(_ONSETS) + r.choice(("ish", "ese", "ic")),
    "currency": lambda r: _syllable(r) + _syllable(r) + r.choice(_CODAS),
    "person": lambda r: _syllable(r) + _syllable(r) + r.choice(_CODAS + ("",) * 8),
}


# Real words that the name shapes can produce: common English words, real places and languages, and
# words that must never become a name. The check is only against this list (no system dictionary),
# so names stay the same on every machine.
_NOT_NAMES_TEXT = """
bale bane bare base bide bike bile bite bode bole bone bore dame dare date dine dire dome done dose
dote dune fade fame fare fate file fine fire fume fuse gale game gate gave gene gone kale kite lake
lame lane late lime line lone lore lose love lure lute made make male mane mare mate mile mime mine
mire mode mole mope more mule muse mute name nape nine node none nose note pale pane pare pile pine
pipe poke pole pope pore pose pure rage rake rare rate ride rife ripe rise role rope rose rude rule
ruse safe sage sake sale same sane site size sole some sore sure take tale tame tape tide tile time
tone tore tube tune vale vane vase vine vote zone sofa tuna lava soda diva mama papa toga kilo memo
solo polo silo tofu taro menu gala lima mesa nova pita saga tiki veto zero data ferry bison baton
robin satin lemon melon salon talon demon seven given token taken linen siren risen laden paper
timer tiger fever lever never river rider sober super later meter motor rotor tenor minor lunar
solar sonar polar molar tutor manor rumor tumor vapor valor baker liner diner miner refer finer
miser lover mover rover sugar label model novel panel rival total vital metal petal medal pedal
modal fatal natal tidal level bagel basil pupil bonus virus lotus minus sinus torus genus venus
fetus bogus basis lapis pardon garden burden person lesson kernel tunnel funnel barrel barren
lentil tennis gospel morsel parson vessel tassel fennel sorrel tinsel dental rental mental portal
mortal sandal vandal kennel tender render lender fender gender sender ponder murder border warden
harden banish famish finish lavish polish punish ravish relish perish radish vanish parish danish
tonic sonic panic manic mimic relic topic logic magic malaria begonia nigeria liberia siberia
luster master mister sister muster foster pester tester roster poster faster buster duster
vesper temper pamper tamper lumber number timber summer simmer dimmer banner dinner sinner tanner
manner runner gunner bitter butter better letter litter matter sitter setter mutter gutter putter
kitten mitten button mutton rotten gotten sunset tonsil pistol lintel sermon salmon
romania pakistan bavaria samaria tasmania rape rapes nazi penis semen kike paki puta putin satan
"""
_NOT_NAMES = frozenset(_NOT_NAMES_TEXT.split())


def _english_words() -> frozenset[str]:
    """Every English word the generator writes; invented names must not collide with one."""
    texts: list[str] = [*PROFESSIONS, *PETS, *COLOURS, *PRODUCTS, *COUNTABLE_ITEMS, *STORY_TEMPLATES,
                        *_WHEN, *_WEATHER, *_PARAGRAPH_OPENERS, *_ONES, *_TENS]
    for a in ATTRIBUTES.values():
        texts += [a.label, *a.questions, *a.statements, *a.followups, *a.heldout_questions, *a.heldout_followups]
    for group in (ARITHMETIC_STATEMENTS, ARITHMETIC_QUESTIONS, WORD_GAME_STATEMENTS, WORD_GAME_QUESTIONS,
                  HELDOUT_ARITHMETIC_QUESTIONS, HELDOUT_WORD_GAME_QUESTIONS):
        for templates in group.values():
            texts += list(templates)
    texts += list(WORD_PROBLEMS.values()) + [t for pair in _GREETINGS + _THANKS for t in pair]
    words = {w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t)}
    # Plurals too: a name like "tales" or "tunes" reads as English just as much.
    return frozenset(words | _NOT_NAMES | {w + "s" for w in words | _NOT_NAMES})


class _NameMaker:
    """Draws unique invented names; unique across all kinds so a name alone identifies an entity."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.taken: set[str] = set(_english_words())

    def make(self, shape: str, capitalized: bool = True) -> str:
        for _ in range(10_000):
            name = _NAME_SHAPES[shape](self.rng)
            if name not in self.taken:
                self.taken.add(name)
                return _capitalize(name) if capitalized else name
        raise ConfigError(f"ran out of distinct {shape} names; ask for fewer entities")


@dataclass(frozen=True)
class World:
    """A small synthetic world. Build with ``World.build(seed)``; treat as immutable."""

    seed: int
    entities: tuple[Entity, ...]
    _index: dict[str, Entity] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, Entity] = {}
        for e in self.entities:
            if e.kind not in ENTITY_KINDS:
                raise DataError(f"world entity {e.name!r}: kind must be one of {ENTITY_KINDS}, got {e.kind!r}")
            if e.name in index:
                raise DataError(f"world entity name {e.name!r} appears twice")
            for attr in e.attributes:
                if attr not in ATTRIBUTES or ATTRIBUTES[attr].subject_kind != e.kind:
                    raise DataError(f"world entity {e.name!r} ({e.kind}): unknown attribute {attr!r}")
            index[e.name] = e
        object.__setattr__(self, "_index", index)

    @classmethod
    def build(cls, seed: int = 0, num_countries: int = 12, cities_per_country: int = 3,
              num_people: int = 60) -> World:
        """Build the world for ``seed``: the same arguments always give the same world.

        The defaults give 12 countries, 36 cities and 60 people (108 entities, 432 facts): small
        enough that a 2 MB corpus states each fact many times, big enough to be worth learning.
        """
        if num_countries < 2 or num_countries % 2:
            raise ConfigError(f"num_countries must be an even number >= 2 (countries border in pairs), "
                              f"got {num_countries}")
        if cities_per_country < 1:
            raise ConfigError(f"cities_per_country must be >= 1, got {cities_per_country}")
        if num_people < 2:
            raise ConfigError(f"num_people must be >= 2 (dialogues need two speakers), got {num_people}")
        rng = random.Random(f"chatforge-world:{seed}")
        names = _NameMaker(rng)

        country_names = [names.make("country") for _ in range(num_countries)]
        # Neighbours come in pairs so "A borders B" and "B borders A" are both facts, with one value each.
        order = country_names[:]
        rng.shuffle(order)
        neighbour = {}
        for a, b in zip(order[::2], order[1::2], strict=True):
            neighbour[a], neighbour[b] = b, a

        countries, cities = [], []
        for country in country_names:
            city_names = [names.make("city") for _ in range(cities_per_country)]
            countries.append(Entity(country, "country", {
                "capital": city_names[0],
                "river": names.make("river"),
                "language": names.make("language"),
                "currency": names.make("currency", capitalized=False),
                "neighbour": neighbour[country],
            }))
            cities += [Entity(c, "city", {"country": country, "famous_for": rng.choice(PRODUCTS)})
                       for c in city_names]

        people = []
        for _ in range(num_people):
            people.append(Entity(names.make("person"), "person", {
                "profession": rng.choice(PROFESSIONS),
                "home": rng.choice(cities).name,
                "pet": rng.choice(PETS),
                "favourite_colour": rng.choice(COLOURS),
                "age": str(rng.randint(MIN_AGE, MAX_AGE)),
            }, pronoun=rng.choice(("she", "he"))))
        return cls(seed=seed, entities=tuple(countries + cities + people))

    # ---- queries -------------------------------------------------------------------------

    @property
    def facts(self) -> list[Fact]:
        return [Fact(e.name, a, v) for e in self.entities for a, v in e.attributes.items()]

    def facts_about(self, subject: str) -> list[Fact]:
        return [Fact(subject, a, v) for a, v in self.entity(subject).attributes.items()]

    def entity(self, name: str) -> Entity:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"the world has no entity named {name!r}") from None

    def entities_of(self, kind: str) -> list[Entity]:
        return [e for e in self.entities if e.kind == kind]

    def lookup(self, subject: str, attribute: str) -> str:
        """The value of ``attribute`` for ``subject``, e.g. lookup("Veloria", "capital") -> "Kesh"."""
        attributes = self.entity(subject).attributes
        if attribute not in attributes:
            raise KeyError(f"{subject!r} has no attribute {attribute!r}; it has {sorted(attributes)}")
        return attributes[attribute]

    def values_of(self, attribute: str) -> list[str]:
        """Distinct values of an attribute, sorted: the pool that plausible wrong answers come from."""
        return sorted({e.attributes[attribute] for e in self.entities if attribute in e.attributes})

    # ---- corpus --------------------------------------------------------------------------

    def documents(self, num_bytes: int, seed: int = 0, mix: CorpusMix | None = None) -> Iterator[Document]:
        """Yield documents until their text totals at least ``num_bytes`` UTF-8 bytes.

        Kinds follow ``mix`` as shares of bytes. The same world, seed and mix always give the same
        documents.
        """
        mix = mix or CorpusMix()
        shares = mix.shares()
        maker = _DocumentMaker(self, random.Random(f"chatforge-corpus:{self.seed}:{seed}"))
        kinds = list(shares)
        produced = dict.fromkeys(kinds, 0)
        total = 0
        while total < num_bytes:
            # Draw the next kind in proportion to how far each is behind its byte share: random, but
            # self-correcting, so shares hold even though documents of different kinds differ in length.
            behind = [max(shares[k] * (total + 1) - produced[k], 0.0) for k in kinds]
            kind = maker.rng.choices(kinds, weights=behind)[0]
            doc = maker.make(kind)
            size = len(doc.text.encode("utf-8"))
            produced[kind] += size
            total += size
            yield doc

    def corpus(self, num_bytes: int, seed: int = 0, mix: CorpusMix | None = None) -> Iterator[str]:
        """The documents' text only: what pretraining reads."""
        for doc in self.documents(num_bytes, seed, mix):
            yield doc.text

    # ---- saving --------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": "chatforge-world",
            "version": 1,
            "seed": self.seed,
            "entities": [{"name": e.name, "kind": e.kind, "pronoun": e.pronoun, "attributes": e.attributes}
                         for e in self.entities],
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "world") -> World:
        if not isinstance(data, dict) or data.get("format") != "chatforge-world":
            raise DataError(f"{source}: not a chatforge world (expected \"format\": \"chatforge-world\")")
        if data.get("version") != 1:
            raise DataError(f"{source}: unsupported world version {data.get('version')!r}, expected 1")
        try:
            entities = tuple(Entity(e["name"], e["kind"], dict(e["attributes"]), e.get("pronoun", "it"))
                             for e in data["entities"])
            return cls(seed=int(data["seed"]), entities=entities)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{source}: malformed world ({type(exc).__name__}: {exc})") from None

    def to_json(self) -> str:
        return strict_json(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "world") -> World:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source)

    def save(self, path: str | Path) -> Path:
        """Write the world as JSON (atomically), e.g. beside the corpus or checkpoint that used it."""
        return atomic_write(Path(path), lambda f: f.write(self.to_json() + "\n"))

    @classmethod
    def load(cls, path: str | Path) -> World:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise DataError(f"{path}: cannot read world file ({exc.strerror})") from None
        return cls.from_json(text, source=str(path))


# --------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusMix:
    """Share of corpus bytes per document kind (normalised, so any non-negative weights work)."""

    facts: float = 0.40
    stories: float = 0.20
    dialogues: float = 0.20
    arithmetic: float = 0.12
    word_games: float = 0.08

    def shares(self) -> dict[str, float]:
        weights = {f.name: float(getattr(self, f.name)) for f in fields(self)}
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ConfigError(f"corpus mix weights must be >= 0 and not all zero, got {weights}")
        total = sum(weights.values())
        return {k: w / total for k, w in weights.items() if w > 0}


DOCUMENT_KINDS = tuple(f.name for f in fields(CorpusMix))


@dataclass(frozen=True)
class Document:
    kind: str  # one of DOCUMENT_KINDS
    text: str
    # World facts the text states or relies on (a story may leave the subject implicit: "the river
    # Sena"); empty for arithmetic and word games. Lets later stages hold facts out or trace them.
    facts: tuple[Fact, ...] = ()


class _DocumentMaker:
    """Makes one document of a given kind at a time, drawing everything from one seeded RNG."""

    def __init__(self, world: World, rng: random.Random) -> None:
        self.world = world
        self.rng = rng
        self.people = world.entities_of("person")
        self._fact_queue: list[Entity] = []
        # Word games use the corpus's own words, so the model practises on names it also reads.
        self.game_words = sorted({w.lower() for w in (*PROFESSIONS, *PETS, *COLOURS, *PRODUCTS)}
                                 | {e.name.lower() for e in world.entities}
                                 | {v.lower() for e in world.entities_of("country")
                                    for a, v in e.attributes.items() if a in ("river", "language", "currency")})

    def make(self, kind: str) -> Document:
        return getattr(self, f"_{kind}")()

    # ---- facts ---------------------------------------------------------------------------

    def _next_entity(self) -> Entity:
        # Round-robin over a reshuffled list: every entity gets a paragraph before any gets a second,
        # so even a small corpus states every fact several times.
        if not self._fact_queue:
            self._fact_queue = list(self.world.entities)
            self.rng.shuffle(self._fact_queue)
        return self._fact_queue.pop()

    def _facts(self) -> Document:
        entity = self._next_entity()
        facts = self.world.facts_about(entity.name)
        self.rng.shuffle(facts)
        # A bridging fact (a person's city is in a country; a city is a country's capital) puts
        # the links that two-step questions need next to each other.
        if entity.kind == "person":
            city = entity.attributes["home"]
            facts.append(Fact(city, "country", self.world.lookup(city, "country")))
        elif entity.kind == "city":
            country = entity.attributes["country"]
            if self.world.lookup(country, "capital") == entity.name:
                facts.append(Fact(country, "capital", entity.name))
        sentences = [self._state(f) for f in facts]
        opener = self.rng.choice(_PARAGRAPH_OPENERS).format(s=entity.name)
        return Document("facts", " ".join(([opener] if opener else []) + sentences), tuple(facts))

    def _state(self, fact: Fact) -> str:
        attr = ATTRIBUTES[fact.attribute]
        return attr.statement(fact.subject, fact.value, self.rng.randrange(len(attr.statements)))

    # ---- stories -------------------------------------------------------------------------

    def _stories(self) -> Document:
        person, friend = self.rng.sample(self.people, 2)
        template = self.rng.choice(STORY_TEMPLATES)
        values, sources = self._story_context(person, friend)
        used = list(dict.fromkeys(sources[k] for k in _template_fields(template) if k in sources))
        return Document("stories", template.format(**values), tuple(used))

    def _story_context(self, person: Entity, friend: Entity) -> tuple[dict[str, str], dict[str, Fact]]:
        """Placeholder values for a story, and the fact behind each placeholder that carries one."""
        w = self.world
        name = person.name
        city = person.attributes["home"]
        country = w.lookup(city, "country")
        nb = w.lookup(country, "neighbour")
        sources = {
            "prof": Fact(name, "profession", person.attributes["profession"]),
            "city": Fact(name, "home", city),
            "pet": Fact(name, "pet", person.attributes["pet"]),
            "colour": Fact(name, "favourite_colour", person.attributes["favourite_colour"]),
            "age": Fact(name, "age", person.attributes["age"]),
            "country": Fact(city, "country", country),
            "product": Fact(city, "famous_for", w.lookup(city, "famous_for")),
            "river": Fact(country, "river", w.lookup(country, "river")),
            "capital": Fact(country, "capital", w.lookup(country, "capital")),
            "language": Fact(country, "language", w.lookup(country, "language")),
            "currency": Fact(country, "currency", w.lookup(country, "currency")),
            "nb": Fact(country, "neighbour", nb),
            "nb_capital": Fact(nb, "capital", w.lookup(nb, "capital")),
            "nb_language": Fact(nb, "language", w.lookup(nb, "language")),
            "nb_currency": Fact(nb, "currency", w.lookup(nb, "currency")),
            "friend_prof": Fact(friend.name, "profession", friend.attributes["profession"]),
            "friend_colour": Fact(friend.name, "favourite_colour", friend.attributes["favourite_colour"]),
            "friend_city": Fact(friend.name, "home", friend.attributes["home"]),
        }
        pron, poss, obj = PRONOUNS[person.pronoun]
        values = {key: fact.value for key, fact in sources.items()}
        values.update(name=name, friend=friend.name, pron=pron, Pron=_capitalize(pron), poss=poss,
                      Poss=_capitalize(poss), obj=obj, when=self.rng.choice(_WHEN),
                      weather=self.rng.choice(_WEATHER))
        return values, sources

    # ---- dialogues -----------------------------------------------------------------------

    def _dialogues(self) -> Document:
        """A plain-text conversation between two people: one asks, the other answers correctly."""
        asker, answerer = (p.name for p in self.rng.sample(self.people, 2))
        turns: list[tuple[str, str]] = []
        if self.rng.random() < 0.3:
            hello, reply = self.rng.choice(_GREETINGS)
            turns += [(asker, hello.format(a=asker, b=answerer)), (answerer, reply.format(a=asker, b=answerer))]
        topic = self.rng.choices(("facts", "arithmetic", "word_games"), weights=(6, 2, 2))[0]
        facts: list[Fact] = []
        if topic == "facts":
            entity = self.rng.choice(self.world.entities)
            pron, poss, _ = PRONOUNS[entity.pronoun]
            attrs = self.rng.sample(list(entity.attributes), self.rng.randint(1, min(3, len(entity.attributes))))
            for i, name in enumerate(attrs):
                attr = ATTRIBUTES[name]
                if i == 0:  # the first question names the subject; follow-ups refer back to it
                    question = attr.question(entity.name, self.rng.randrange(len(attr.questions)))
                else:
                    question = self.rng.choice(attr.followups).format(pron=pron, poss=poss)
                fact = Fact(entity.name, name, entity.attributes[name])
                turns += [(asker, question), (answerer, self._state(fact))]
                facts.append(fact)
        else:
            make = self._arithmetic_pair if topic == "arithmetic" else self._word_game_pair
            for _ in range(self.rng.randint(1, 3)):
                question, answer = make()
                turns += [(asker, question), (answerer, answer)]
        if self.rng.random() < 0.3:
            thanks, reply = self.rng.choice(_THANKS)
            turns += [(asker, thanks.format(a=asker, b=answerer)), (answerer, reply.format(a=asker, b=answerer))]
        return Document("dialogues", "\n".join(f"{who}: {text}" for who, text in turns), tuple(facts))

    # ---- arithmetic ----------------------------------------------------------------------

    def _operands(self, op: str, words: bool) -> tuple[int, int, int]:
        r = self.rng
        if op == "plus":
            a, b = r.randint(0, 20), r.randint(0, 20)
        elif op == "minus":  # no negative results
            a = r.randint(0, 20)
            b = r.randint(0, a)
        else:  # times: keep products below 100 in words, so every number word is one (hyphenated) word
            top = 9 if words else 12
            a, b = r.randint(0, top), r.randint(0, top)
        return a, b, ARITHMETIC_OPS[op](a, b)

    def _arithmetic_parts(self) -> tuple[str, dict[str, str]]:
        op = self.rng.choice(tuple(ARITHMETIC_OPS))
        words = self.rng.random() < 0.3
        numbers = self._operands(op, words)
        rendered = [number_to_words(n) if words else str(n) for n in numbers]
        return op, dict(zip("abc", rendered, strict=True))

    def _arithmetic_pair(self) -> tuple[str, str]:
        op, nums = self._arithmetic_parts()
        question = self.rng.choice(ARITHMETIC_QUESTIONS[op]).format(**nums)
        return _capitalize(question), _capitalize(self.rng.choice(ARITHMETIC_STATEMENTS[op]).format(**nums))

    def _arithmetic(self) -> Document:
        style = self.rng.choices(("statements", "equations", "word_problems"), weights=(6, 2, 2))[0]
        if style == "statements":
            lines = [self._arithmetic_pair()[1] for _ in range(self.rng.randint(3, 6))]
            return Document("arithmetic", " ".join(lines))
        if style == "equations":
            lines = []
            for _ in range(self.rng.randint(3, 6)):
                op = self.rng.choice(tuple(ARITHMETIC_OPS))
                a, b, c = self._operands(op, False)
                lines.append(ARITHMETIC_EQUATIONS[op].format(a=a, b=b, c=c))
            return Document("arithmetic", "\n".join(lines))
        return Document("arithmetic", " ".join(self._word_problem() for _ in range(self.rng.randint(1, 2))))

    def _word_problem(self) -> str:
        r = self.rng
        person, friend = r.sample(self.people, 2)
        op = r.choice(tuple(WORD_PROBLEMS))
        item = r.choice(COUNTABLE_ITEMS)
        if op == "plus":
            a, b = r.randint(1, 12), r.randint(1, 12)
        elif op == "minus":
            a = r.randint(2, 15)
            b = r.randint(1, a)
        else:
            a, b = r.randint(2, 6), r.randint(1, 6)
        c = ARITHMETIC_OPS[op](a, b)
        return WORD_PROBLEMS[op].format(
            name=person.name, friend=friend.name, obj=PRONOUNS[person.pronoun][2], a=a, b=b,
            a_items=_count_noun(a, item), b_items=_count_noun(b, item), c_items=_count_noun(c, item))

    # ---- word games ----------------------------------------------------------------------

    def _word_game_parts(self) -> tuple[str, dict[str, str]]:
        game = self.rng.choice(tuple(WORD_GAME_STATEMENTS))
        word = self.rng.choice(self.game_words)
        parts = {"w": word, "c": ""}
        if game == "spell":
            parts["x"] = " ".join(word)
        elif game == "reverse":
            parts["x"] = word[::-1]
        elif game == "length":
            parts["x"] = str(len(word))
        else:  # count: usually a letter the word has, sometimes one it lacks (the answer is 0)
            letter = self.rng.choice(word) if self.rng.random() < 0.8 else self.rng.choice(string.ascii_lowercase)
            n = word.count(letter)
            parts.update(c=letter, x=f"{n} time" if n == 1 else f"{n} times")
        return game, parts

    def _word_game_pair(self) -> tuple[str, str]:
        game, parts = self._word_game_parts()
        question = self.rng.choice(WORD_GAME_QUESTIONS[game]).format(**parts)
        return _capitalize(question), _capitalize(self.rng.choice(WORD_GAME_STATEMENTS[game]).format(**parts))

    def _word_games(self) -> Document:
        return Document("word_games", " ".join(self._word_game_pair()[1] for _ in range(self.rng.randint(3, 6))))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def write_corpus(path: str | Path, num_bytes: int = 2_000_000, world_seed: int = 0, seed: int = 0,
                 world: World | None = None, mix: CorpusMix | None = None) -> Path:
    """Write the built-in corpus as ``{"text": ...}`` JSONL, one document per line, atomically.

    This is the default pretraining data when the user gives none; it is written in the same JSONL
    format users bring so it goes through the same reader. Pass ``world`` to use a world you already
    have (and save with ``world.save``); otherwise ``World.build(world_seed)`` is used.
    """
    if num_bytes <= 0:
        raise ConfigError(f"num_bytes must be > 0, got {num_bytes}")
    world = world if world is not None else World.build(seed=world_seed)

    def write(f) -> None:
        for text in world.corpus(num_bytes, seed=seed, mix=mix):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")

    return atomic_write(Path(path), write)
