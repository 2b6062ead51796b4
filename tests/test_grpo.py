"""GRPO and RLOO: each piece of the math against a hand computation, the verifier on every family, then the
stages end to end on the tiny models of test_ppo."""

import json
import math
import subprocess
import sys

import pytest
import torch
from test_ppo import PROMPTS, make_models, model_config, write_prompts

from chatforge.chat import ChatTemplate, Conversation, Message
from chatforge.checkpoint import load_checkpoint, save_checkpoint
from chatforge.data.tasks import TaskConfig, build_tasks
from chatforge.data.tasks.calls import builtin_specs, function_spec, transcript
from chatforge.data.tasks.verifier import Verifier
from chatforge.data.world import World
from chatforge.errors import ConfigError, DataError
from chatforge.model import GPT, ScalarHeadModel
from chatforge.train import group_rl
from chatforge.train.config import GRPOConfig, GRPOSettings, RLOOConfig, RLOOSettings, TrainConfig
from chatforge.train.distributed import DistInfo
from chatforge.train.group_math import (
    GRPO_EPS,
    group_advantages,
    grpo_loss,
    k3_kl,
    leave_one_out_advantages,
    rloo_loss,
    rloo_rewards,
)
from chatforge.train.group_rl import run_grpo, run_rloo, verifier_rewards
from chatforge.train.rollout import RLPrompt, make_rollout, response_of

# ---- the math ------------------------------------------------------------------------------------


def test_grpo_advantages_are_normalised_within_each_group_and_an_all_equal_group_gets_zero():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])  # two groups of G = 4
    std = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)  # sample std (n - 1), as TRL
    expected = [x / (std + GRPO_EPS) for x in (-1.5, -0.5, 0.5, 1.5)] + [0.0] * 4
    advantages = group_advantages(rewards, 4)
    assert advantages.tolist() == pytest.approx(expected, abs=1e-6)
    assert torch.isfinite(advantages).all() and (advantages[4:] == 0).all()
    assert group_advantages(rewards, 4, scale=False).tolist() == [-1.5, -0.5, 0.5, 1.5, 0, 0, 0, 0]  # Dr. GRPO


def test_rloo_advantages_subtract_the_mean_of_the_other_answers_of_the_group():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two groups of k = 3
    # 1 - (2 + 6)/2, 2 - (1 + 6)/2, 6 - (1 + 2)/2; 0 - (0 + 3)/2, 0 - 3/2, 3 - 0
    assert leave_one_out_advantages(rewards, 3).tolist() == [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]


