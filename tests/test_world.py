"""Tests for the built-in synthetic world and its corpus (chatforge.data.world).

The corpus checks parse the generated text back with regexes written here, independently of the
generator's own templates where that is practical, so a wrong sum or a misspelled word is caught
even if the generator's bookkeeping agrees with itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from chatforge.data import world as world_module
from chatforge.data.readers import iter_documents
from chatforge.data.world import (
    ATTRIBUTES,
    DOCUMENT_KINDS,
    CorpusMix,
    Document,
    Fact,
    World,
    number_to_words,
    write_corpus,
)
from chatforge.errors import ConfigError, DataError

CORPUS_BYTES = 1_000_000


@pytest.fixture(scope="module")
def world() -> World:
    return World.build(seed=0)


@pytest.fixture(scope="module")
def docs(world: World) -> list[Document]:
    return list(world.documents(CORPUS_BYTES, seed=0))


@pytest.fixture(scope="module")
def text(docs: list[Document]) -> str:
    return "\n\n".join(d.text for d in docs)


# ---- the world ---------------------------------------------------------------------------


def test_build_is_deterministic_and_seeded() -> None:
    assert World.build(seed=0) == World.build(seed=0)
    assert World.build(seed=0) != World.build(seed=1)
    assert World.build(seed=0).facts != World.build(seed=1).facts


def test_default_world_size_and_shape(world: World) -> None:
    kinds = Counter(e.kind for e in world.entities)
    assert kinds == {"country": 12, "city": 36, "person": 60}
    assert len(world.facts) == 12 * 5 + 36 * 2 + 60 * 5
    names = [e.name for e in world.entities]
    assert len(set(names)) == len(names)
    for e in world.entities:
        assert re.fullmatch(r"[A-Z][a-z]+", e.name), e.name
        assert set(e.attributes) == {a.name for a in ATTRIBUTES.values() if a.subject_kind == e.kind}


def test_facts_are_consistent(world: World) -> None:
    for country in world.entities_of("country"):
        capital = country.attributes["capital"]
        assert world.lookup(capital, "country") == country.name
        neighbour = country.attributes["neighbour"]
        assert neighbour != country.name
        assert world.lookup(neighbour, "neighbour") == country.name  # borders are symmetric
    for person in world.entities_of("person"):
        assert world.entity(person.attributes["home"]).kind == "city"
        assert 18 <= int(person.attributes["age"]) <= 80
    # Every value refers to the right kind of thing.
    for fact in world.facts:
        kind = ATTRIBUTES[fact.attribute].value_kind
        if kind in ("city", "country"):
            assert world.entity(fact.value).kind == kind


def test_lookup(world: World) -> None:
    for fact in world.facts:
        assert world.lookup(fact.subject, fact.attribute) == fact.value
    with pytest.raises(KeyError, match="no entity named"):
        world.lookup("Atlantis", "capital")
    country = world.entities_of("country")[0].name
    with pytest.raises(KeyError, match="no attribute"):
        world.lookup(country, "pet")
    assert world.facts_about(country) == [f for f in world.facts if f.subject == country]
    assert world.lookup(country, "capital") in world.values_of("capital")


def test_build_validates_arguments() -> None:
    with pytest.raises(ConfigError, match="even"):
        World.build(num_countries=3)
    with pytest.raises(ConfigError, match="cities_per_country"):
        World.build(cities_per_country=0)
    with pytest.raises(ConfigError, match="num_people"):
        World.build(num_people=1)
    small = World.build(seed=3, num_countries=2, cities_per_country=1, num_people=2)
    assert len(small.entities) == 6
    assert list(small.corpus(5_000))  # even the smallest world makes a corpus


def test_save_load_roundtrip(world: World, tmp_path: Path) -> None:
    assert World.from_json(world.to_json()) == world
    path = world.save(tmp_path / "sub" / "world.json")
    assert path.exists() and sorted(os.listdir(path.parent)) == ["world.json"]
    loaded = World.load(path)
    assert loaded == world
    assert loaded.lookup(world.facts[0].subject, world.facts[0].attribute) == world.facts[0].value
    # A loaded world makes the same corpus as the one it was saved from.
    assert list(loaded.corpus(20_000, seed=2)) == list(world.corpus(20_000, seed=2))


def test_load_rejects_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        World.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        World.load(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="not a chatforge world"):
        World.load(bad)
    bad.write_text(json.dumps({"format": "chatforge-world", "version": 1, "seed": 0}))
    with pytest.raises(DataError, match="malformed"):
        World.load(bad)


def test_number_to_words() -> None:
    expected = {0: "zero", 7: "seven", 12: "twelve", 13: "thirteen", 20: "twenty", 21: "twenty-one",
                45: "forty-five", 99: "ninety-nine", 100: "one hundred", 144: "one hundred forty-four"}
    for n, words in expected.items():
        assert number_to_words(n) == words
    with pytest.raises(ValueError):
        number_to_words(1000)


# ---- the corpus: determinism, size, mix ---------------------------------------------------


def test_corpus_is_deterministic(world: World) -> None:
    first = list(world.corpus(50_000, seed=3))
    assert first == list(world.corpus(50_000, seed=3))
    assert first != list(world.corpus(50_000, seed=4))
    assert first != list(World.build(seed=1).corpus(50_000, seed=3))


def test_corpus_does_not_depend_on_hash_seed(world: World) -> None:
    code = ("import hashlib; from chatforge.data.world import World; "
            "print(hashlib.sha256('\\x00'.join(World.build(0).corpus(30_000, seed=1)).encode()).hexdigest())")
    here = hashlib.sha256("\x00".join(world.corpus(30_000, seed=1)).encode()).hexdigest()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == here


def test_corpus_size_is_close_to_request(docs: list[Document]) -> None:
    total = sum(len(d.text.encode()) for d in docs)
    longest = max(len(d.text.encode()) for d in docs)
    assert CORPUS_BYTES <= total < CORPUS_BYTES + longest
    assert all(d.text and d.text == d.text.strip() for d in docs)


def test_corpus_mix(docs: list[Document]) -> None:
    by_kind = Counter()
    for d in docs:
        by_kind[d.kind] += len(d.text)
    shares = CorpusMix().shares()
    assert set(by_kind) == set(DOCUMENT_KINDS) == set(shares)
    for kind, share in shares.items():
        assert by_kind[kind] / sum(by_kind.values()) == pytest.approx(share, abs=0.01)


def test_custom_mix(world: World) -> None:
    only = list(world.documents(20_000, mix=CorpusMix(facts=0, stories=0, dialogues=0, arithmetic=1,
                                                      word_games=0)))
    assert {d.kind for d in only} == {"arithmetic"}
    with pytest.raises(ConfigError):
        list(world.documents(1_000, mix=CorpusMix(facts=-1)))
    with pytest.raises(ConfigError):
        list(world.documents(1_000, mix=CorpusMix(0, 0, 0, 0, 0)))


def test_vocabulary_is_small(text: str) -> None:
    # A tiny BPE tokenizer and a 1-5M-parameter model must be able to learn every word.
    words = set(re.findall(r"[A-Za-z]+", text))
    assert len(words) < 2_000, len(words)


# ---- the corpus: facts ---------------------------------------------------------------------


def _sentences(text: str) -> list[str]:
    """Split text into sentences, dropping dialogue speaker prefixes ("Ana: ")."""
    sentences = re.split(r"(?<=[.?!])[ \n]+|\n+", text)
    return [re.sub(r"^[A-Z][a-z]+: ", "", s) for s in sentences if s]


def _statement_regex(template: str) -> re.Pattern[str]:
    """A regex for one registered statement template, capturing its subject and value."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name == "s":
            parts.append(r"(?P<s>[A-Z][a-z]+)")
        elif name == "v":
            parts.append(r"(?P<v>[A-Za-z0-9]+)")
    return re.compile("".join(parts))


