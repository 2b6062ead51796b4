"""DPO: the sigmoid loss by hand, reference log-probs precomputed, training on preferences end to end."""

import json
import math

import pytest
import torch

from chatforge.chat import ChatTemplate, Message
from chatforge.checkpoint import load_checkpoint, save_checkpoint
from chatforge.data.chat_readers import Preference
from chatforge.errors import ConfigError
from chatforge.model import GPT, GPTConfig
from chatforge.train.config import DPOConfig, TrainConfig
from chatforge.train.distributed import DistInfo
from chatforge.train.dpo import (
    collate_side,
    dpo_loss,
    encode_pair,
    pair_picks,
    pairs_trained,
    run_dpo,
    sequence_logprobs,
)

QUESTIONS = ["What is the capital of Veloria?", "Where does Mira live?", "What is 3 plus 4?", "Who has a dog?"]


def test_the_dpo_loss_and_implicit_rewards_by_hand():
    pc, pr, rc, rr = torch.tensor([-3.0, -2.0]), torch.tensor([-4.0, -1.0]), torch.tensor([-3.5]), torch.tensor([-3.0])
    loss, m = dpo_loss(pc, pr, rc.expand(2), rr.expand(2), beta=0.5)
    z = [0.5 * ((-3.0 + 3.5) - (-4.0 + 3.0)), 0.5 * ((-2.0 + 3.5) - (-1.0 + 3.0))]  # 0.75, -0.25
    assert loss.item() == pytest.approx(sum(math.log(1 + math.exp(-v)) for v in z), abs=1e-6)
    assert m["accuracy"].item() == 1.0 and m["margin"].item() == pytest.approx(sum(z))
    assert m["reward_chosen"].item() == pytest.approx(0.5 * 0.5 + 0.5 * 1.5)


def tiny_gpt(tokenizer) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=64, n_layer=1, n_head=2, n_embd=16))


def test_sequence_log_probs_count_only_the_answer_and_its_end_token(small_tokenizer):
    model = tiny_gpt(small_tokenizer)
    template = ChatTemplate(small_tokenizer)
    pref = Preference([Message("user", QUESTIONS[0])], ["Kesh.", "No idea."])
    (chosen, trained), _ = encode_pair(template, pref, *pref.responses[0:2], seq_len=64)
    n = len(small_tokenizer.encode("Kesh.")) + 1
    assert trained == [False] * (len(chosen) - n) + [True] * n
    ids, mask = collate_side([(chosen, trained)], pad_id=0)
    logp = torch.log_softmax(model(ids)[0, :-1], -1)
    start = len(chosen) - 1 - n
    by_hand = sum(logp[t, chosen[t + 1]] for t in range(start, len(chosen) - 1))
    assert sequence_logprobs(model, ids, mask).item() == pytest.approx(by_hand.item(), abs=1e-5)


@pytest.mark.parametrize("seq_len", [64, 12, 4])
def test_a_text_response_is_encoded_and_summed_as_it_always_was(small_tokenizer, seq_len):
    """Generation prompt + text + <|end|>, cut from the left; the sum runs over the answer's last n tokens, where n
    is the answer's length but never the first token (nothing predicts it)."""
    template = ChatTemplate(small_tokenizer)
    prompt = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello."),
              Message("user", QUESTIONS[1])]  # the prompt's own assistant turn is never summed
    pref = Preference(prompt, ["Mira lives in Kesh.", "No idea."])
    answer = small_tokenizer.encode("Mira lives in Kesh.") + [template.end_id]
    old_ids = (template.generation_prompt(prompt) + answer)[-seq_len:]
    n = min(len(answer), len(old_ids) - 1)
    old_mask = torch.zeros(len(old_ids) - 1)
    old_mask[len(old_ids) - 1 - n :] = 1.0
    side = encode_pair(template, pref, *pref.responses, seq_len=seq_len)[0]
    assert side[0] == old_ids
    ids, mask = collate_side([side], pad_id=0)
    assert ids[0].tolist() == old_ids and mask[0].tolist() == old_mask.tolist()