def test_rloo_folds_the_summed_kl_of_each_answer_into_its_reward():
    logprobs = torch.tensor([[-9.0, -1.0, -2.0, -0.5], [-1.0, -3.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.0, -1.5, -1.0, -5.0], [-1.0, -2.0, 0.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    rewards, kl = rloo_rewards(torch.tensor([3.0, 1.0]), logprobs, ref, mask, beta=0.1)
    assert kl.tolist() == [0.5 - 1.0, 0.0 - 1.0]  # the masked positions' log pi - log pi_ref, summed
    assert rewards.tolist() == pytest.approx([3.0 + 0.05, 1.0 + 0.1])
    assert rloo_rewards(torch.tensor([3.0, 1.0]), logprobs, None, mask, beta=0.1)[0].tolist() == [3.0, 1.0]


def test_the_k3_kl_estimator_by_hand():
    half, quarter = math.log(0.5), math.log(0.25)
    kl = k3_kl(torch.tensor([half, quarter, -1.0]), torch.tensor([quarter, half, -1.0]))
    # d = ref - logp: log 0.5 -> 0.5 - log 0.5 - 1; log 2 -> 2 - log 2 - 1; 0 -> 0
    assert kl.tolist() == pytest.approx([0.5 - half - 1, 2 - math.log(2) - 1, 0.0], abs=1e-6)
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def test_grpo_loss_by_hand_clipped_per_token_with_the_k3_penalty_and_a_token_level_mean():
    old = torch.zeros(3, 2)
    new = torch.tensor([[math.log(1.5), 7.0], [math.log(0.5), 7.0], [math.log(1.1), 0.0]])  # ratios 1.5, 0.5, 1.1
    ref = torch.tensor([[0.0, 0.0], [0.0, 0.0], [math.log(1.1), 0.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])  # column 1 of rows 0 and 1: padding, ignored
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, stats = grpo_loss(new, old, ref, adv, mask, cliprange=0.2, beta=0.0)
    # max(-A r, -A clip(r)) per token: max(-1.5, -1.2) = -1.2; max(1.0, 1.6) = 1.6; row 2: -0.55, then -0.5 at ratio 1
    assert loss.item() == pytest.approx((-1.2 + 1.6 - 0.55 - 0.5) / 4, abs=1e-6)  # 4 tokens: a token-level mean
    assert stats["clipfrac"].item() == pytest.approx(2 / 4)
    assert stats["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.1 + 1.0) / 4, abs=1e-6)
    assert "kl_k3" not in stats
    k3 = [1 / 1.5 + math.log(1.5) - 1, 2 - math.log(2) - 1, 0.0, 0.0]  # exp(d) - d - 1 with d = ref - logp
    with_kl, stats = grpo_loss(new, old, ref, adv, mask, cliprange=0.2, beta=0.1)
    assert with_kl.item() == pytest.approx(loss.item() + 0.1 * sum(k3) / 4, abs=1e-6)
    assert stats["kl_k3"].item() == pytest.approx(sum(k3) / 4, abs=1e-6)
    assert grpo_loss(new, old, ref, adv, mask, 0.2, 0.0, tokens=8.0)[0].item() == pytest.approx(loss.item() / 2)


def test_at_ratio_one_the_grpo_gradient_is_the_advantage_on_every_token_and_the_kl_adds_none_at_the_reference():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    logprobs = old.clone().requires_grad_(True)
    loss, _ = grpo_loss(logprobs, old, old.clone(), torch.tensor([2.0, -1.0]), mask, cliprange=0.2, beta=0.04)
    loss.backward()
    expected = torch.tensor([[-2.0, -2.0, -2.0], [1.0, 1.0, 0.0]]) / 5  # -A on each of the 5 tokens, / 5
    torch.testing.assert_close(logprobs.grad, expected)


def test_rloo_loss_by_hand_clips_the_ratio_of_the_whole_answer():
    old = torch.zeros(3, 3)
    log_ratios = [(0.2, math.log(1.5) - 0.2), (math.log(0.5), 0.0), (math.log(1.1), 0.0)]
    new = torch.tensor([[a, b, 9.0] for a, b in log_ratios])  # the answers' ratios: 1.5, 0.5, 1.1
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    loss, stats = rloo_loss(new, old, torch.tensor([1.0, -2.0, 0.5]), mask, cliprange=0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.6 - 0.55) / 3, abs=1e-6)  # a mean over answers
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.1) / 3, abs=1e-6)


def test_at_ratio_one_the_rloo_gradient_is_reinforce():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    logprobs = old.clone().requires_grad_(True)
    rloo_loss(logprobs, old, torch.tensor([2.0, -1.0]), mask, cliprange=0.2)[0].backward()
    # -A * sum_t grad log pi(y_t), a mean over the 2 answers
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.0, -1.0, -1.0], [0.5, 0.5, 0.0]]))


# ---- the verifier --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_tasks():
    world = World.build(seed=0)
    tasks = build_tasks(world, config=TaskConfig().with_tools().scaled(0.05))
    by_family = {}
    for task in tasks.rl_train + tasks.eval:
        if task.family == "functions" and isinstance(task.answer, str):
            continue  # no declared function fits: a fact question, which the verifier leaves alone
        by_family.setdefault(task.family, task)
    return world, by_family


def prompt_of(task):
    return Conversation(list(task.prompt), list(task.tools))


