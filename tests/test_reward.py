"""The reward-model stage: rankings in one batch row per prompt, training, metrics, normalization."""

import json
import statistics

import pytest
import torch

from chatforge.chat import ChatTemplate, Conversation, Message
from chatforge.checkpoint import load_checkpoint, read_json, save_checkpoint
from chatforge.errors import ConfigError
from chatforge.model import GPT, GPTConfig, ScalarHeadModel, ranking_loss
from chatforge.train.config import TrainConfig
from chatforge.train.distributed import DistInfo
from chatforge.train.reward import (
    RankingObjective,
    RewardConfig,
    collate_groups,
    pair_metrics,
    response_ids,
    run_reward,
    sample_answer_sets,
    sample_answers,
    score_texts,
    set_normalization,
)

QUESTIONS = ["What is the capital of Veloria?", "Where does Mira live?", "What is 3 plus 4?", "Is it sunny?",
             "Who has a dog?", "What does Kesh sell?"]


@pytest.fixture
def sft_checkpoint(tmp_path, small_tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=64, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / "sft", model, tokenizer=small_tokenizer)
    return tmp_path / "sft"


def write_prefs(path, questions):
    records = []
    for i, q in enumerate(questions):
        if i % 2:  # ranked, 3 responses
            records.append({"prompt": q, "responses": ["Kesh.", "Maybe Kesh.", "I do not know, sorry."]})
        else:  # pairwise, chat-format prompt
            records.append({"prompt": [{"role": "user", "content": q}], "chosen": "Kesh.",
                            "rejected": "I do not know, sorry."})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_a_batch_row_holds_all_of_a_prompts_responses_and_every_prompt_weighs_the_same():
    groups = [[[1, 2, 3], [1, 2]], [[4, 5], [4], [4, 5, 6, 7]]]
    batch = collate_groups(groups, pad_id=0)
    assert batch["input_ids"].shape == (2, 3, 4)
    assert batch["lengths"].tolist() == [[3, 2, 0], [2, 1, 4]]
    objective = RankingObjective(groups, groups, batch_size=2, pad_id=0, seed=0)
    assert objective.weight(batch) == 2


def test_the_objective_loss_is_the_ranking_loss_of_each_group_scored_one_response_at_a_time(tiny_model):
    model = ScalarHeadModel(tiny_model).eval()
    groups = [[[1, 2, 3], [1, 2]], [[4, 5], [4], [4, 5, 6, 7]]]
    alone = [torch.cat([model(torch.tensor([r]), torch.tensor([len(r)])) for r in g]) for g in groups]
    expected = ranking_loss(alone[0], [2]) + ranking_loss(alone[1], [3])
    loss, metrics = RankingObjective(groups, groups, 2, 0, 0).loss(model, collate_groups(groups, pad_id=0))
    assert torch.allclose(loss, expected, atol=1e-6)
    assert set(metrics) == {"accuracy", "margin"}


def test_pair_metrics_by_hand():
    scores = torch.tensor([3.0, 1.0, 2.0, 0.0, 1.0])  # group 1: [3, 1, 2]; group 2: [0, 1] (wrong order)
    m = pair_metrics(scores, [3, 2])
    # group 1 pairs: (3,1) ok, (3,2) ok, (1,2) wrong -> 2/3; margins 2, 1, -1 -> 2/3. group 2: 0/1, margin -1
    assert m["accuracy"].item() == pytest.approx(2 / 3 + 0)
    assert m["margin"].item() == pytest.approx(2 / 3 - 1)


@pytest.mark.parametrize("seq_len", [64, 9])
def test_a_text_response_is_the_generation_prompt_the_text_and_end_as_it_always_was(small_tokenizer, seq_len):
    template = ChatTemplate(small_tokenizer)
    prompt = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello."),
              Message("user", QUESTIONS[1])]
    before = template.generation_prompt(prompt) + small_tokenizer.encode("In Kesh.") + [template.end_id]
    assert response_ids(template, prompt, "In Kesh.", seq_len) == before[-seq_len:]
    assert response_ids(template, prompt, [Message("assistant", "In Kesh.")], seq_len) == before[-seq_len:]


CALCULATOR = {"name": "calc", "parameters": {"type": "object"}}


def used_calc(result: str, answer: str = "It is 84.") -> list[Message]:
    """An answer that used a tool: the call, its result, the final answer."""
    return [Message("tool_call", '{"name": "calc", "arguments": {"x": "12*7"}}'), Message("tool_result", result),
            Message("assistant", answer)]


def test_a_response_with_tool_turns_is_scored_on_the_whole_conversation(small_tokenizer):
    template = ChatTemplate(small_tokenizer)
    prompt = Conversation([Message("user", "12*7?")], tools=[CALCULATOR])
    ids = response_ids(template, prompt, used_calc("84"), 1000)
    assert ids == template.render(Conversation([*prompt.messages, *used_calc("84")], [CALCULATOR])).ids
    assert ids[-1] == template.end_id  # read at the closing <|end|> of the final answer
    torch.manual_seed(0)
    model = ScalarHeadModel(GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=256, n_layer=1,
                                          n_head=2, n_embd=16))).eval()
    right, wrong = score_texts(model, template, [prompt, prompt], [used_calc("84"), used_calc("85")])
    assert right != wrong  # the tool's result is read: only it differs