_STATEMENT_REGEXES = [(attr, template, _statement_regex(template))
                      for attr in ATTRIBUTES.values() for template in attr.statements]


@pytest.fixture(scope="module")
def stated(world: World, text: str) -> list[tuple[Fact, str, str]]:
    """Every sentence that is a registered fact statement: (stated fact, true value, template).

    Whole sentences only: "The pet of Mira is a dog." must not read as "Mira is a dog."
    """
    kinds = {e.name: e.kind for e in world.entities}
    found = []
    for sentence in _sentences(text):
        for attr, template, regex in _STATEMENT_REGEXES:
            m = regex.fullmatch(sentence)
            if m and kinds.get(m["s"]) == attr.subject_kind:
                found.append((Fact(m["s"], attr.name, m["v"]), world.lookup(m["s"], attr.name), template))
    return found


def test_every_fact_is_stated_several_times(world: World, stated) -> None:
    counts = Counter(fact for fact, _, _ in stated)
    missing = {f: counts[f] for f in world.facts if counts[f] < 3}
    assert not missing, f"{len(missing)} facts stated fewer than 3 times, e.g. {list(missing.items())[:5]}"


def test_every_phrasing_is_used(stated) -> None:
    used = {template for _, _, template in stated}
    assert used == {template for _, template, _ in _STATEMENT_REGEXES}