@pytest.mark.parametrize("family", ["arithmetic", "words", "calc", "dates", "functions"])
def test_the_verifier_checks_the_final_answer_of_each_verifiable_family(world_tasks, family):
    world, tasks = world_tasks
    task, verifier = tasks[family], Verifier(world)
    assert verifier.verifiable(prompt_of(task), family)
    assert verifier.verify(prompt_of(task), task.answer, family) == 1.0
    assert verifier.verify(prompt_of(task), task.wrong, family) == 0.0
    if isinstance(task.answer, str):  # padding is not its business: a padded right answer is right
        padded = "Great question! Let me think about this carefully. " + task.answer
        assert verifier.verify(prompt_of(task), padded, family) == 1.0
        assert verifier.verify(prompt_of(task), "Sorry, I can't help with that.", family) == 0.0
    for misused in task.misused:  # a wrong call is wrong, whatever follows it
        assert verifier.verify(prompt_of(task), misused, family) == 0.0
    if family == "functions":  # the request asked for the function: an unaided answer is wrong
        assert task.unaided is None or verifier.verify(prompt_of(task), task.unaided, family) == 0.0
    elif task.unaided is not None:  # a right answer without a call is right
        assert verifier.verify(prompt_of(task), task.unaided, family) == 1.0


@pytest.mark.parametrize("family", ["facts", "followup", "harmful", "harmless"])
def test_the_verifier_does_not_judge_facts_or_refusals(world_tasks, family):
    world, tasks = world_tasks
    task, verifier = tasks[family], Verifier(world)
    assert not verifier.verifiable(prompt_of(task), family)
    for response in (task.answer, task.wrong, task.alternative, "Sorry, I can't help with that."):
        assert verifier.verify(prompt_of(task), response, family) is None


def test_a_functions_prompt_where_no_declared_function_fits_is_a_fact_question_and_not_verified(world_tasks):
    world, tasks = world_tasks
    fact = tasks["facts"]
    question = fact.prompt[-1].content.lower()
    other = next(a for a in ("river", "capital", "pet", "age") if a not in question)
    prompt = Conversation(list(fact.prompt), [function_spec(other)])
    verifier = Verifier(world)
    assert verifier.scorer.family(prompt) == "functions" and not verifier.verifiable(prompt)
    assert verifier.verify(prompt, fact.answer, "functions") is None


def test_the_verifier_imports_no_torch():
    code = "import sys, chatforge.data.tasks.verifier; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_verifier_rewards_are_plus_and_minus_one_and_the_reward_model_where_it_cannot_tell(small_tokenizer):
    template, verifier = ChatTemplate(small_tokenizer), Verifier(World.build(seed=0))
    sum_prompt = RLPrompt([], Conversation([Message("user", "What is 3 plus 4?")]), "arithmetic")
    fact_prompt = RLPrompt([], Conversation([Message("user", "What is the capital of Veloria?")]), "facts")
    ids = [template.generation_prompt([p.conversation.messages[-1]]) for p in (sum_prompt, sum_prompt, fact_prompt)]
    answers = [small_tokenizer.encode(t) + [template.end_id] for t in ("3 plus 4 is 7.", "3 plus 4 is 8.", "Kesh.")]
    r = make_rollout(ids, answers, [True] * 3, template.eot_id)
    r.prompts = [sum_prompt, sum_prompt, fact_prompt]
    assert verifier_rewards(verifier, template)(r).tolist() == [1.0, -1.0, 0.0]
    reward_model = verifier_rewards(verifier, template, lambda rollout: torch.tensor([0.3, 0.2, 0.7]))
    assert reward_model(r).tolist() == pytest.approx([1.0, -1.0, 0.7])


