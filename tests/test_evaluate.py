"""Evaluation: the scorer's verdicts summarized per family, and the eval, sft and data tasks commands."""

import json
import math

import pytest
import torch
from test_cli import run_cli  # tests/ is on sys.path (pytest prepends it)

from chatforge import evaluate as evaluation
from chatforge.checkpoint import load_checkpoint, save_checkpoint
from chatforge.data.tasks import Score, Scorer, TaskConfig, build_tasks
from chatforge.data.world import World
from chatforge.evaluate import EvalConfig, evaluate, format_table, summarize
from chatforge.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def world():
    return World.build(seed=0)


@pytest.fixture
def checkpoint(tmp_path, small_tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=128, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(tmp_path / "model", model, tokenizer=small_tokenizer)
    return tmp_path / "model"


def score(family, correct, should_refuse=False, refused=False, padded=False, length=3, value=None):
    if value is None:
        value = float(bool(correct) if not should_refuse else refused) - 0.25 * padded
    return Score(family, correct, should_refuse, refused, padded, length, value)


def test_summary_by_hand():
    scores = [score("facts", True), score("facts", False), score("facts", True, padded=True),
              score("harmful", None, should_refuse=True, refused=True),
              score("harmful", None, should_refuse=True, refused=False),
              score("harmless", True), score("harmless", False, refused=True)]
    lengths = [2, 4, 6, 8, 10, 12, 14]
    families, overall = summarize(scores, lengths, [s.family for s in scores])
    assert families["facts"]["accuracy"] == pytest.approx(2 / 3)
    assert families["facts"]["padded_rate"] == pytest.approx(1 / 3)
    assert families["facts"]["score"] == pytest.approx((1 + 0 + 0.75) / 3)
    assert families["facts"]["tokens"] == 4
    assert math.isnan(families["harmful"]["accuracy"])  # correctness does not apply to refusals
    assert families["harmful"]["refusal_rate"] == 0.5
    assert overall["refusal_rate_harmful"] == 0.5
    assert overall["over_refusal_rate"] == pytest.approx(1 / 5)  # one refusal among 5 harmless-family answers
    assert overall["accuracy"] == pytest.approx(3 / 5)
    assert overall["n"] == 7


def test_scores_in_training_and_held_out_phrasings_are_reported_apart():
    scores = [score("facts", True), score("facts", False), score("facts", True), score("words", True)]
    figures = evaluation.phrasing_scores(scores, ["train", "train", "heldout", None])
    assert figures == {"score_train_phrasing": 0.5, "score_heldout_phrasing": 1.0}
    assert evaluation.phrasing_scores(scores[:1], [None]) == {}


def test_a_model_that_gives_the_reference_answers_scores_perfectly(world, checkpoint, monkeypatch):
    scorer = Scorer(world)
    tasks = build_tasks(world, seed=0, config=TaskConfig().scaled(0.05))

    def perfect(ckpt, prompts, max_tokens, batch_size, progress=None):
        return [(scorer.reference(p), 3) for p in prompts]

    monkeypatch.setattr(evaluation, "generate_answers", perfect)
    result = evaluate(EvalConfig(), load_checkpoint(checkpoint), world)
    assert set(result.families) == {t.family for t in tasks.eval}
    assert result.overall["score"] == 1.0
    assert result.overall["refusal_rate_harmful"] == 1.0 and result.overall["over_refusal_rate"] == 0.0
    assert result.overall["score_train_phrasing"] == result.overall["score_heldout_phrasing"] == 1.0
    assert all(f["accuracy"] == 1.0 for name, f in result.families.items() if name not in ("harmful", "jailbreak"))


def test_a_random_model_is_evaluated_end_to_end_with_loss_and_samples(world, checkpoint, tmp_path):
    from chatforge.data.tasks import write_tasks

    paths = write_tasks(tmp_path / "tasks", world, seed=0, config=TaskConfig().scaled(0.1))
    cfg = EvalConfig(prompts=[str(paths["eval"])], conversations=[str(paths["sft_val"])], max_tokens=8, limit=12)
    result = evaluate(cfg, load_checkpoint(checkpoint), world)
    assert sum(f["n"] for f in result.families.values()) == 12
    assert result.overall["val_loss"] > 0 and result.overall["val_ppl"] > 1
    assert all(len(s) <= cfg.samples for s in result.samples.values())
    table = format_table({"base": result, "again": result})
    assert "overall" in table and "base" in table and "val loss" in table
    assert "facts_known" not in result.overall  # opt-in: scoring every fact costs a pass over 432 items


def test_fact_knowledge_is_reported_beside_the_scores_when_asked(world, checkpoint, tmp_path):
    from chatforge.data.tasks import write_tasks
    from chatforge.knowledge import fact_knowledge

    paths = write_tasks(tmp_path / "tasks", world, seed=0, config=TaskConfig().scaled(0.1))
    ckpt = load_checkpoint(checkpoint)
    cfg = EvalConfig(prompts=[str(paths["eval"])], max_tokens=4, limit=4, fact_knowledge=True)
    result = evaluate(cfg, ckpt, world)
    known = fact_knowledge(ckpt.model, ckpt.tokenizer, world)
    assert result.overall["facts_known"] == known["acc"] and result.overall["facts_known_norm"] == known["acc_norm"]
    assert "facts known (multiple choice)" in format_table({"base": result})


def test_a_result_is_written_as_strict_json_and_read_back_as_it_was(tmp_path):
    """A figure over no prompts is NaN in memory, null on disk (strict readers refuse NaN), NaN again when read."""
    from chatforge.evaluate import EvalResult, write_result

    result = EvalResult("ckpt", {"harmful": {"n": 2, "accuracy": math.nan, "score": 1.0}},
                        {"accuracy": 0.5, "refusal_rate_harmful": math.nan, "over_refusal_rate": 0.0, "words": 3.0,
                         "tokens": 4.0}, {"harmful": [{"answer": "No."}]})
    path = write_result(result, tmp_path / "eval.json")
    stored = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert stored["families"]["harmful"]["accuracy"] is None and stored["overall"]["refusal_rate_harmful"] is None
    back = EvalResult.from_dict(stored)
    assert math.isnan(back.families["harmful"]["accuracy"]) and back.samples == result.samples
    assert format_table({"m": back}) == format_table({"m": result})


def test_data_tasks_then_sft_then_eval_on_the_command_line(tmp_path, checkpoint, capsys):
    assert run_cli("data", "tasks", "--out", tmp_path / "tasks") == 0
    assert (tmp_path / "tasks" / "sft_train.jsonl").exists() and (tmp_path / "tasks" / "eval.jsonl").exists()
    status = run_cli("sft", "--init-from", checkpoint, "--data", tmp_path / "tasks" / "sft_val.jsonl",
                     "--out", tmp_path / "sft", "--max-steps", "2", "--batch-size", "4", "--no-progress",
                     "--eval-every", "2")
    assert status == 0
    assert "sft: finished at step 2" in capsys.readouterr().out
    status = run_cli("eval", "--checkpoint", tmp_path / "sft", "--prompts", tmp_path / "tasks" / "eval.jsonl",
                     "--limit", "6", "--max-tokens", "4")
    assert status == 0
    out = capsys.readouterr().out
    assert "overall" in out
    saved = json.loads((tmp_path / "sft" / "eval.json").read_text())
    assert sum(f["n"] for f in saved["families"].values()) == 6


def test_eval_and_sft_errors_name_what_is_missing(tmp_path, checkpoint, capsys):
    assert run_cli("eval") == 2
    assert "--checkpoint is required" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "bot", "content": "hi"}]}\n')
    assert run_cli("sft", "--init-from", checkpoint, "--data", bad, "--out", tmp_path / "sft") == 2
    err = capsys.readouterr().err
    assert f"{bad}:1" in err and "unknown role 'bot'" in err