def test_reward_training_on_a_file_mixing_text_and_tool_turn_responses(tmp_path, sft_checkpoint):
    call = {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": '{"x": "3+4"}'}}
    used = [{"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "7"}, {"role": "assistant", "content": "Kesh."}]
    records = [{"prompt": QUESTIONS[0], "chosen": used, "rejected": "I do not know, sorry.",
                "tools": [{"type": "function", "function": CALCULATOR}]},
               {"prompt": QUESTIONS[1], "responses": ["Kesh.", used, "I do not know, sorry."]}]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records * 4))
    cfg = reward_config(tmp_path, sft_checkpoint)
    cfg.data, cfg.val, cfg.normalize_samples = [str(data)], [str(data)], 4
    final = [m for m in run_reward(cfg, DistInfo()).metrics if "val/accuracy" in m][-1]
    assert final["val/accuracy"] == 1.0


def test_normalization_makes_the_given_answers_score_mean_0_std_1(tiny_model, small_tokenizer):
    model = ScalarHeadModel(GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=64, n_layer=1,
                                          n_head=2, n_embd=16)))
    template = ChatTemplate(small_tokenizer)
    prompts = [[Message("user", q)] for q in QUESTIONS]
    answers = ["Kesh.", "Mira lives in Kesh.", "Seven.", "Yes.", "Mira.", "Bread and cheese."]
    stats = set_normalization(model, template, prompts, answers)
    scores = score_texts(model, template, prompts, answers)
    assert statistics.fmean(scores) == pytest.approx(0.0, abs=1e-5)
    assert statistics.pstdev(scores) == pytest.approx(1.0, abs=1e-4)
    assert stats["samples"] == 6


def reward_config(tmp_path, init_from, **train):
    settings = dict(max_steps=30, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=30, save_every=30, log_every=5,
                    progress=False)
    settings.update(train)
    return RewardConfig(data=[write_prefs(tmp_path / "prefs.jsonl", QUESTIONS * 3)],
                        val=[write_prefs(tmp_path / "val.jsonl", QUESTIONS[:4])], init_from=str(init_from),
                        out=str(tmp_path / "rm"), normalize_samples=8, train=TrainConfig(**settings))


def test_reward_training_learns_the_rankings_changes_every_weight_and_saves_a_normalized_model(tmp_path,
                                                                                           sft_checkpoint):
    before = load_checkpoint(sft_checkpoint).model.state_dict()
    result = run_reward(reward_config(tmp_path, sft_checkpoint), DistInfo())
    final = [m for m in result.metrics if "val/accuracy" in m][-1]
    assert final["val/accuracy"] == 1.0 and final["val/margin"] > 0.5
    ckpt = load_checkpoint(tmp_path / "rm")
    assert isinstance(ckpt.model, ScalarHeadModel)
    after = ckpt.model.backbone.state_dict()
    assert [k for k in before if torch.equal(before[k], after[k])] == []
    config = read_json(ckpt.path / "config.json", "config")
    assert config["stage"] == "reward" and config["normalization"]["samples"] == 8
    assert ckpt.model.gain.item() != 1.0 or ckpt.model.bias.item() != 0.0


def test_reward_needs_a_starting_checkpoint_and_data():
    with pytest.raises(ConfigError, match="--init-from"):
        run_reward(RewardConfig(data=["x.jsonl"]), DistInfo())
    with pytest.raises(ConfigError, match="--data"):
        run_reward(RewardConfig(init_from="somewhere"), DistInfo())


def test_reward_and_score_on_the_command_line(tmp_path, sft_checkpoint, capsys):
    from test_cli import run_cli

    cfg = reward_config(tmp_path, sft_checkpoint)
    status = run_cli("reward", "--init-from", sft_checkpoint, "--data", cfg.data[0], "--val", cfg.val[0],
                     "--out", tmp_path / "rm", "--max-steps", "30", "--batch-size", "4", "--lr", "3e-3",
                     "--normalize-samples", "4", "--no-progress")
    assert status == 0
    assert "held-out pairwise accuracy" in capsys.readouterr().out
    status = run_cli("score", "--checkpoint", tmp_path / "rm", "--prompt", QUESTIONS[0], "--response", "Kesh.",
                     "--prompt", QUESTIONS[0], "--response", "I do not know, sorry.")
    assert status == 0
    lines = capsys.readouterr().out.strip().splitlines()
    good, bad = (float(line.split("\t")[0]) for line in lines)
    assert good > bad
    assert run_cli("score", "--checkpoint", sft_checkpoint, "--prompt", "q", "--response", "a") == 2
    assert "expected a reward model" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["eval", "--limit", "1"], ["chat"]])
def test_commands_that_write_text_refuse_a_reward_model_by_name(tmp_path, small_tokenizer, capsys, command):
    from test_cli import run_cli

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=64, n_layer=1, n_head=2, n_embd=16)
    save_checkpoint(tmp_path / "rm", ScalarHeadModel(GPT(config)), tokenizer=small_tokenizer)
    assert run_cli(command[0], "--checkpoint", tmp_path / "rm", *command[1:]) == 2
    assert "is a reward model" in capsys.readouterr().err


def test_answer_sets_hold_n_seeded_samples_per_prompt_and_the_first_is_the_single_sample(sft_checkpoint):
    ckpt = load_checkpoint(sft_checkpoint)
    prompts = [[Message("user", q)] for q in QUESTIONS[:3]]
    sets = sample_answer_sets(ckpt, prompts, 4, temperature=1.0, seed=7, max_tokens=8)
    assert [len(s) for s in sets] == [4, 4, 4]
    assert sets == sample_answer_sets(ckpt, prompts, 4, temperature=1.0, seed=7, max_tokens=8)  # seeded
    assert all(len(set(s)) > 1 for s in sets)  # different samples, not one answer repeated
    assert sample_answers(ckpt, prompts, temperature=1.0, seed=7, max_tokens=8) == [s[0] for s in sets]