def test_an_answer_is_read_back_from_its_tokens_as_text_or_as_a_transcript_of_its_calls(small_tokenizer):
    template, verifier = ChatTemplate(small_tokenizer), Verifier(World.build(seed=0))
    user = [Message("user", "What is 3 plus 4?")]
    assert response_of(template, small_tokenizer.encode("3 plus 4 is 7.") + [template.end_id]) == "3 plus 4 is 7."
    for result, right in (("7", 1.0), ("8", 0.0)):
        called = transcript([("calculator", {"expression": "3+4"}, result)], f"3 plus 4 is {result}.")
        ids = template.render(Conversation(user + list(called))).ids[len(template.generation_prompt(user)):]
        response = response_of(template, ids)
        assert [m.role for m in response] == ["tool_call", "tool_result", "assistant"]
        assert verifier.verify(Conversation(user, builtin_specs()), response) == right
    wrong_call = transcript([("calculator", {"expression": "3+5"}, "8")], "3 plus 4 is 7.")
    ids = template.render(Conversation(user + list(wrong_call))).ids[len(template.generation_prompt(user)):]
    assert verifier.verify(Conversation(user, builtin_specs()), response_of(template, ids)) == 0.0  # a wrong call


# ---- the stages ----------------------------------------------------------------------------------

RUNS = {"grpo": run_grpo, "rloo": run_rloo}


@pytest.fixture
def models(tmp_path, small_tokenizer):
    """test_ppo's tiny SFT model and reward model, and its four prompts (one of them arithmetic)."""
    return make_models(tmp_path, small_tokenizer)


def group_config(kind, root, out=None, steps=1, lr=1e-3, **settings):
    common = dict(prompts_per_step=2, num_generations=4, max_new_tokens=8, val_prompts=4)
    common.update(settings)
    train = TrainConfig(max_steps=steps, batch_size=1, lr=lr, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0,
                        eval_every=steps, save_every=steps, log_every=1, progress=False)
    paths = dict(prompts=[str(root / "prompts.jsonl")], val=[str(root / "prompts.jsonl")], policy=str(root / "sft"),
                 reward_model=str(root / "rm"), out=str(root / (out or kind)), train=train)
    if kind == "grpo":
        return GRPOConfig(**paths, grpo=GRPOSettings(**common))
    return RLOOConfig(**paths, rloo=RLOOSettings(**common))


