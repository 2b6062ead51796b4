"""PPO: each piece of the math against a hand computation, then the stage end to end."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from chatforge.chat import ChatTemplate, Message
from chatforge.checkpoint import load_checkpoint, model_state_dict, read_json, save_checkpoint
from chatforge.errors import CheckpointError, ConfigError, DataError
from chatforge.model import GPT, GPTConfig, ScalarHeadModel
from chatforge.train.config import TrainConfig
from chatforge.train.distributed import DistInfo
from chatforge.train.ppo import PPOConfig, PPOSettings, ValueHead, build_models, run_ppo
from chatforge.train.ppo_math import AdaptiveKL, gae, masked_mean, policy_loss, token_rewards, value_loss, whiten
from chatforge.train.rollout import fit_prompt, make_rollout, response_logprobs

# ---- the math ------------------------------------------------------------------------------------


def test_gae_equals_the_direct_sum_of_discounted_td_errors():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0, 0.5, -0.2, 1.0, 0.0]])
    values = torch.tensor([[9.0, 0.3, 0.1, -0.4, 7.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])  # a prompt position, 3 response tokens, padding
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    ts = [1, 2, 3]
    v_next = {1: 0.1, 2: -0.4, 3: 0.0}  # the value after the last response token is 0
    delta = {t: rewards[0, t].item() + gamma * v_next[t] - values[0, t].item() for t in ts}
    for t in ts:
        direct = sum((gamma * lam) ** (u - t) * delta[u] for u in ts if u >= t)
        assert advantages[0, t].item() == pytest.approx(direct, abs=1e-6)
        assert returns[0, t].item() == pytest.approx(direct + values[0, t].item(), abs=1e-6)
    assert advantages[0, 0] == 0 and advantages[0, 4] == 0 and returns[0, 4] == 0


def test_masked_mean_and_whitening_ignore_masked_entries():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert masked_mean(x, mask).item() == 2.5
    w = whiten(x, mask)
    kept = w[mask > 0]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert kept.pow(2).mean().item() == pytest.approx(1.0, abs=1e-4)
    assert (w[mask == 0] == 0).all()
    unshifted = whiten(x, mask, shift_mean=False)[mask > 0]
    assert unshifted.mean().item() == pytest.approx(2.5, abs=1e-5)


def test_whitening_by_hand_locally_and_with_global_batch_statistics():
    x = torch.tensor([[1.0, 3.0, 7.0], [5.0, 9.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # masked entries 1, 3, 5: mean 3, variance (4 + 0 + 4) / 3 = 8/3
    std = math.sqrt(8 / 3 + 1e-8)
    expected = torch.tensor([[-2 / std, 0.0, 0.0], [2 / std, 0.0, 0.0]])
    expected_unshifted = torch.tensor([[3 - 2 / std, 3.0, 0.0], [3 + 2 / std, 0.0, 0.0]])
    for across_processes in (False, True):  # one process: the all-reduce adds nothing, float64 sums
        torch.testing.assert_close(whiten(x, mask, across_processes=across_processes), expected, rtol=0, atol=1e-6)
        unshifted = whiten(x, mask, shift_mean=False, across_processes=across_processes)
        torch.testing.assert_close(unshifted, expected_unshifted, rtol=0, atol=1e-6)


def test_per_token_rewards_are_the_kl_penalty_plus_the_score_at_the_last_answer_token():
    logprobs = torch.tensor([[-9.0, -1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.0, -1.5, -1.0, -0.5]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    rewards, kl = token_rewards(logprobs, ref, torch.tensor([3.0]), mask, beta=0.1)
    assert kl.tolist() == [[0.0, 0.5, -1.0, 0.0]]
    assert rewards[0].tolist() == pytest.approx([0.0, -0.05, 0.1 + 3.0, 0.0])


def test_clipped_policy_loss_by_hand():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    new = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1)]])  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, -2.0, 0.5]])
    mask = torch.ones(1, 3)
    loss, stats = policy_loss(new, old, adv, mask, cliprange=0.2)
    # per token max(-A r, -A clip(r)): max(-1.5, -1.2) = -1.2; max(1.0, 1.6) = 1.6; max(-0.55, -0.55) = -0.55
    assert loss.item() == pytest.approx((-1.2 + 1.6 - 0.55) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.1) / 3, abs=1e-6)
    expected_kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3
    assert stats["approx_kl"].item() == pytest.approx(expected_kl, abs=1e-6)


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 1.0]])
    loss = value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 1: plain (1-0)^2 = 1, clipped 0.5+0.2=0.7 -> 0.49, max 1; token 2: (0-1)^2 = 1 both
    assert loss.item() == pytest.approx(0.5 * (1 + 1) / 2)


def test_the_adaptive_kl_controller_follows_its_formula():
    ctl = AdaptiveKL(0.1, target=6.0, horizon=10000)
    ctl.update(kl=9.0, n=100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    ctl.update(kl=5.4, n=1000)  # error -0.1
    assert ctl.value == pytest.approx(0.1 * 1.002 * (1 - 0.1 * 0.1))


def test_the_rollout_mask_marks_positions_that_predict_answer_tokens():
    r = make_rollout([[1, 2, 3], [4]], [[7, 8], [9, 9, 9]], [True, False], pad_id=0)
    assert r.ids.tolist() == [[1, 2, 3, 7, 8], [4, 9, 9, 9, 0]]
    assert r.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    assert r.lengths.tolist() == [5, 4] and r.ended.tolist() == [True, False]


# ---- the stage ---------------------------------------------------------------------------------


PROMPTS = ["What is the capital of Veloria?", "Where does Mira live?", "What is 3 plus 4?", "Who has a dog?"]
CONTEXT = 64
# The memory options, each alone and together; {} is the default (float32 frozen models, a value backbone).
OPTIONS = {"default": {}, "bf16-frozen": {"frozen_dtype": "bfloat16"}, "shared-head": {"shared_value_head": True},
           "both": {"frozen_dtype": "bfloat16", "shared_value_head": True}}


def model_config(tokenizer, **changes) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=tokenizer.vocab_size, context_length=CONTEXT, n_layer=1, n_head=2,
                                n_embd=32), **changes})


def write_prompts(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def make_models(root, tokenizer):
    """A tiny SFT model and reward model over `tokenizer` in root/sft and root/rm, and PROMPTS in root/prompts.jsonl."""
    torch.manual_seed(0)
    save_checkpoint(root / "sft", GPT(model_config(tokenizer)), tokenizer=tokenizer)
    save_checkpoint(root / "rm", ScalarHeadModel(GPT(model_config(tokenizer))), tokenizer=tokenizer)
    write_prompts(root / "prompts.jsonl", PROMPTS)
    return root


@pytest.fixture
def models(tmp_path, small_tokenizer):
    return make_models(tmp_path, small_tokenizer)


def ppo_config(root, out="ppo", steps=2, lr=1e-3, **settings):
    ppo = dict(rollout_batch=8, minibatch=4, ppo_epochs=2, max_new_tokens=8, val_prompts=4)
    ppo.update(settings)
    train = TrainConfig(max_steps=steps, batch_size=1, lr=lr, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0,
                        eval_every=steps, save_every=steps, log_every=1, progress=False)
    return PPOConfig(prompts=[str(root / "prompts.jsonl")], val=[str(root / "prompts.jsonl")],
                     policy=str(root / "sft"), reward_model=str(root / "rm"), out=str(root / out),
                     ppo=PPOSettings(**ppo), train=train)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_one_ppo_step_changes_policy_and_value_weights_and_leaves_the_reference_and_reward_model(models,
                                                                                              monkeypatch, options):
    from chatforge.train import ppo as ppo_module

    sft_before = load_checkpoint(models / "sft").model.state_dict()
    rm_before = load_checkpoint(models / "rm").model.state_dict()
    built = {}
    real_build = ppo_module.build_models

    def build_and_keep(cfg, device):  # keep the in-memory frozen models the run trains beside
        built["models"] = real_build(cfg, device)
        built["value"] = {k: v.clone() for k, v in built["models"][0].value.state_dict().items()}
        return built["models"]

    monkeypatch.setattr(ppo_module, "build_models", build_and_keep)
    result = run_ppo(ppo_config(models, steps=1, **options), DistInfo())
    record = result.metrics[0]
    for key in ("train/score", "train/kl", "train/beta", "train/entropy", "train/clipfrac", "train/approx_kl",
                "train/value_loss", "train/response_length", "train/ratio", "val/score"):
        assert key in record and math.isfinite(record[key]), key
    policy = load_checkpoint(models / "ppo").model.state_dict()
    assert [k for k in sft_before if torch.equal(sft_before[k], policy[k])] == []

    value = load_file(str(models / "ppo" / "checkpoint" / "value.safetensors"))
    shared = options.get("shared_value_head", False)
    if shared:  # just the head; the trunk it reads is the policy's, saved in model.safetensors
        assert set(value) == {"head.weight", "head.bias"}
    changed = [k for k in value if k in ("head.weight", "head.bias") or k.startswith("backbone.h.")]
    assert changed and all(not torch.equal(value[k], built["value"][k]) for k in changed)
    config = read_json(models / "ppo" / "checkpoint" / "config.json", "config")
    assert config["value_head"] == ("shared" if shared else "separate")

    _, reference, reward_model, _ = built["models"]
    dtype = getattr(torch, options.get("frozen_dtype", "float32"))
    assert all(v.dtype == dtype and torch.equal(v, sft_before[k].to(dtype)) for k, v in reference.state_dict().items())
    assert all(v.dtype == dtype and torch.equal(v, rm_before[k].to(dtype))
               for k, v in reward_model.state_dict().items())


def test_the_first_minibatch_sees_ratio_one_old_and_new_log_probs_are_computed_alike(models):
    result = run_ppo(ppo_config(models, steps=1, ppo_epochs=1, minibatch=8), DistInfo())
    assert result.metrics[0]["train/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert result.metrics[0]["train/approx_kl"] == pytest.approx(0.0, abs=1e-10)


def test_ppo_with_a_toy_reward_raises_it_within_a_few_steps(models, small_tokenizer):
    chosen = set(range(small_tokenizer.vocab_size // 2))  # the reward: how many answer tokens are in this set

    def count_chosen(rollout):
        return torch.tensor([float(sum(t in chosen for t in r)) for r in rollout.responses])

    cfg = ppo_config(models, steps=8, lr=1e-2, rollout_batch=16, minibatch=8, ppo_epochs=4, init_kl_coef=0.0,
                     adaptive_kl=False, missing_eos_penalty=0.0)
    result = run_ppo(cfg, DistInfo(), reward_fn=count_chosen)
    scores = [m["train/score"] for m in result.metrics]
    assert sum(scores[-2:]) / 2 > sum(scores[:2]) / 2 + 1.0, scores  # of 8 tokens, about 4 at first


RESUMED = {k: OPTIONS[k] for k in ("default", "shared-head", "both")}


@pytest.mark.parametrize("options", RESUMED.values(), ids=RESUMED.keys())
def test_an_interrupted_ppo_run_resumes_exactly_with_its_kl_coefficient(models, options):
    def stop_at_2(step, record):
        if step == 2:
            raise KeyboardInterrupt

    straight = run_ppo(ppo_config(models, "a", steps=4, init_kl_coef=0.2, **options), DistInfo())
    first = run_ppo(ppo_config(models, "b", steps=4, init_kl_coef=0.2, **options), DistInfo(), callbacks=[stop_at_2])
    assert first.interrupted
    assert read_json(models / "b" / "checkpoint" / "config.json", "c")["kl_coef"] != 0.2  # adapted, and saved
    resumed = run_ppo(ppo_config(models, "b", steps=4, init_kl_coef=0.2, **options), DistInfo(), resume=True)
    keys = ("train/score", "train/kl", "train/beta", "train/policy_loss", "train/value_loss")
    for a, b in zip(straight.metrics[2:], resumed.metrics, strict=True):
        assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], abs=1e-6)


# ---- the memory options --------------------------------------------------------------------------


def test_bf16_frozen_models_take_half_the_bytes_and_score_within_rounding_of_float32(models):
    _, reference, reward_model, _ = build_models(ppo_config(models, frozen_dtype="bfloat16"), torch.device("cpu"))
    sft, rm = load_checkpoint(models / "sft").model, load_checkpoint(models / "rm").model

    def nbytes(model):
        return sum(p.nbytes for p in model.parameters())

    assert nbytes(reference) * 2 == nbytes(sft) and nbytes(reward_model) * 2 == nbytes(rm)
    torch.manual_seed(0)
    ids, lengths = torch.randint(0, sft.config.vocab_size, (8, 40)), torch.tensor([40, 35, 30, 25, 20, 15, 10, 5])
    with torch.no_grad():
        exact, rounded = response_logprobs(sft(ids), ids, 1.0), response_logprobs(reference(ids), ids, 1.0)
        exact_scores, rounded_scores = rm(ids, lengths), reward_model(ids, lengths)
    assert rounded.dtype == torch.float32  # response_logprobs casts bf16 logits; reward_model_scores casts scores
    # bf16 keeps 8 significant bits (about 0.4% per rounding); measured here: 0.0023 nats and 0.0074. Tolerances:
    # 0.02 nats per token for log-probs (each about -5.7), 0.05 for scores (on the reward model's unit scale).
    assert (rounded - exact).abs().max().item() < 0.02
    assert (rounded_scores.float() - exact_scores).abs().max().item() < 0.05


def test_the_shared_value_head_reads_the_policy_trunk_in_the_same_forward_pass(models):
    model, _, _, _ = build_models(ppo_config(models, shared_value_head=True), torch.device("cpu"))
    policy = model.policy
    assert isinstance(model.value, ValueHead)
    assert sum(p.numel() for p in model.parameters()) == policy.num_params() + policy.config.n_embd + 1
    ids = torch.randint(0, policy.config.vocab_size, (2, 10))
    logits, values = model(ids)
    assert torch.equal(logits, policy(ids))
    assert torch.allclose(values, model.value.head(policy.hidden_states(ids)).squeeze(-1))


def test_the_shared_value_head_starts_as_the_reward_head_when_widths_match_and_at_zero_otherwise(small_tokenizer):
    torch.manual_seed(0)
    rm = ScalarHeadModel(GPT(model_config(small_tokenizer)))
    rm.gain.fill_(2.0)
    rm.bias.fill_(0.5)
    ids = torch.randint(0, small_tokenizer.vocab_size, (2, 10))
    head = ValueHead.from_reward_model(rm, rm.config.n_embd)
    with torch.no_grad():  # on the reward model's own trunk it gives the reward model's values, normalization included
        assert torch.allclose(head(rm.backbone.hidden_states(ids)), rm.values(ids), atol=1e-6)
    other_width = ValueHead.from_reward_model(rm, 48)
    assert other_width.head.weight.shape == (1, 48)
    assert not other_width.head.weight.any() and not other_width.head.bias.any()


def test_the_memory_options_are_flags_of_chatforge_ppo_and_a_bad_dtype_is_refused(models, capsys):
    from test_cli import run_cli

    common = ["ppo", "--prompts", models / "prompts.jsonl", "--policy", models / "sft", "--reward-model", models / "rm",
              "--max-steps", "1", "--rollout-batch", "4", "--minibatch", "2", "--max-new-tokens", "4", "--no-progress"]
    assert run_cli(*common, "--out", models / "cli", "--frozen-dtype", "bfloat16", "--shared-value-head") == 0
    assert set(load_file(str(models / "cli" / "checkpoint" / "value.safetensors"))) == {"head.weight", "head.bias"}
    assert run_cli(*common, "--out", models / "bad", "--frozen-dtype", "float16") == 2
    assert "--frozen-dtype" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"--frozen-dtype.*'float32', 'bfloat16'.*got 'fp16'"):
        PPOSettings(frozen_dtype="fp16")


# ---- errors that name what is wrong ----------------------------------------------------------------


def test_ppo_refuses_a_reward_model_trained_with_another_tokenizer(models):
    from chatforge.tokenizer import Tokenizer

    other = Tokenizer.train([f"Zorblax {i} quux frobnicate {i * 7} wibble." for i in range(200)], vocab_size=300)
    assert other.hash != load_checkpoint(models / "sft").tokenizer.hash
    save_checkpoint(models / "rm_other", ScalarHeadModel(GPT(model_config(other))), tokenizer=other)
    cfg = ppo_config(models)
    cfg.reward_model = str(models / "rm_other")
    with pytest.raises(ConfigError, match=r"--reward-model .*rm_other was trained with another tokenizer than"):
        run_ppo(cfg, DistInfo())


def test_ppo_refuses_a_reward_model_with_another_vocabulary_size(models, small_tokenizer):
    rm = ScalarHeadModel(GPT(model_config(small_tokenizer, vocab_size=small_tokenizer.vocab_size + 16)))
    save_checkpoint(models / "rm_wide", rm, tokenizer=small_tokenizer)
    cfg = ppo_config(models)
    cfg.reward_model = str(models / "rm_wide")
    with pytest.raises(ConfigError, match=rf"rm_wide has vocab_size {small_tokenizer.vocab_size + 16} and --policy"):
        run_ppo(cfg, DistInfo())


@pytest.mark.parametrize("shared", [False, True], ids=["value-model", "shared-head"])
def test_resuming_refuses_a_value_file_of_another_size_naming_it_and_the_expected_value_model(models, small_tokenizer,
                                                                                             shared):
    run_ppo(ppo_config(models, steps=1, shared_value_head=shared), DistInfo())
    file = models / "ppo" / "checkpoint" / "value.safetensors"
    torch.manual_seed(0)
    wider = ScalarHeadModel(GPT(model_config(small_tokenizer, n_embd=48)))
    save_file(model_state_dict(ValueHead.from_reward_model(wider, 48) if shared else wider), str(file))
    expected = "a value head on the policy's 32-wide trunk" if shared else "a value model shaped like --reward-model"
    with pytest.raises(CheckpointError, match=rf"value.safetensors: .* has shape .*; expected {expected}"):
        run_ppo(ppo_config(models, steps=2, shared_value_head=shared), DistInfo(), resume=True)


def test_resuming_with_the_other_value_head_mode_is_refused(models):
    run_ppo(ppo_config(models, steps=1), DistInfo())
    with pytest.raises(CheckpointError, match="ppo.shared_value_head' was False and is now True"):
        run_ppo(ppo_config(models, steps=2, shared_value_head=True), DistInfo(), resume=True)


def test_a_prompt_that_leaves_no_room_for_an_answer_is_an_error_naming_its_file_and_place(models):
    long = " ".join(["Mira walked her dog to the capital of Veloria."] * 12)  # well over 64 tokens
    prompts = write_prompts(models / "long.jsonl", [PROMPTS[0], PROMPTS[1], long])
    cfg = ppo_config(models)
    cfg.prompts = [str(prompts)]
    with pytest.raises(DataError, match=rf"long.jsonl: prompt 3 \(--prompts\): needs \d+ .* context is {CONTEXT};"):
        run_ppo(cfg, DistInfo())
    cfg = ppo_config(models, val_prompts=8)  # held-out prompts past val_prompts are never answered, nor checked
    cfg.val = [str(models / "prompts.jsonl"), str(prompts)]  # the 7th prompt read is the 3rd of the second file
    with pytest.raises(DataError, match=r"long.jsonl: prompt 3 \(--val\)"):
        run_ppo(cfg, DistInfo())


def test_old_turns_are_dropped_and_a_long_last_turn_gets_a_shorter_answer_instead_of_an_error(small_tokenizer):
    template, max_new = ChatTemplate(small_tokenizer), 8
    old = [Message("user", "Where does Mira live? " * 15), Message("assistant", "In Kesh. " * 20)]  # each too long
    last = Message("user", "What is 3 plus 4?")
    ids = fit_prompt(template, [*old, last], CONTEXT, max_new)
    assert ids == template.generation_prompt([last]) and len(ids) <= CONTEXT - max_new
    content = "Mira"
    while len(template.generation_prompt([Message("user", content)])) <= CONTEXT - max_new:
        content += " dog"
    tight = Message("user", content)  # it leaves fewer than max_new tokens, but some
    assert CONTEXT - max_new < len(template.generation_prompt([tight])) < CONTEXT
    assert fit_prompt(template, [*old, tight], CONTEXT, max_new) == template.generation_prompt([tight])
    too_long = Message("user", "Mira walked her dog. " * 20)
    assert fit_prompt(template, [too_long], CONTEXT, max_new) is None


def test_ppo_refuses_swapped_models_and_missing_inputs(models):
    with pytest.raises(ConfigError, match="reward model"):
        run_ppo(PPOConfig(
            prompts=[str(models / "prompts.jsonl")], policy=str(models / "rm"), reward_model=str(models / "rm")),
            DistInfo())
    with pytest.raises(ConfigError, match="--prompts"):
        run_ppo(PPOConfig(policy="x", reward_model="y"), DistInfo())


def test_ppo_on_the_command_line(models, capsys):
    from test_cli import run_cli

    status = run_cli("ppo", "--prompts", models / "prompts.jsonl", "--policy", models / "sft", "--reward-model",
                     models / "rm", "--out", models / "cli", "--max-steps", "1", "--rollout-batch", "4",
                     "--minibatch", "2", "--max-new-tokens", "4", "--no-progress", "--eval-every", "1")
    assert status == 0
    assert "ppo: finished at step 1; score" in capsys.readouterr().out
    assert load_checkpoint(models / "cli").model.config.n_layer == 1


@pytest.mark.slow
def test_ppo_under_torchrun_splits_the_rollout_over_two_processes(models):
    """Two processes answer half the prompts each; the first iteration's figures equal one process's."""
    import os
    import subprocess
    import sys

    common = ["ppo", "--prompts", str(models / "prompts.jsonl"), "--policy", str(models / "sft"), "--reward-model",
              str(models / "rm"), "--max-steps", "2", "--rollout-batch", "8", "--minibatch", "2",
              "--max-new-tokens", "6", "--no-progress", "--device", "cpu", "--eval-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "chatforge", *common, "--out", str(models / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "chatforge", *common, "--out", str(models / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]

    def first(name):
        return json.loads((models / name / "metrics.jsonl").read_text().splitlines()[0])

    keys = ("train/score", "train/kl", "train/response_length", "train/entropy")
    assert [first("two")[k] for k in keys] == pytest.approx([first("one")[k] for k in keys], abs=1e-5)
    assert load_checkpoint(models / "two").model.config.n_layer == 1