def calculator_preference() -> Preference:
    """12*7 with the calculator (call, result, answer) over a guess; the calculator declared."""
    calculator = {"name": "calculator", "parameters": {"type": "object"}}
    used = [Message("tool_call", '{"name": "calculator", "arguments": {"expression": "12*7"}}'),
            Message("tool_result", "84"), Message("assistant", "It is 84.")]
    return Preference([Message("user", "What is 12*7?")], [used, "It is 85."], tools=[calculator])


def test_a_response_with_tool_turns_sums_the_calls_and_answers_but_not_the_tool_results(small_tokenizer):
    template, tok = ChatTemplate(small_tokenizer), small_tokenizer
    pref = calculator_preference()
    (ids, trained), _ = encode_pair(template, pref, *pref.responses, seq_len=1000)
    assert ids == template.render(pref.conversation(pref.responses[0])).ids  # tools in the system turn
    call = tok.encode('{"name": "calculator", "arguments": {"expression": "12*7"}}')
    assert [t for t, m in zip(ids, trained) if m] == [template.tool_call_id, *call, template.end_id,
                                                      *tok.encode("It is 84."), template.end_id]
    # the log-prob sum is over those positions only: logits that predict the tool result change nothing
    logits = torch.randn(1, len(ids), tok.vocab_size)
    ids_t, mask = collate_side([(ids, trained)], pad_id=0)
    result_at, answer_at = ids.index(template.role_ids["tool_result"]), len(ids) - len(tok.encode("It is 84.")) - 1
    predicts_result = slice(result_at - 1, answer_at - 1)  # <|tool_result|>84<|end|><|assistant|>
    assert ids[answer_at - 1] == template.role_ids["assistant"]
    moved = logits.clone()
    moved[0, predicts_result] += 5 * torch.randn_like(moved[0, predicts_result])
    summed = sequence_logprobs(lambda _: logits, ids_t, mask).item()
    assert sequence_logprobs(lambda _: moved, ids_t, mask).item() == summed
    logp = torch.log_softmax(logits[0], -1)
    by_hand = sum(logp[t - 1, ids[t]] for t in range(1, len(ids)) if trained[t])
    assert summed == pytest.approx(by_hand.item(), rel=1e-6)
    moved[0, answer_at - 1, ids[answer_at]] += 5.0  # the first token of "It is 84." counts
    assert sequence_logprobs(lambda _: moved, ids_t, mask).item() != pytest.approx(summed, abs=1e-5)


def test_tokens_cut_from_the_left_keep_their_marks_and_the_first_is_never_summed(small_tokenizer):
    template = ChatTemplate(small_tokenizer)
    pref = calculator_preference()
    full_ids, full_trained = encode_pair(template, pref, *pref.responses, seq_len=1000)[0]
    ids, trained = encode_pair(template, pref, *pref.responses, seq_len=10)[0]
    assert ids == full_ids[-10:] and trained[1:] == full_trained[-9:] and trained[0] is False


@pytest.fixture
def sft(tmp_path, small_tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=64, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / "sft", model, tokenizer=small_tokenizer)
    records = [{"prompt": q, "responses": ["Kesh.", "Maybe Kesh.", "I do not know, sorry."]} for q in QUESTIONS]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records * 3))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    return tmp_path


def dpo_config(root, **train):
    settings = dict(max_steps=20, batch_size=8, lr=3e-3, warmup_steps=1, eval_every=20, save_every=20, log_every=1,
                    progress=False)
    settings.update(train)
    return DPOConfig(data=[str(root / "prefs.jsonl")], val=[str(root / "val.jsonl")], init_from=str(root / "sft"),
                     out=str(root / "dpo"), beta=0.1, train=TrainConfig(**settings))


def test_dpo_starts_at_log_2_learns_the_preferences_and_changes_every_weight(sft):
    before = load_checkpoint(sft / "sft").model.state_dict()
    result = run_dpo(dpo_config(sft), DistInfo())
    first, last = result.metrics[0], result.metrics[-1]
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    assert first["train/margin"] == pytest.approx(0.0, abs=1e-4)
    assert last["val/accuracy"] == 1.0 and last["val/margin"] > 0
    assert last["train/reward_chosen"] > last["train/reward_rejected"]
    after = load_checkpoint(sft / "dpo").model.state_dict()
    assert [k for k in before if torch.equal(before[k], after[k])] == []