def keep_models(monkeypatch):
    """Record the models each run builds (policy, reference, reward model, tokenizer), before training."""
    built = []
    real = group_rl.load_models

    def load_and_keep(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(group_rl, "load_models", load_and_keep)
    return built


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_one_step_changes_every_policy_weight_and_never_the_reference_or_the_reward_model(models, monkeypatch, kind):
    sft_before = load_checkpoint(models / "sft").model.state_dict()
    rm_before = load_checkpoint(models / "rm").model.state_dict()
    built = keep_models(monkeypatch)
    record = RUNS[kind](group_config(kind, models), DistInfo()).metrics[0]
    for key in ("train/score", "train/kl", "train/entropy", "train/clipfrac", "train/ratio", "train/loss",
                "train/response_length", "train/zero_std_groups", "val/score", "val/kl"):
        assert key in record and math.isfinite(record[key]), key
    saved = load_checkpoint(models / kind)
    assert isinstance(saved.model, GPT)  # a chat model every command reads
    assert sorted(p.name for p in (models / kind / "checkpoint").glob("*.safetensors")) == ["model.safetensors"]
    policy = saved.model.state_dict()
    assert [k for k in sft_before if torch.equal(sft_before[k], policy[k])] == []
    _, reference, reward_model, _ = built[0]
    assert all(torch.equal(v, sft_before[k]) for k, v in reference.state_dict().items())
    assert all(torch.equal(v, rm_before[k]) for k, v in reward_model.state_dict().items())
    assert not any(p.requires_grad for p in (*reference.parameters(), *reward_model.parameters()))


def test_grpo_with_beta_0_builds_no_reference(models, monkeypatch):
    built = keep_models(monkeypatch)
    record = run_grpo(group_config("grpo", models, beta=0.0), DistInfo()).metrics[0]
    assert built[0][1] is None
    assert "train/kl" not in record and "train/kl_k3" not in record and "val/kl" not in record
    assert math.isfinite(record["train/loss"])


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_the_first_update_sees_ratio_one_old_and_new_log_probs_are_computed_alike(models, kind):
    record = RUNS[kind](group_config(kind, models), DistInfo()).metrics[0]  # one epoch, one minibatch
    assert record["train/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert record["train/clipfrac"] == 0 and record["train/approx_kl"] == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_a_toy_reward_rises_within_a_few_steps(models, small_tokenizer, kind):
    chosen = set(range(small_tokenizer.vocab_size // 2))  # the reward: how many answer tokens are in this set

    def count_chosen(rollout):
        return torch.tensor([float(sum(t in chosen for t in r)) for r in rollout.responses])

    cfg = group_config(kind, models, steps=8, lr=1e-2, prompts_per_step=4, num_generations=4, minibatch=8,
                       ppo_epochs=2, beta=0.0, missing_eos_penalty=0.0)
    scores = [m["train/score"] for m in RUNS[kind](cfg, DistInfo(), reward_fn=count_chosen).metrics]
    assert sum(scores[-2:]) / 2 > sum(scores[:2]) / 2 + 1.0, scores  # of 8 tokens, about 4 at first


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_an_interrupted_run_resumes_exactly(models, kind):
    def stop_at_2(step, record):
        if step == 2:
            raise KeyboardInterrupt

    settings = dict(steps=3, lr=3e-2, minibatch=4, ppo_epochs=2)  # several updates per iteration: the clipping acts
    straight = RUNS[kind](group_config(kind, models, "a", **settings), DistInfo())
    first = RUNS[kind](group_config(kind, models, "b", **settings), DistInfo(), callbacks=[stop_at_2])
    assert first.interrupted and first.step == 2
    resumed = RUNS[kind](group_config(kind, models, "b", **settings), DistInfo(), resume=True)
    keys = ("train/score", "train/kl", "train/loss", "train/clipfrac")
    assert resumed.metrics[0]["train/clipfrac"] > 0  # the second epoch moved the ratio beyond the clip
    for a, b in zip(straight.metrics[2:], resumed.metrics, strict=True):
        assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], abs=1e-6)
    a, b = load_checkpoint(models / "a").model.state_dict(), load_checkpoint(models / "b").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_on_the_verifier_alone_keeps_the_prompts_it_checks_and_needs_no_reward_model(models, monkeypatch,
                                                                                          capsys):
    built = keep_models(monkeypatch)
    cfg = group_config("grpo", models, reward="verifier", missing_eos_penalty=0.0)
    cfg.reward_model = ""
    record = run_grpo(cfg, DistInfo()).metrics[0]
    assert built[0][2] is None  # no reward model loaded
    assert "grpo: 1 prompts (3 the verifier cannot check left out)" in capsys.readouterr().out
    assert -1.0 <= record["train/score"] <= 1.0 and -1.0 <= record["val/score"] <= 1.0  # +1 right, -1 wrong
    write_prompts(models / "facts.jsonl", [PROMPTS[0], PROMPTS[1]])
    cfg.prompts = [str(models / "facts.jsonl")]
    with pytest.raises(DataError, match=r"none of the 2 prompts of --prompts is one the verifier checks"):
        run_grpo(cfg, DistInfo(), overwrite=True)


def test_with_tools_each_prompt_declares_and_runs_the_builtin_tools_and_its_own_functions(models, monkeypatch,
                                                                                          small_tokenizer):
    torch.manual_seed(0)  # the specs take about 1100 of the small tokenizer's tokens: a longer context
    wide = model_config(small_tokenizer, context_length=1280)
    save_checkpoint(models / "wide-sft", GPT(wide), tokenizer=small_tokenizer)
    save_checkpoint(models / "wide-rm", ScalarHeadModel(GPT(wide)), tokenizer=small_tokenizer)
    uses = []
    real = group_rl.tool_runner

    def recording(world):
        use = real(world)

        def record(prompt):
            uses.append(use(prompt))
            return uses[-1]

        return record

    monkeypatch.setattr(group_rl, "tool_runner", recording)
    write_prompts(models / "prompts.jsonl", PROMPTS[2:])
    with (models / "prompts.jsonl").open("a") as f:
        f.write(json.dumps({"prompt": "What is the capital of Redumar?", "tools": [function_spec("capital")]}) + "\n")
    cfg = group_config("grpo", models, tools=True, reward="both", val_prompts=0)
    cfg.policy, cfg.reward_model = str(models / "wide-sft"), str(models / "wide-rm")
    record = run_grpo(cfg, DistInfo()).metrics[0]
    assert math.isfinite(record["train/score"])
    assert {frozenset(u.run) for u in uses} == {frozenset({"calculator", "calendar"}),
                                                frozenset({"calculator", "calendar", "get_capital"})}


def test_seeds_train_grpo_and_rloo_as_the_demo_trains_ppo(tmp_path, monkeypatch):
    from chatforge.train import seeds

    seen = []
    monkeypatch.setattr(seeds, "run_grpo", lambda cfg, dist: seen.append(cfg))
    monkeypatch.setattr(seeds, "run_rloo", lambda cfg, dist: seen.append(cfg))
    assert {"grpo", "rloo"} <= set(seeds.METHODS)
    settings = seeds.SeedSettings(group_reward="verifier")
    for method in ("grpo", "rloo"):
        out = settings.out_dir(tmp_path, method, 1)
        assert out == tmp_path / "seeds" / f"{method}-verifier-1"
        seeds.train_group(tmp_path, out, 1, settings, method)
    assert seeds.SeedSettings().out_dir(tmp_path, "grpo", 0) == tmp_path / "seeds" / "grpo-0"
    grpo, rloo = seen
    assert (grpo.grpo.reward, rloo.rloo.reward) == ("verifier", "verifier")
    assert grpo.train.lr == rloo.train.lr == 3e-5 and grpo.train.max_steps == settings.ppo_steps
    assert grpo.policy == str(tmp_path / "sft") and rloo.prompts == [str(tmp_path / "tasks/rl_train.jsonl")]


def test_settings_refuse_what_cannot_work(models):
    with pytest.raises(ConfigError, match="num_generations"):
        GRPOSettings(num_generations=1)
    with pytest.raises(ConfigError, match=r"--reward.*'model', 'verifier', 'both'"):
        RLOOSettings(reward="oracle")
    with pytest.raises(ConfigError, match="--reward-model"):
        run_rloo(RLOOConfig(prompts=[str(models / "prompts.jsonl")], policy=str(models / "sft")), DistInfo())
    with pytest.raises(ConfigError, match=r"minibatch \(3\) must divide"):
        run_grpo(group_config("grpo", models, minibatch=3), DistInfo())


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_grpo_and_rloo_on_the_command_line_and_their_checkpoint_is_a_chat_model(models, capsys, kind):
    from test_cli import run_cli

    out = models / f"cli-{kind}"
    status = run_cli(kind, "--prompts", models / "prompts.jsonl", "--policy", models / "sft", "--reward-model",
                     models / "rm", "--out", out, "--max-steps", "1", "--prompts-per-step", "2", "--num-generations",
                     "2", "--max-new-tokens", "4", "--no-progress", "--val", models / "prompts.jsonl")
    assert status == 0
    assert f"{kind}: finished at step 1; score" in capsys.readouterr().out
    assert run_cli("generate", "--checkpoint", out, "--prompt", "Mira", "--max-tokens", "3", "--no-fused") == 0
    assert run_cli(kind, "--prompts", models / "prompts.jsonl", "--policy", models / "sft", "--out", out,
                   "--reward", "oracle") == 2
    assert "--reward" in capsys.readouterr().err