def test_no_statement_contradicts_the_world(stated) -> None:
    assert len(stated) > 5_000
    wrong = [(fact, truth) for fact, truth, _ in stated if fact.value != truth]
    assert not wrong, wrong[:5]


def test_documents_report_true_facts(world: World, docs: list[Document]) -> None:
    true_facts = set(world.facts)
    for d in docs:
        assert set(d.facts) <= true_facts
        for fact in d.facts:  # a story may leave the subject implicit ("the river Sena"), never the value
            assert fact.value in d.text
        if d.kind in ("facts", "stories"):
            assert d.facts
        if d.kind in ("arithmetic", "word_games"):
            assert not d.facts


def test_dialogue_format(world: World, docs: list[Document]) -> None:
    people = {e.name for e in world.entities_of("person")}
    dialogues = [d for d in docs if d.kind == "dialogues"]
    assert len(dialogues) > 100
    for d in dialogues:
        speakers = []
        for line in d.text.split("\n"):
            m = re.fullmatch(r"([A-Z][a-z]+): (\S.*)", line)
            assert m, line
            speakers.append(m[1])
        assert len(speakers) % 2 == 0 and set(speakers) <= people and len(set(speakers)) == 2
        assert all(speakers[i] != speakers[i + 1] for i in range(len(speakers) - 1))  # turns alternate


def test_attribute_registry_is_complete() -> None:
    for attr in ATTRIBUTES.values():
        assert attr.questions and attr.statements and attr.followups
        for t in attr.statements:
            assert "{s}" in t and "{v}" in t, t  # one sentence states the whole fact
        for t in attr.questions:
            assert "{s}" in t and "{v}" not in t and t.endswith("?"), t
        for t in attr.followups:
            assert "{s}" not in t and t.endswith("?"), t
    cap = ATTRIBUTES["capital"]
    assert cap.question("Veloria") == "What is the capital of Veloria?"
    assert cap.answer("Veloria", "Kesh") == "The capital of Veloria is Kesh."


# ---- the corpus: arithmetic ------------------------------------------------------------------

