"""Fact knowledge: how many of the world's facts a model prefers over wrong values, scored as lm-eval scores.

Alignment should keep what pretraining learned. This measures it for any stage's model the way
lm-evaluation-harness measures knowledge: every fact of the world becomes a multiple-choice item (its
cloze prefix, "The capital of Veloria is", with the right value among wrong values of the same
attribute), each choice is scored by the log-likelihood of " " + choice after the prefix, and the item
is right when the right value scores highest (`acc`) or highest per character (`acc_norm`).

The items and the arithmetic follow lm-eval exactly (its `_encode_pair` token split, its `acc` and
`acc_norm`), so `fact_knowledge` in-process and lm-eval's `local-completions` on the task that
`write_lm_eval_task` writes give the same figures (benchmarks/lm_eval_facts.py, tests/test_knowledge.py).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from chatforge.data.world import ATTRIBUTES, World
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer

TARGET_DELIMITER = " "  # lm-eval's default: a choice is scored as context + " " + choice


def cloze_prefix(attribute: str, subject: str) -> str | None:
    """The first statement of an attribute whose value comes last, cut before the value."""
    for template in ATTRIBUTES[attribute].statements:
        if template.index("{v}") > template.find("{s}") >= 0:
            return ATTRIBUTES[attribute].statement(subject, "\0").split("\0")[0].rstrip()
    return None


@dataclass(frozen=True)
class FactChoice:
    """One fact as a multiple-choice item: `choices[answer]` is the fact's value, the rest are wrong."""

    context: str  # the cloze prefix, "The capital of Veloria is"
    choices: tuple[str, ...]
    answer: int
    subject: str
    attribute: str


