"""GRPO and RLOO: RL from a group of answers per prompt, whose rewards are each other's baseline (no value model).

One step of the training harness (`GroupStep.run`) is one iteration:

1. rollout: `prompts_per_step` prompts, drawn as PPO draws them (seeded by seed and step), each answered
   `num_generations` (G) times through the engine with pure sampling at `temperature`, a seed per answer;
2. scoring, the policy in eval mode, logits divided by the temperature: the rollout policy's log-probs,
   the frozen reference's (only when beta > 0: with beta = 0 no reference exists), and each answer's
   reward: the reward model's score, the verifier's +1/-1, or both (`--reward`), minus
   `missing_eos_penalty` when the answer ran out of tokens before `<|end|>`;
3. advantages, one per answer and the same on each of its tokens:
   - GRPO (`GRPOStep`, Shao et al. 2024, as TRL's GRPOTrainer): (r - mean of its group) / (std of its
     group + 1e-4), or without the division (`--no-scale-rewards`, Dr. GRPO);
   - RLOO (`RLOOStep`, Ahmadian et al. 2024, as TRL's RLOOTrainer): r' = r - beta * sum_t (log pi -
     log pi_ref) folds the KL into the reward, then r'_i minus the mean of the other G - 1 r' of its group;
4. `ppo_epochs` seeded passes over the answers in minibatches, one optimizer step each:
   - GRPO: the clipped surrogate with each token's ratio to the rollout policy, plus beta * the k3 KL to
     the reference per token, summed over the tokens and divided by their number in the global minibatch
     (token-level normalisation, TRL's "dapo" loss type: long answers weigh by their tokens);
   - RLOO: REINFORCE with the answer as one action: the clipped surrogate of the answer's ratio
     exp(sum_t (log pi - log pi_old)), a mean over answers.
   With the defaults (`ppo_epochs` 1, `minibatch` 0: all answers in one step) the ratio is exactly 1
   and the clipping never acts: plain policy gradient, as TRL's defaults.

The arithmetic is in `group_math.py`; rollouts, log-probs and the reward model's scores are the ones PPO
uses (`rollout.py`). The checkpoint's `model.safetensors` is the policy, read by every command as a chat
model; nothing else is saved beside it (beta is a constant, there is no value model), so `--resume`
continues exactly from the weights, the optimizer and the step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from chatforge.chat import ChatTemplate, Conversation
from chatforge.checkpoint import WEIGHTS_FILE, load_state_into
from chatforge.data.chat_readers import read_prompts
from chatforge.data.tasks.calls import builtin_specs, task_tools
from chatforge.data.tasks.verifier import Verifier
from chatforge.data.tasks.vocabulary import TODAY
from chatforge.data.world import World
from chatforge.errors import ConfigError, DataError
from chatforge.generate.tool_loop import ToolUse
from chatforge.model import GPT
from chatforge.train.config import GroupRLConfig, GroupRLSettings, GRPOConfig, RLOOConfig, TrainConfig
from chatforge.train.distributed import DistInfo, all_reduce_sum
from chatforge.train.group_math import (
    group_advantages,
    grpo_loss,
    leave_one_out_advantages,
    rloo_loss,
    rloo_rewards,
)
from chatforge.train.loop import Trainer, TrainResult, build_optimizer, wrap_model
from chatforge.train.rollout import (
    FROZEN_DTYPES,
    RewardFn,
    RLPrompt,
    Rollout,
    Sampler,
    entropy_of,
    fit_prompts,
    freeze,
    load_policy,
    load_reward_model,
    response_logprobs,
    response_of,
    reward_model_scores,
    step_prompts,
)

ToolRunner = Callable[[RLPrompt], ToolUse]


class GroupStep:
    """One iteration of a group RL method (rollout of G answers per prompt, rewards, advantages, updates): the
    harness's Step. Subclasses say how rewards become advantages and what the loss is."""

    stage = ""

    def __init__(self, policy: GPT, reference: GPT | None, reward_fn: RewardFn, tokenizer, prompts: list[RLPrompt],
                 val_prompts: list[RLPrompt], settings: GroupRLSettings, cfg: TrainConfig, dist: DistInfo,
                 tools: ToolRunner | None = None) -> None:
        """reference: the frozen SFT model, None when beta is 0. tools: each prompt's tool use, or None."""
        s = settings
        if not prompts:
            raise DataError(f"{self.stage}: no prompts")
        if s.prompts_per_step % dist.world_size:
            raise ConfigError(f"{self.stage}: prompts_per_step ({s.prompts_per_step}) must be a multiple of the "
                              f"processes ({dist.world_size}): each process answers whole groups")
        rows = s.answers_per_step // dist.world_size
        if s.minibatch and rows % s.minibatch:
            raise ConfigError(f"{self.stage}: minibatch ({s.minibatch}) must divide each process's answers per "
                              f"iteration (prompts_per_step x num_generations / processes = {rows})")
        self.policy, self.reference, self.reward_fn, self.settings = policy, reference, reward_fn, s
        self.cfg, self.dist, self.prompts, self.val_prompts, self.tools = cfg, dist, prompts, val_prompts, tools
        self.optimizer = build_optimizer(policy, cfg)  # the policy only; the frozen models are never in it
        self.forward_model = wrap_model(policy, cfg, dist)
        self.sampler = Sampler(policy, tokenizer, max(rows, s.val_prompts), s.max_new_tokens, cfg.seed)
        self.bar_keys = ("train/score", "train/kl", "train/response_length", "val/score")

    # ---- checkpoint: the policy alone ------------------------------------------------------------

    def saved_models(self) -> tuple[nn.Module, dict[str, nn.Module]]:
        return self.policy, {}

    def checkpoint_config(self) -> dict:
        return {}

    def restore(self, path: Path) -> None:
        load_state_into(self.policy, path / WEIGHTS_FILE)

    # ---- what the two methods do differently ------------------------------------------------------

    def advantages(self, scored: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per answer: the advantage, and the reward it was computed from."""
        raise NotImplementedError

    def loss(self, logprobs: torch.Tensor, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    # ---- one iteration ---------------------------------------------------------------------------

    def rollout(self, prompts: list[RLPrompt], seeds: list[int], greedy: bool = False) -> Rollout:
        uses = [self.tools(p) for p in prompts] if self.tools else None
        r = self.sampler.sample([p.ids for p in prompts], seeds, self.settings.temperature, greedy, uses)
        r.prompts = prompts
        return r

    @torch.no_grad()
    def score_rollout(self, r: Rollout) -> dict[str, torch.Tensor]:
        """The rollout policy's log-probs and entropy, the reference's log-probs (beta > 0), the rewards."""
        s, device = self.settings, self.dist.device
        ids = r.ids.to(device)
        self.policy.eval()
        logits = self.policy(ids)
        out = {"logprobs": response_logprobs(logits, ids, s.temperature), "entropy": entropy_of(logits, s.temperature)}
        if self.reference is not None:  # bf16 with --frozen-dtype bfloat16; response_logprobs casts it
            out["ref_logprobs"] = response_logprobs(self.reference(ids), ids, s.temperature)
        out["scores"] = self.reward_fn(r).to(device) - s.missing_eos_penalty * (~r.ended).float().to(device)
        return out

    def run(self, step: int) -> dict[str, float]:
        """Answer this process's prompts G times each, score the answers, then update the policy."""
        s, device, G = self.settings, self.dist.device, self.settings.num_generations
        mine, seeds = step_prompts(len(self.prompts), s.prompts_per_step, self.cfg.seed, step, self.dist)
        # a prompt's G answers side by side, answer g of the prompt of global index k seeded by k * G + g
        r = self.rollout([self.prompts[i] for i in mine for _ in range(G)],
                         [k * G + g for k in seeds for g in range(G)])
        scored = self.score_rollout(r)
        mask = r.mask.to(device)
        advantages, rewards = self.advantages(scored, mask)
        data = {"ids": r.ids.to(device), "mask": mask, "old_logprobs": scored["logprobs"], "advantages": advantages}
        if "ref_logprobs" in scored:
            data["ref_logprobs"] = scored["ref_logprobs"]
        stats = self.optimize(step, data)
        groups = rewards.view(-1, G)
        kl = ((scored["logprobs"] - scored["ref_logprobs"]) * mask).sum(1) if "ref_logprobs" in scored else None
        totals = all_reduce_sum(torch.stack([
            scored["scores"].sum(), kl.sum() if kl is not None else torch.zeros((), device=device),
            (scored["entropy"] * mask).sum(), mask.sum(), r.ended.float().sum().to(device),
            torch.tensor(float(len(r.responses)), device=device), (groups == groups[:, :1]).all(1).float().sum(),
        ]).double()).cpu()  # reduced on the device: NCCL reduces only CUDA tensors
        n, length = totals[5].item(), totals[3].item()
        out = {"train/score": totals[0].item() / n, "train/entropy": totals[2].item() / max(length, 1),
               "train/response_length": length / n, "train/ended": totals[4].item() / n,
               "train/zero_std_groups": totals[6].item() / (n / G),  # groups with no signal: all rewards equal
               **stats, "lr": self.cfg.lr_at(step), "tokens": int(r.lengths.sum())}
        if kl is not None:
            out["train/kl"] = totals[1].item() / n  # nats per answer, sum_t (log pi_old - log pi_ref), as PPO's
        return out

    def optimize(self, step: int, data: dict[str, torch.Tensor]) -> dict[str, float]:
        """`ppo_epochs` seeded passes over the answers in minibatches, one optimizer step each; mean statistics."""
        s, lr = self.settings, self.cfg.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rows = data["ids"].shape[0]
        size = s.minibatch or rows
        sums: dict[str, float] = {}
        updates = 0
        self.policy.eval()  # dropout off: the log-probs must be those of the sampled distribution
        for epoch in range(s.ppo_epochs):
            order = torch.from_numpy(np.random.default_rng([self.cfg.seed, step, epoch, self.dist.rank])
                                     .permutation(rows))
            for start in range(0, rows, size):
                mb = {k: v[order[start : start + size]] for k, v in data.items()}
                logprobs = response_logprobs(self.forward_model(mb["ids"]), mb["ids"], s.temperature)
                loss, stats = self.loss(logprobs, mb)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip or float("inf"))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for k, v in {**stats, "loss": loss, "grad_norm": grad_norm}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                updates += 1
        reduced = all_reduce_sum(torch.tensor([sums[k] for k in sorted(sums)], dtype=torch.float64,
                                              device=self.dist.device)).cpu()
        return {f"train/{k}": reduced[i].item() / (updates * self.dist.world_size) for i, k in enumerate(sorted(sums))}

    # ---- evaluation: greedy answers to held-out prompts ------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy answers to the held-out prompts: mean reward (missing-EOS penalty included), KL, length."""
        prompts = self.val_prompts[: self.settings.val_prompts]
        if not prompts:
            return {}
        r = self.rollout(prompts, list(range(len(prompts))), greedy=True)
        scored = self.score_rollout(r)
        mask = r.mask.to(self.dist.device)
        out = {"val/score": scored["scores"].mean().item(), "val/response_length": mask.sum(1).mean().item()}
        if "ref_logprobs" in scored:
            out["val/kl"] = ((scored["logprobs"] - scored["ref_logprobs"]) * mask).sum(1).mean().item()
        return out


