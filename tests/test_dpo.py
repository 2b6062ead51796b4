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
from chatforge.train.dpo import collate_side, dpo_loss, encode_pair, run_dpo, sequence_logprobs

QUESTIONS = ["What is the capital of Veloria?", "Where does Mira live?", "What is 3 plus 4?", "Who has a dog?"]


def test_the_dpo_loss_and_implicit_rewards_by_hand():
    pc, pr, rc, rr = torch.tensor([-3.0, -2.0]), torch.tensor([-4.0, -1.0]), torch.tensor([-3.5]), torch.tensor([-3.0])
    loss, m = dpo_loss(pc, pr, rc.expand(2), rr.expand(2), beta=0.5)
    z = [0.5 * ((-3.0 + 3.5) - (-4.0 + 3.0)), 0.5 * ((-2.0 + 3.5) - (-1.0 + 3.0))]  # 0.75, -0.25
    assert loss.item() == pytest.approx(sum(math.log(1 + math.exp(-v)) for v in z), abs=1e-6)
    assert m["accuracy"].item() == 1.0 and m["margin"].item() == pytest.approx(sum(z))
    assert m["reward_chosen"].item() == pytest.approx(0.5 * 0.5 + 0.5 * 1.5)


def test_sequence_log_probs_count_only_the_answer_and_its_end_token(small_tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=64, n_layer=1, n_head=2, n_embd=16))
    template = ChatTemplate(small_tokenizer)
    pref = Preference([Message("user", QUESTIONS[0])], ["Kesh.", "No idea."])
    (chosen, n), _ = encode_pair(template, pref, "Kesh.", "No idea.", seq_len=64)
    assert n == len(small_tokenizer.encode("Kesh.")) + 1
    ids, mask = collate_side([(chosen, n)], pad_id=0)
    logp = torch.log_softmax(model(ids)[0, :-1], -1)
    start = len(chosen) - 1 - n
    by_hand = sum(logp[t, chosen[t + 1]] for t in range(start, len(chosen) - 1))
    assert sequence_logprobs(model, ids, mask).item() == pytest.approx(by_hand.item(), abs=1e-5)


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