def fact_choices(world: World, num_choices: int = 4, seed: int = 0) -> list[FactChoice]:
    """One item per fact of `world` whose attribute has a cloze prefix, in `world.facts` order.

    Wrong values are other values of the same attribute in the world (`world.values_of`), never the
    subject itself ("Veloria borders Veloria" would be too easy a distractor): distinct, at most
    `num_choices - 1` of them, fewer where the world has fewer; a fact with none is skipped. Which ones,
    and where the right value goes, is drawn from a generator seeded by `seed` and the fact (a string
    seed, hashed by SHA-512 inside `random.Random`), so items are the same in every process.
    """
    if num_choices < 2:
        raise ValueError(f"num_choices must be >= 2, got {num_choices}")
    items = []
    for fact in world.facts:
        context = cloze_prefix(fact.attribute, fact.subject)
        if context is None:
            continue
        pool = [v for v in world.values_of(fact.attribute) if v not in (fact.value, fact.subject)]
        if not pool:
            continue
        rng = random.Random(f"chatforge-facts:{seed}:{fact.subject}:{fact.attribute}")
        choices = rng.sample(pool, min(num_choices - 1, len(pool)))
        answer = rng.randrange(len(choices) + 1)
        choices.insert(answer, fact.value)
        items.append(FactChoice(context, tuple(choices), answer, fact.subject, fact.attribute))
    return items


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of (context, continuation) into token ids (`TemplateLM._encode_pair` and the
    empty-context case of `loglikelihood`): trailing spaces of the context move to the continuation, the
    whole is encoded and the context's own tokens are cut off its front; an empty context is <|endoftext|>."""
    if not context:
        cont = tok.encode(continuation)
        return ([tok.eot_id], cont) if cont[:1] != [tok.eot_id] else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model: GPT, tok: Tokenizer, pairs: list[tuple[str, str]], batch_size: int = 64) -> list[float]:
    """log p(continuation | context) for each (context, continuation), as lm-eval's loglikelihood.

    Teacher-forced: one forward pass per batch of right-padded rows (causal attention, so padding
    after a row cannot change its scores), the continuation tokens' log-probabilities summed. A row
    longer than the context window keeps its last tokens, as lm-eval's Hugging Face model does.
    """
    rows = [encode_pair(tok, context, continuation) for context, continuation in pairs]
    for (context, continuation), (_, cont) in zip(pairs, rows):
        if not cont:
            raise ValueError(f"continuation {continuation!r} after {context!r} has no tokens of its own")
    window = model.config.context_length
    if any(len(cont) > window for _, cont in rows):
        raise ValueError(f"a continuation is longer than the model's context window ({window} tokens)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for start in range(0, len(rows), batch_size):
            batch = [(ctx + cont)[-window - 1:] for ctx, cont in rows[start:start + batch_size]]
            width = max(len(ids) for ids in batch) - 1
            inputs = torch.full((len(batch), width), tok.eot_id, dtype=torch.long)
            targets = torch.full((len(batch), width), tok.eot_id, dtype=torch.long)
            for i, ids in enumerate(batch):
                inputs[i, : len(ids) - 1] = torch.tensor(ids[:-1])
                targets[i, : len(ids) - 1] = torch.tensor(ids[1:])
            logprobs = model(inputs.to(device)).float().log_softmax(-1)
            token_lp = logprobs.gather(-1, targets.to(device).unsqueeze(-1)).squeeze(-1).double().cpu()
            for i, ((_, cont), ids) in enumerate(zip(rows[start:start + batch_size], batch)):
                end = len(ids) - 1
                out.append(float(token_lp[i, end - len(cont): end].sum()))
    finally:
        model.train(was_training)
    return out


def _argmax(scores: list[float]) -> int:
    """The first index of the largest score, as numpy's argmax (which lm-eval uses) breaks ties."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def score_items(items: list[FactChoice], lls: list[float]) -> dict:
    """lm-eval's multiple-choice metrics over `items`, given each choice's log-likelihood in item order:
    `acc` (the right choice has the largest log-likelihood), `acc_norm` (the largest log-likelihood per
    character of the choice, without the delimiter, as lm-eval's `len(choice)`), `n` items and `chance`
    (the mean of 1 / number of choices: what guessing scores)."""
    acc = acc_norm = chance = 0.0
    k = 0
    for item in items:
        scores, k = lls[k:k + len(item.choices)], k + len(item.choices)
        acc += _argmax(scores) == item.answer
        acc_norm += _argmax([s / len(c) for s, c in zip(scores, item.choices)]) == item.answer
        chance += 1 / len(item.choices)
    n = len(items)
    return {"acc": acc / n if n else 0.0, "acc_norm": acc_norm / n if n else 0.0, "n": n,
            "chance": chance / n if n else 0.0}


def fact_knowledge(model: GPT, tok: Tokenizer, world: World, num_choices: int = 4, seed: int = 0,
                   batch_size: int = 64) -> dict:
    """Multiple-choice fact knowledge of `model` over every fact of `world` (see `fact_choices`):
    {"acc", "acc_norm", "n", "chance"}, the figures lm-eval reports on `write_lm_eval_task`'s task."""
    items = fact_choices(world, num_choices, seed)
    pairs = [(item.context, TARGET_DELIMITER + choice) for item in items for choice in item.choices]
    return score_items(items, loglikelihoods(model, tok, pairs, batch_size))


def write_lm_eval_task(world: World, task_dir: str | Path, name: str = "chatforge_facts", num_choices: int = 4,
                       seed: int = 0) -> Path:
    """Write `fact_choices(world, num_choices, seed)` as a local lm-evaluation-harness task and return its
    directory (pass it as `TaskManager(include_path=...)`; run task `name`).

    The data is `name`.jsonl, one {"context", "choices", "answer", "subject", "attribute"} per line; the
    config `name`.yaml (JSON, which YAML reads): multiple choice, text "{{context}}", metrics acc and acc_norm.
    """
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    data = task_dir / f"{name}.jsonl"
    data.write_text("".join(
        json.dumps({"context": it.context, "choices": list(it.choices), "answer": it.answer,
                    "subject": it.subject, "attribute": it.attribute}) + "\n"
        for it in fact_choices(world, num_choices, seed)), encoding="utf-8")
    spec = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data.resolve())},
                               "cache_dir": str(task_dir.resolve() / "cache")},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
            "doc_to_choice": "choices", "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    (task_dir / f"{name}.yaml").write_text(json.dumps(spec, indent=1), encoding="utf-8")
    return task_dir
