"""Fact knowledge, specified: the world's facts as multiple-choice items, scored the way lm-eval scores them.

Every figure is checked against a computation done here by hand: items against the world and its
statement templates, log-likelihoods against log_softmax of one plain forward pass over context +
continuation (split into tokens as lm-eval's `_encode_pair` splits), acc and acc_norm against an argmax
over those. The slow test runs lm-evaluation-harness itself (`local-completions` against our server) on
the task `write_lm_eval_task` writes and finds the same per-choice log-likelihoods and the same figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from chatforge.data.world import ATTRIBUTES, World
from chatforge.knowledge import (
    FactChoice,
    cloze_prefix,
    fact_choices,
    fact_knowledge,
    loglikelihoods,
    write_lm_eval_task,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def world() -> World:
    """4 countries, 4 cities, 3 people (43 facts): some attributes have 3 wrong values, some fewer."""
    return World.build(seed=0, num_countries=4, cities_per_country=1, num_people=3)


def spread(model):
    """A random tiny GPT whose choices score well apart (no near-ties for argmax to fall either way)."""
    with torch.no_grad():
        model.wte.weight.mul_(10)
    return model


@pytest.fixture(scope="module")
def tiny(make_tiny_gpt, small_tokenizer):
    return spread(make_tiny_gpt(128)), small_tokenizer


def hand_ll(model, tok, context: str, continuation: str) -> float:
    """lm-eval's loglikelihood, by hand: trailing spaces of the context go to the continuation; encode the
    whole and the context; the continuation's tokens are the whole's after the context's; sum their
    log-probabilities from one forward pass over the whole."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole, ctx = tok.encode(stripped + continuation), tok.encode(stripped)
    assert whole[: len(ctx)] == ctx
    with torch.no_grad():
        lp = model(torch.tensor([whole]))[0].double().log_softmax(-1)
    return sum(float(lp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def hand_argmax(scores: list[float]) -> int:
    best = 0
    for i, s in enumerate(scores):
        if s > scores[best]:
            best = i
    return best


# ---- items ------------------------------------------------------------------------------------------------


def test_one_item_per_fact_whose_context_and_value_begin_its_statement(world):
    items = fact_choices(world)
    assert all(cloze_prefix(a, "Veloria") is not None for a in ATTRIBUTES)  # every attribute has a cloze
    assert [(i.subject, i.attribute) for i in items] == [(f.subject, f.attribute) for f in world.facts]
    assert items[0].context == f"The capital of {world.facts[0].subject} is"
    for item, fact in zip(items, world.facts):
        assert isinstance(item, FactChoice)
        assert item.choices[item.answer] == fact.value
        # "The capital of Veloria is" + " " + "Kesh" starts the fact's first statement with the value last
        statement = next(ATTRIBUTES[fact.attribute].statement(fact.subject, fact.value, k)
                         for k, t in enumerate(ATTRIBUTES[fact.attribute].statements) if t.find("{s}") < t.index("{v}"))
        assert statement.startswith(item.context + " " + fact.value)
        assert item.context == item.context.rstrip()


@pytest.mark.parametrize("num_choices", [2, 4, 6])
def test_wrong_values_are_distinct_other_values_of_the_attribute(world, num_choices):
    counts = set()
    for item in fact_choices(world, num_choices=num_choices):
        value = item.choices[item.answer]
        pool = set(world.values_of(item.attribute)) - {value, item.subject}
        wrong = [c for k, c in enumerate(item.choices) if k != item.answer]
        assert len(set(item.choices)) == len(item.choices)
        assert set(wrong) <= pool
        assert len(item.choices) == min(num_choices, 1 + len(pool))
        counts.add(len(item.choices))
    if num_choices == 4:
        assert 4 in counts and min(counts) < 4  # the small world has attributes with fewer than 3 wrong values


def test_a_fact_without_a_wrong_value_is_skipped():
    w = World.build(seed=0, num_countries=2, cities_per_country=1, num_people=2)
    items = fact_choices(w)
    # two countries border each other: the only other country is the subject itself
    assert {(f.subject, f.attribute) for f in w.facts} - {(i.subject, i.attribute) for i in items} == {
        (e.name, "neighbour") for e in w.entities_of("country")}
    assert all(len(i.choices) >= 2 for i in items)


def test_items_are_the_same_for_a_seed_in_every_process_and_differ_for_another_seed(world):
    items = fact_choices(world, seed=0)
    assert items == fact_choices(world, seed=0)
    other = fact_choices(world, seed=1)
    assert [(i.choices, i.answer) for i in other] != [(i.choices, i.answer) for i in items]
    assert len({i.answer for i in items if len(i.choices) == 4}) > 1  # the right value is not always first
    code = ("import json; from chatforge.data.world import World; from chatforge.knowledge import fact_choices; "
            "w = World.build(seed=0, num_countries=4, cities_per_country=1, num_people=3); "
            "print(json.dumps([[i.choices, i.answer] for i in fact_choices(w)]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [[list(i.choices), i.answer] for i in items]


# ---- log-likelihoods --------------------------------------------------------------------------------------


def test_loglikelihoods_equal_a_plain_forward_pass_split_like_lm_eval(tiny):
    model, tok = tiny
    pairs = [("The capital of Veloria is", " Kesh"), ("The capital of Veloria is", " Mira"),
             ("Mira walked her ", "dog"),  # trailing space: scored as "Mira walked her" + " dog"
             ("Mira walked her", " dog"), ("7 plus 7 is", " 14"), ("Q", " a much longer answer than the others")]
    want = [hand_ll(model, tok, c, x) for c, x in pairs]
    assert loglikelihoods(model, tok, pairs) == pytest.approx(want, abs=TOL)
    assert loglikelihoods(model, tok, pairs, batch_size=2) == pytest.approx(want, abs=TOL)  # padding is inert
    got = loglikelihoods(model, tok, pairs)
    assert got[2] == pytest.approx(got[3], abs=1e-9)
    assert model.training is False


def test_loglikelihoods_keep_the_last_tokens_of_a_row_longer_than_the_window(make_tiny_gpt, small_tokenizer):
    model, tok = spread(make_tiny_gpt(16)), small_tokenizer
    context = " ".join(f"{i} plus {i} is {2 * i}." for i in range(6))
    ctx, whole = tok.encode(context), tok.encode(context + " Kesh")
    assert len(whole) > 17 and whole[: len(ctx)] == ctx
    kept = whole[-17:]  # 16 inputs predict the last 16 tokens
    with torch.no_grad():
        lp = model(torch.tensor([kept[:-1]]))[0].double().log_softmax(-1)
    n = len(whole) - len(ctx)
    want = sum(float(lp[i, kept[i + 1]]) for i in range(16 - n, 16))
    assert loglikelihoods(model, tok, [(context, " Kesh")]) == pytest.approx([want], abs=TOL)


def test_fact_knowledge_is_the_argmax_over_hand_loglikelihoods(tiny, world):
    model, tok = tiny
    items = fact_choices(world, num_choices=3, seed=7)
    acc = acc_norm = chance = 0
    for item in items:
        scores = [hand_ll(model, tok, item.context, " " + c) for c in item.choices]
        acc += hand_argmax(scores) == item.answer
        acc_norm += hand_argmax([s / len(c) for s, c in zip(scores, item.choices)]) == item.answer
        chance += 1 / len(item.choices)
    got = fact_knowledge(model, tok, world, num_choices=3, seed=7)
    assert got == pytest.approx({"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items),
                                 "chance": chance / len(items)})
    assert 0 < got["acc"] < 1 and got["acc"] != got["acc_norm"]  # a case where the two differ


# ---- lm-evaluation-harness through the server ---------------------------------------------------------------


@pytest.mark.slow
def test_lm_eval_scores_the_written_task_like_fact_knowledge(lm_eval_offline, tmp_path, server, tiny):
    pytest.importorskip("openai")
    from lm_eval.tasks import TaskManager

    from chatforge.checkpoint import export_hf

    model, tok = tiny
    w = World.build(seed=0, num_countries=2, cities_per_country=1, num_people=2)
    task_dir = write_lm_eval_task(w, tmp_path / "tasks", name="facts_small")
    hf_dir = export_hf(model, tok, tmp_path / "hf")
    out = lm_eval_offline.evaluator.simple_evaluate(
        model="local-completions",
        model_args={"model": "tiny", "base_url": server.url + "/v1/completions", "tokenizer": str(hf_dir),
                    "tokenizer_backend": "huggingface", "max_retries": 1, "max_length": 128},
        tasks=["facts_small"], task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True, num_fewshot=0, bootstrap_iters=0)
    items = fact_choices(w)
    samples = sorted(out["samples"]["facts_small"], key=lambda s: s["doc_id"])
    assert len(samples) == len(items)
    pairs = [(i.context, " " + c) for i in items for c in i.choices]
    ours = loglikelihoods(model, tok, pairs)
    theirs = [resp[0][0] for s in samples for resp in s["resps"]]
    assert [tuple(a) for s in samples for a in s["arguments"]] == pairs  # what lm-eval asked: our pairs
    assert theirs == pytest.approx(ours, abs=TOL)
    assert theirs == pytest.approx([hand_ll(model, tok, c, x) for c, x in pairs], abs=TOL)
    mine = fact_knowledge(model, tok, w)
    results = out["results"]["facts_small"]
    assert results["acc,none"] == pytest.approx(mine["acc"])
    assert results["acc_norm,none"] == pytest.approx(mine["acc_norm"])
    assert mine["n"] == len(items)
