"""Step-by-step answers and two-hop questions in the task world (issue 23, chain of thought).

The formats are pinned by hand-written examples, and the scorer is checked on hand-written responses
(a right answer after its steps, a slip, steps cut off before the answer), so a scorer that merely
agreed with the generator would still be caught.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from chatforge.data.tasks import SPLITS, Labeler, Scorer, TaskConfig, build_items, build_tasks, final_text, write_tasks
from chatforge.data.tasks.answers import _arithmetic_answer, _word_answer
from chatforge.data.tasks.families import _TaskMaker
from chatforge.data.tasks.steps import after_steps, arithmetic_steps, count_steps, reverse_steps
from chatforge.data.tasks.twohop import COMPOSITIONS, chains, read_chain
from chatforge.data.world import ATTRIBUTES, World

SMALL = TaskConfig(sft_train=300, sft_val=60, prefs_train=80, prefs_val=30, rl_train=60, rl_val=30,
                   eval_per_family=10, arithmetic_items_per_op=100)
STEP_FAMILIES = ("arithmetic", "words", "twohop")


@pytest.fixture(scope="module")
def world() -> World:
    return World.build(seed=0)


@pytest.fixture(scope="module")
def scorer(world) -> Scorer:
    return Scorer(world)


# ---- the formats ------------------------------------------------------------------------------


FORMATS = [
    ("What is the word kesh reversed?", reverse_steps("kesh"),
     "Spelled: 1 k 2 e 3 s 4 h. Backwards: 4 h 3 s 2 e 1 k. The word kesh reversed is hsek.",
     reverse_steps("kesh", (1, 1))),
    ("How many e's are in the word kesh?", count_steps("kesh", "e"),
     "Counting e: k 0, e 1, s 1, h 1. The letter e appears 1 time in the word kesh.",
     count_steps("kesh", "e", (1, -1))),
    ("What is 47 plus 285?", arithmetic_steps("plus", 47, 285, False),
     "0 4 7 plus 2 8 5: 7 plus 5 is 12, 4 plus 8 plus 1 is 13, 0 plus 2 plus 1 is 3, so 3 3 2. 47 plus 285 is 332.",
     arithmetic_steps("plus", 47, 285, False, (1, 1))),
    ("What is 285 minus 47?", arithmetic_steps("minus", 285, 47, False),
     "2 8 5 minus 0 4 7: 15 minus 7 is 8, 8 minus 4 minus 1 is 3, 2 minus 0 minus 0 is 2, so 2 3 8. "
     "285 minus 47 is 238.", arithmetic_steps("minus", 285, 47, False, (0, -1))),
    ("What is forty-seven times six?", arithmetic_steps("times", 47, 6, True),
     "4 7 times 6: 7 times 6 is 42, 4 times 6 plus 4 is 28, so 2 8 2. Forty-seven times six is two hundred "
     "eighty-two.", arithmetic_steps("times", 47, 6, True, (0, -1))),
]


@pytest.mark.parametrize("question, answer, expected, slipped", FORMATS)
def test_each_format_is_right_and_a_slip_is_wrong(scorer, question, answer, expected, slipped):
    assert answer == expected
    right = scorer.score(question, answer)
    assert (right.correct, right.padded, right.value) == (True, False, 1.0), right
    assert scorer.reference(question) == answer  # padding is measured against the steps
    wrong = scorer.score(question, slipped)
    assert after_steps(slipped) != slipped and wrong.correct is False and wrong.value == 0.0, slipped
    padded = scorer.score(question, f"Good question! {answer} I hope this helps!")
    assert padded.correct and padded.padded and padded.value == 0.75


def test_the_scorer_reads_the_answer_after_the_steps(scorer):
    cases = [
        # steps cut off before the answer: the numbers inside them never count, even when one is the result
        ("What is 20 minus 19?", "0 2 0 minus 0 1 9: 10 minus 9 is 1", False),
        ("What is 20 minus 19?", arithmetic_steps("minus", 20, 19, False), True),
        ("How many e's are in the word kesh?", "Counting e: k 0, e 1", False),
        ("What is kesh spelled backwards?", "Spelled: 1 k 2 e 3 s 4 h. Backwards: 4 h 3 s 2 e 1 k.", False),
        # the final sentence is what is judged
        ("What is 47 plus 285?", arithmetic_steps("plus", 47, 285, False).replace("is 332.", "is 333."), False),
        ("What is 47 plus 285?", arithmetic_steps("plus", 47, 285, False, (1, 1)).replace("is 342.", "is 332."), True),
        ("How many e's are in the word kesh?", count_steps("kesh", "e") + " Have a nice day!", True),
        # direct answers are still read as before
        ("What is 47 plus 285?", "332", True), ("What is 12 + 30?", "12 + 30 = 42", True),
        ("What is 12 plus 30?", "The answer is: 42.", True), ("What is kesh spelled backwards?", "hsek", True),
        ("How many e's are in the word kesh?", "Once.", True),
    ]
    for question, response, correct in cases:
        assert scorer.score(question, response).correct is correct, (question, response)
    assert after_steps("12 + 30 = 42") == "12 + 30 = 42"


def test_every_item_is_answered_right_and_its_wrong_answer_is_wrong(world, scorer):
    items = build_items(world, 0, SMALL)
    for steps in (True, False):
        maker, rng = _TaskMaker(world, replace(SMALL, step_by_step=steps)), random.Random(0)
        for split in SPLITS:
            for family in STEP_FAMILIES:
                for item in items[split][family][:: 4 if family == "arithmetic" else 2]:
                    task = maker.make(item, rng)
                    right, wrong = scorer.score_all(list(task.prompt), [task.answer, task.wrong])
                    assert right.family == family and right.value == 1.0 and not right.padded, task
                    assert wrong.correct is False and wrong.value == 0.0, task
                    stepped = after_steps(task.answer) != task.answer
                    if family == "twohop":
                        assert task.answer.count(". ") == int(steps), task
                    else:  # reverse and count reason in steps, spell is letter by letter already
                        assert stepped == (steps and item.key[1] != "spell"), task


def test_step_by_step_false_gives_the_direct_answers_to_the_same_prompts(world, tmp_path):
    stepwise, direct = (build_tasks(world, 0, replace(SMALL, step_by_step=s)) for s in (True, False))
    for name in ("rl_train", "rl_val", "eval"):
        assert [t.prompt for t in getattr(stepwise, name)] == [t.prompt for t in getattr(direct, name)], name
    for name in ("sft_train", "sft_val"):
        assert [d.messages[:-1] for d in getattr(stepwise, name)] == [d.messages[:-1] for d in getattr(direct, name)]
    assert [r.prompt for r in stepwise.prefs_train] == [r.prompt for r in direct.prefs_train]
    seen = set()
    for a, b in zip(stepwise.sft_val, direct.sft_val):  # clean demonstrations: the right answer
        answer = b.messages[-1].content
        if b.family == "arithmetic":
            _, op, x, y = b.key
            assert answer in {_arithmetic_answer(op, int(x), int(y), w) for w in (True, False)}, answer
        elif b.family == "words":
            assert answer.startswith("The word") or answer.startswith("The letter"), answer
            assert answer.count(".") == 1 and answer == _word_answer(b.key[1], b.key[2], _letter(answer))
        elif b.family == "twohop":
            assert a.messages[-1].content.endswith(" " + answer) and answer.count(".") == 1, (a, b)
        else:
            assert a.messages[-1].content == answer
        seen.add(b.family)
    assert set(STEP_FAMILIES) <= seen
    for steps in (True, False):
        meta = json.loads(write_tasks(tmp_path / str(steps), world, 0, replace(SMALL.scaled(0.2), step_by_step=steps))
                          ["tasks"].read_text())
        assert meta["config"]["step_by_step"] is steps and "twohop" in meta["families"]


def test_the_data_tasks_command_writes_the_ablation_s_direct_answers(tmp_path):
    from test_cli import run_cli  # tests/ is on sys.path (pytest prepends it)

    assert run_cli("data", "tasks", "--out", tmp_path / "direct", "--no-step-by-step") == 0
    meta = json.loads((tmp_path / "direct" / "tasks.json").read_text())
    assert meta["config"]["step_by_step"] is False
    answers = [json.loads(line)["messages"][-1]["content"] for line in
               (tmp_path / "direct" / "sft_val.jsonl").read_text().splitlines()]
    assert answers and not any(after_steps(a) != a for a in answers)  # no answer shows steps


def _letter(count_answer: str) -> str:
    """The letter a direct count answer is about ("The letter e appears ..."), or "" for another answer."""
    words = count_answer.split()
    return words[2] if count_answer.startswith("The letter") else ""


def test_calc_answers_stay_direct(world):
    tasks = build_tasks(world, 0, replace(SMALL, sft_train=100, prefs_train=20).with_tools())
    calc = [t for t in tasks.eval + tasks.rl_train if t.family == "calc"]
    assert calc and all(after_steps(final_text(t.answer)) == final_text(t.answer) for t in calc)


# ---- two-hop questions ------------------------------------------------------------------------


def test_two_hop_questions_have_one_answer_each(world, scorer):
    found = chains(world)
    assert {c.composition.name for c in found} == set(COMPOSITIONS)
    assert all(3 <= len(c.questions) <= 4 for c in COMPOSITIONS.values())
    answers: dict[str, str] = {}
    for chain in found:
        composition = chain.composition
        if composition.inverse:  # the question names a value only one entity has
            owners = [e.name for e in world.entities if e.attributes.get(composition.first) == chain.subject]
            assert owners == [chain.middle], chain
        assert world.lookup(chain.first.subject, chain.first.attribute) == chain.first.value
        assert world.lookup(chain.middle, chain.second.attribute) == chain.value != chain.subject
        assert read_chain(world, composition, chain.subject.lower()) == chain
        for variant in range(len(composition.questions)):
            question = chain.question(variant)
            assert answers.setdefault(question, chain.value) == chain.value, question
            assert scorer.reference(question) == chain.answer(), question
            assert scorer.family(question) == "twohop"
    assert len(answers) == sum(len(c.composition.questions) for c in found)  # no question asked twice


def test_a_value_two_entities_share_makes_no_two_hop_question(world):
    data = json.loads(world.to_json())  # a copy: to_dict shares the entities' attribute dicts
    countries = [e for e in data["entities"] if e["kind"] == "country"]
    shared = countries[0]["attributes"]["language"]
    countries[1]["attributes"]["language"] = shared
    twin = World.from_dict(data)
    assert not [c for c in chains(twin) if c.composition.first == "language" and c.subject == shared]
    assert any(c.composition.first == "language" for c in chains(twin))
    question = f"What is the capital of the country where people speak {shared}?"
    assert Scorer(twin).family(question) == "unknown" and Scorer(world).family(question) == "twohop"


@pytest.mark.parametrize("seed", [0, 1])
def test_two_hop_items_use_facts_of_their_own_split(world, seed):
    items = build_items(world, seed, SMALL)
    split_of = {item.key: split for split in SPLITS for item in items[split]["facts"]}
    for split in SPLITS:
        assert items[split]["twohop"], split
        for item in items[split]["twohop"]:
            _, _, s1, a1, s2, a2 = item.key
            assert split_of[("fact", s1, a1)] == split_of[("fact", s2, a2)] == split, item
    keys = [item.key for split in SPLITS for item in items[split]["twohop"]]
    assert len(keys) == len(set(keys))


def test_the_scorer_judges_the_final_value_and_the_intermediate_entity(world, scorer):
    chain = next(c for c in chains(world) if c.composition.name == "capital_language")
    other = next(e for e in world.entities_of("country") if e.name not in (chain.middle,))
    other_language = other.attributes["language"]
    question = chain.question(0)
    language = ATTRIBUTES["language"]
    capital = ATTRIBUTES["capital"]
    cases = [
        (chain.answer(), True), (chain.answer(steps=False), True), (chain.value, True),
        (f"{capital.answer(chain.middle, chain.subject)} {language.answer(chain.middle, other_language)}", False),
        (f"{capital.answer(other.name, chain.subject)} {language.answer(other.name, other_language)}", False),
        # a wrong intermediate country is wrong even when the final value is right
        (f"{capital.answer(other.name, chain.subject)} {language.answer(other.name, chain.value)}", False),
        (f"They speak {chain.value} or {other_language}.", False),  # hedging
    ]
    for response, correct in cases:
        assert scorer.score(question, response).correct is correct, response
    verbose = scorer.score(question, f'You asked: "{question}" {chain.answer()}')
    assert verbose.correct and verbose.padded


def test_the_labeler_ranks_right_steps_above_right_direct_answers_and_wrong_ones(scorer, world):
    question = "What is 47 plus 285?"
    right, slip = arithmetic_steps("plus", 47, 285, False), arithmetic_steps("plus", 47, 285, False, (1, 1))
    padded = f"Good question! {right}"
    direct = "47 plus 285 is 332."
    ranked = Labeler(scorer).rank(question, [slip, "I can't help with that.", padded, direct, right, "331"])
    assert ranked[:3] == [right, direct, padded]  # steps before the shorter direct answer; padding last
    chain = next(c for c in chains(world) if c.composition.name == "home_country")
    wrong = chain.answer().replace(chain.value, next(e.name for e in world.entities_of("country")
                                                    if e.name != chain.value))
    ranked = Labeler(scorer).rank(chain.question(0), [wrong, chain.answer(), chain.answer(steps=False)])
    assert set(ranked[:2]) == {chain.answer(), chain.answer(steps=False)} and ranked[2] == wrong