class GRPOStep(GroupStep):
    """GRPO: group-normalised advantages on every token; clipped token ratios; beta * k3 KL in the loss."""

    stage = "grpo"

    def advantages(self, scored: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        return group_advantages(scored["scores"], s.num_generations, s.scale_rewards), scored["scores"]

    def loss(self, logprobs: torch.Tensor, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s, tokens = self.settings, None
        if self.dist.distributed:  # the global minibatch's tokens, per process: DDP then averages the gradients
            tokens = all_reduce_sum(mb["mask"].sum().double().reshape(1))[0].item() / self.dist.world_size
        return grpo_loss(logprobs, mb["old_logprobs"], mb.get("ref_logprobs"), mb["advantages"], mb["mask"],
                         s.cliprange, s.beta, tokens)


class RLOOStep(GroupStep):
    """RLOO: the KL folded into each answer's reward, leave-one-out advantages, REINFORCE on whole answers."""

    stage = "rloo"

    def advantages(self, scored: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        rewards, _ = rloo_rewards(scored["scores"], scored["logprobs"], scored.get("ref_logprobs"), mask, s.beta)
        return leave_one_out_advantages(rewards, s.num_generations), rewards

    def loss(self, logprobs: torch.Tensor, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return rloo_loss(logprobs, mb["old_logprobs"], mb["advantages"], mb["mask"], self.settings.cliprange)


# ---- rewards and prompts ---------------------------------------------------------------------------


def verifier_rewards(verifier: Verifier, template: ChatTemplate, fallback: RewardFn | None = None) -> RewardFn:
    """+1 for an answer the verifier finds right, -1 for one it finds wrong: the reward model's scale, whose
    scores of SFT answers have mean 0 and std 1. Where it cannot tell, `fallback`'s score (the reward
    model's, with --reward both), else 0. The answer is read back from its tokens as the scorer reads one."""

    def score(r: Rollout) -> torch.Tensor:
        out = fallback(r).float().clone() if fallback else torch.zeros(len(r.responses))
        for b, (prompt, tokens) in enumerate(zip(r.prompts, r.responses)):
            verdict = verifier.verify(prompt.conversation, response_of(template, tokens), prompt.family)
            if verdict is not None:
                out[b] = 2.0 * verdict - 1.0
        return out

    return score


def rl_prompts(stage: str, sources: list[str], flag: str, template: ChatTemplate, context: int, s: GroupRLSettings,
               verifier: Verifier | None, limit: int | None = None) -> tuple[list[RLPrompt], int]:
    """The prompts of `sources` fitted to the context, each with its declared tools (the built-in ones too with
    --tools); with --reward verifier only those the verifier checks (the first `limit` of them). And how many
    were left out."""
    records = read_prompts(sources).prompts
    declared = [(builtin_specs() if s.tools else []) + r.tools for r in records]
    conversations = [Conversation(list(r.messages), d) for r, d in zip(records, declared)]
    keep = list(range(len(records)))
    if s.reward == "verifier":
        keep = [i for i in keep if verifier.verifiable(conversations[i], records[i].family)]
        if not keep:
            raise DataError(f"{stage}: none of the {len(records)} prompts of {flag} is one the verifier checks "
                            "(arithmetic, word tasks, calc, dates, functions); use --reward model or both")
    keep = keep[:limit] if limit is not None else keep
    ids = fit_prompts([records[i].messages for i in keep], sources, flag, template, context, s.max_new_tokens,
                      [declared[i] for i in keep], positions=keep)
    prompts = [RLPrompt(x, conversations[i], records[i].family) for x, i in zip(ids, keep)]
    return prompts, len(records) - len(keep) if limit is None else 0


def tool_runner(world: World) -> ToolRunner:
    """Each prompt's tool use: the calculator, the calendar on the task data's clock, and the world functions,
    those the prompt declares (the built-in ones always are, with --tools)."""
    tools = task_tools(world, TODAY)

    def use(prompt: RLPrompt) -> ToolUse:
        declared = {t["name"] for t in prompt.conversation.tools}
        return ToolUse({name: tool for name, tool in tools.items() if name in declared})

    return use


# ---- the stage -------------------------------------------------------------------------------------


def load_models(stage: str, cfg: GroupRLConfig, device: torch.device,
                need_rm: bool) -> tuple[GPT, GPT | None, nn.Module | None, object]:
    """The policy from the SFT checkpoint; the frozen reference (None when beta is 0: never built); the
    frozen reward model (None when no reward needs it); the tokenizer."""
    s = cfg.settings
    sft = load_policy(stage, cfg.policy, device)
    dtype = FROZEN_DTYPES[s.frozen_dtype]
    rm = load_reward_model(stage, cfg.reward_model, sft, cfg.policy, device).model if need_rm else None
    reference = freeze(copy.deepcopy(sft.model), dtype) if s.beta else None
    return sft.model, reference, freeze(rm, dtype) if rm is not None else None, sft.tokenizer


def run_grpo(cfg: GRPOConfig, dist: DistInfo, resume: bool = False, overwrite: bool = False,
             callbacks: list | None = None, reward_fn: RewardFn | None = None) -> TrainResult:
    return run_group(GRPOStep, cfg, dist, resume, overwrite, callbacks, reward_fn)


def run_rloo(cfg: RLOOConfig, dist: DistInfo, resume: bool = False, overwrite: bool = False,
             callbacks: list | None = None, reward_fn: RewardFn | None = None) -> TrainResult:
    return run_group(RLOOStep, cfg, dist, resume, overwrite, callbacks, reward_fn)


def run_group(step_cls: type[GroupStep], cfg: GroupRLConfig, dist: DistInfo, resume: bool, overwrite: bool,
              callbacks: list | None, reward_fn: RewardFn | None) -> TrainResult:
    """Train `step_cls` (GRPOStep or RLOOStep) from cfg; `reward_fn` replaces the reward (the tests' toy rewards)."""
    stage, s = step_cls.stage, cfg.settings
    need_rm = reward_fn is None and s.reward != "verifier"
    if not cfg.policy or (need_rm and not cfg.reward_model):
        raise ConfigError(f"{stage}: --policy (the SFT checkpoint) is required, and --reward-model with "
                          f"--reward {s.reward}")
    if not cfg.prompts:
        raise ConfigError(f"{stage}: --prompts is required ({{\"prompt\"}} JSONL)")
    torch.manual_seed(cfg.train.seed)
    policy, reference, rm, tokenizer = load_models(stage, cfg, dist.device, need_rm)
    world = (World.load(s.world) if s.world else World.build(seed=0)) if s.reward != "model" or s.tools else None
    verifier = Verifier(world) if s.reward != "model" else None
    template, context = ChatTemplate(tokenizer), policy.config.context_length
    prompts, dropped = rl_prompts(stage, cfg.prompts, "--prompts", template, context, s, verifier)
    val = rl_prompts(stage, cfg.val, "--val", template, context, s, verifier, s.val_prompts)[0] if cfg.val else []
    if reward_fn is None:
        model_scores = reward_model_scores(rm) if rm is not None else None
        reward_fn = model_scores if verifier is None else verifier_rewards(verifier, template, model_scores)
    step = step_cls(policy, reference, reward_fn, tokenizer, prompts, val, s, cfg.train, dist,
                    tool_runner(world) if s.tools else None)
    run_config = {k: v for k, v in asdict(cfg).items() if k not in ("train", "out")}
    trainer = Trainer(step, cfg.train, cfg.out, dist, tokenizer=tokenizer, run_config=run_config,
                      extra_config={"stage": stage}, callbacks=callbacks)
    if dist.is_main:
        left_out = f" ({dropped} the verifier cannot check left out)" if dropped else ""
        kl = "none, no reference" if not s.beta else ("k3 in the loss" if stage == "grpo" else "in the reward")
        print(f"{stage}: {len(prompts)} prompts{left_out}, {s.prompts_per_step} x {s.num_generations} answers per "
              f"iteration, {s.ppo_epochs} epoch(s) of minibatches of {s.minibatch or 'all'}; reward {s.reward}; "
              f"beta {s.beta:g} ({kl}); {dist.world_size} process(es)")
    return trainer.fit(resume=resume, overwrite=overwrite)