_NUM = r"(\d+|[a-z]+(?:-[a-z]+)?)"
_PLUS, _MINUS, _TIMES = (lambda a, b: a + b), (lambda a, b: a - b), (lambda a, b: a * b)
# (regex, operation, whether the groups are in (b, a, c) order)
_ARITHMETIC_PATTERNS = [(re.compile(p, re.IGNORECASE), op, swapped) for p, op, swapped in [
    (rf"{_NUM} plus {_NUM} (?:is|equals) {_NUM}\.", _PLUS, False),
    (rf"the sum of {_NUM} and {_NUM} is {_NUM}\.", _PLUS, False),
    (rf"adding {_NUM} and {_NUM} gives {_NUM}\.", _PLUS, False),
    (rf"{_NUM} minus {_NUM} (?:is|equals) {_NUM}\.", _MINUS, False),
    (rf"the difference between {_NUM} and {_NUM} is {_NUM}\.", _MINUS, False),
    (rf"taking {_NUM} away from {_NUM} leaves {_NUM}\.", _MINUS, True),
    (rf"{_NUM} times {_NUM} (?:is|equals) {_NUM}\.", _TIMES, False),
    (rf"the product of {_NUM} and {_NUM} is {_NUM}\.", _TIMES, False),
    (rf"{_NUM} multiplied by {_NUM} is {_NUM}\.", _TIMES, False),
    (r"(\d+) \+ (\d+) = (\d+)\.", _PLUS, False),
    (r"(\d+) - (\d+) = (\d+)\.", _MINUS, False),
    (r"(\d+) \* (\d+) = (\d+)\.", _TIMES, False),
]]
_WORD_PROBLEMS = [  # (regex, operation); groups: a, noun, b, c, noun
    (r"\b[A-Z][a-z]+ had (\d+) ([a-z]+)\. [A-Z][a-z]+ gave (?:her|him) (\d+) more\. "
     r"Now [A-Z][a-z]+ has (\d+) ([a-z]+)\.", _PLUS),
    (r"\b[A-Z][a-z]+ had (\d+) ([a-z]+) and gave (\d+) to [A-Z][a-z]+\. Now [A-Z][a-z]+ has (\d+) ([a-z]+) left\.",
     _MINUS),
]
_WORD_PROBLEM_TIMES = (r"\b[A-Z][a-z]+ has (\d+) bags with (\d+) ([a-z]+) in each, "
                       r"so [A-Z][a-z]+ has (\d+) ([a-z]+) in all\.")


_NUMBER_WORDS = {number_to_words(n): n for n in range(100)}  # number_to_words is checked above


def _number(token: str) -> int:
    token = token.lower()
    if token.isdigit():
        return int(token)
    assert token in _NUMBER_WORDS, f"not a number: {token!r}"
    return _NUMBER_WORDS[token]


def _check_noun(n: int, noun: str) -> None:
    assert noun.endswith("s") == (n != 1), f"{n} {noun}"


def _check_arithmetic(sentence: str) -> bool:
    """Check one sentence if it is an arithmetic statement; return whether it was one."""
    for pattern, op, swapped in _ARITHMETIC_PATTERNS:
        m = pattern.fullmatch(sentence)
        if m:
            a, b, c = (_number(g) for g in m.groups())
            if swapped:
                a, b = b, a
            assert op(a, b) == c >= 0, sentence
            return True
    return False


def _check_word_problems(text: str) -> tuple[int, str]:
    """Check the word problems (several sentences each) in ``text``; return how many and the rest."""
    checked = 0
    for pattern, op in _WORD_PROBLEMS:
        for m in re.finditer(pattern, text):
            a, noun_a, b, c, noun_c = m.groups()
            assert op(int(a), int(b)) == int(c), m[0]
            _check_noun(int(a), noun_a)
            _check_noun(int(c), noun_c)
            checked += 1
        text = re.sub(pattern, " ", text)
    for m in re.finditer(_WORD_PROBLEM_TIMES, text):
        a, b, noun_b, c, noun_c = m.groups()
        assert int(a) * int(b) == int(c), m[0]
        _check_noun(int(b), noun_b)
        _check_noun(int(c), noun_c)
        checked += 1
    return checked, re.sub(_WORD_PROBLEM_TIMES, " ", text)