def test_rpo_adds_the_chosen_answers_mean_token_nll_by_hand(sft):
    """RPO: each pair's loss plus alpha times the chosen answer's NLL per trained token."""
    from chatforge.train.dpo import PairObjective

    model = load_checkpoint(sft / "sft").model
    plain = PairObjective([None], [], 2, 0, 0, beta=0.1)
    rpo = PairObjective([None], [], 2, 0, 0, beta=0.1, rpo_alpha=0.7)
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 10, 0, 0]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0, 0.0]])[:, 1:]  # 3 tokens, then 1
    batch = {"chosen_ids": ids, "chosen_mask": mask, "rejected_ids": ids.flip(0), "rejected_mask": mask.flip(0),
             "ref_chosen": torch.tensor([-9.0, -3.0]), "ref_rejected": torch.tensor([-4.0, -8.0])}
    (base, _), (loss, metrics) = plain.loss(model, batch), rpo.loss(model, batch)
    logp = torch.log_softmax(model(ids)[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    nll = [-(logp[0, 1:4].sum() / 3), -logp[1, 0]]
    assert loss.item() == pytest.approx(base.item() + 0.7 * (nll[0] + nll[1]).item(), abs=1e-5)
    assert metrics["nll_chosen"].item() == pytest.approx((nll[0] + nll[1]).item(), abs=1e-5)


def test_rpo_keeps_the_chosen_answers_likelier_than_plain_dpo(sft):
    plain = run_dpo(dpo_config(sft), DistInfo()).metrics[-1]
    cfg = dpo_config(sft)
    cfg.rpo_alpha, cfg.out = 1.0, str(sft / "rpo")
    rpo = run_dpo(cfg, DistInfo()).metrics[-1]
    assert rpo["train/nll_chosen"] > 0 and rpo["val/margin"] > 0  # it still prefers the chosen answers
    # the implicit reward of the chosen answers is beta * (log pi - log ref): higher when they stay likely
    assert rpo["train/reward_chosen"] > plain["train/reward_chosen"]
    assert rpo["val/reward_chosen"] > plain["val/reward_chosen"]


def test_the_reference_scores_only_the_pairs_a_short_run_draws(sft, capsys):
    assert pairs_trained(10, 4, 0, 3) == list(range(10))  # a run past one epoch draws every pair
    drawn = pairs_trained(100, 4, 0, 3)
    assert drawn == sorted({i for step in range(3) for i in pair_picks(100, 4, 0, step)}) and len(drawn) == 12
    result = run_dpo(dpo_config(sft, max_steps=2, batch_size=4, eval_every=2, save_every=2), DistInfo())
    assert "precomputed for the 8 pairs the run trains on" in capsys.readouterr().out  # of 36 pairs
    assert result.metrics[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # the drawn pairs' references


def test_dpo_trains_on_a_file_mixing_text_and_tool_turn_responses(sft):
    calculator = {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}
    call = {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "3+4"}'}}
    used = [{"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "7"}, {"role": "assistant", "content": "Seven."}]
    records = [{"prompt": QUESTIONS[2], "chosen": used, "rejected": "Eight.", "tools": [calculator]},
               {"prompt": QUESTIONS[0], "responses": ["Kesh.", used[-1:], "I do not know, sorry."]}]
    (sft / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = dpo_config(sft, max_steps=2, batch_size=4, eval_every=2, save_every=2)
    cfg.data, cfg.val = [str(sft / "mixed.jsonl")], [str(sft / "mixed.jsonl")]
    result = run_dpo(cfg, DistInfo())
    assert result.metrics[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # 4 pairs, policy == reference
    assert math.isfinite(result.metrics[-1]["val/loss"])


def test_dpo_needs_a_starting_checkpoint_and_data():
    with pytest.raises(ConfigError, match="--init-from"):
        run_dpo(DPOConfig(data=["x"]), DistInfo())
    with pytest.raises(ConfigError, match="--data"):
        run_dpo(DPOConfig(init_from="x"), DistInfo())


def test_dpo_on_the_command_line(sft, capsys):
    from test_cli import run_cli

    status = run_cli("dpo", "--init-from", sft / "sft", "--data", sft / "prefs.jsonl", "--val", sft / "val.jsonl",
                     "--out", sft / "cli", "--max-steps", "2", "--batch-size", "4", "--no-progress")
    assert status == 0
    assert "held-out implicit-reward accuracy" in capsys.readouterr().out