def test_arithmetic_is_correct(docs: list[Document], text: str) -> None:
    # Every arithmetic sentence anywhere (dialogue answers included) is right ...
    checked = sum(_check_arithmetic(s) for s in _sentences(text))
    assert checked > 3_000
    # ... and arithmetic documents hold nothing but checked statements and word problems.
    problems = 0
    for d in docs:
        if d.kind == "arithmetic":
            n, rest = _check_word_problems(d.text)
            problems += n
            for sentence in _sentences(rest.strip()):
                assert _check_arithmetic(sentence.strip()), f"unrecognised arithmetic text: {sentence!r}"
    assert problems > 100
    # Both digit and word forms occur.
    assert re.search(r"\b\d+ plus \d+ is \d+\.", text)
    assert re.search(r"\b[a-z]+ plus [a-z]+ (?:is|equals) [a-z-]+\.", text, re.IGNORECASE)


# ---- the corpus: word games -------------------------------------------------------------------

_WORD_GAME_PATTERNS = [
    (r"(?:The word )?([A-Za-z]+) is spelled ((?:[a-z] )*[a-z])\.", lambda w, x: x.replace(" ", "") == w),
    (r"The word ([a-z]+) reversed is ([a-z]+)\.", lambda w, x: x == w[::-1]),
    (r"([A-Za-z]+) spelled backwards is ([a-z]+)\.", lambda w, x: x == w[::-1]),
    (r"The word ([a-z]+) has (\d+) letters\.", lambda w, x: int(x) == len(w)),
    (r"There are (\d+) letters in the word ([a-z]+)\.", lambda x, w: int(x) == len(w)),
    (r"The letter ([a-z]) appears (\d+ times?) in the word ([a-z]+)\.",
     lambda c, x, w: x == (f"{w.count(c)} time" if w.count(c) == 1 else f"{w.count(c)} times")),
    (r"In the word ([a-z]+), the letter ([a-z]) appears (\d+ times?)\.",
     lambda w, c, x: x == (f"{w.count(c)} time" if w.count(c) == 1 else f"{w.count(c)} times")),
]


def _check_word_game(sentence: str) -> bool:
    """Check one sentence if it is a word-game statement; return whether it was one."""
    for pattern, is_right in _WORD_GAME_PATTERNS:
        m = re.fullmatch(pattern, sentence)
        if m:
            assert is_right(*(g.lower() for g in m.groups())), sentence
            return True
    return False


def test_word_games_are_correct(docs: list[Document], text: str) -> None:
    checked = sum(_check_word_game(s) for s in _sentences(text))
    assert checked > 2_000
    for d in docs:
        if d.kind == "word_games":
            for sentence in _sentences(d.text):
                assert _check_word_game(sentence), f"unrecognised word-game text: {sentence!r}"
    assert re.search(r"appears 0 times", text)  # letters a word lacks are asked about too


# ---- writing the corpus -----------------------------------------------------------------------


def test_write_corpus_writes_jsonl(tmp_path: Path) -> None:
    path = write_corpus(tmp_path / "data" / "corpus.jsonl", num_bytes=100_000, world_seed=1, seed=2)
    assert path == tmp_path / "data" / "corpus.jsonl"
    assert os.listdir(path.parent) == ["corpus.jsonl"]  # no temporary file left behind
    lines = path.read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    assert all(isinstance(t, str) and t for t in texts)
    assert all(set(json.loads(line)) == {"text"} for line in lines)
    assert texts == list(World.build(seed=1).corpus(100_000, seed=2))
    # The same reader that reads users' data reads it back unchanged.
    assert list(iter_documents([path])) == texts
    # Passing a world uses it rather than building one.
    again = write_corpus(tmp_path / "again.jsonl", num_bytes=100_000, world=World.build(seed=1), seed=2)
    assert again.read_bytes() == path.read_bytes()


def test_write_corpus_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text("old\n")

    def failing_corpus(self, num_bytes, seed=0, mix=None):
        yield "a first document"
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(world_module.World, "corpus", failing_corpus)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_corpus(path, num_bytes=10_000)
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["corpus.jsonl"]
    with pytest.raises(ConfigError):
        write_corpus(path, num_bytes=0)
