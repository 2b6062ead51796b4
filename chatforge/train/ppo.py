"""PPO from a reward model with a KL penalty to the frozen SFT model (InstructGPT's RLHF step).

One step of the training harness (`PPOStep.run`) is one PPO iteration:

1. rollout: the policy answers a batch of prompts through the engine, pure sampling at
   `temperature` (no top-k/top-p, so the sampled distribution is the one whose log-probs PPO uses);
2. scoring, with the policy in eval mode (no dropout) and logits divided by the same temperature:
   old log-probs of the policy, log-probs of the frozen reference, values of the value model,
   the reward model's score at the end of each answer (minus `missing_eos_penalty` when the answer
   ran out of tokens before `<|end|>`);
3. per-token rewards r_t = -beta * (log pi(y_t) - log pi_ref(y_t)), plus the score at the last
   token; optional reward whitening; GAE advantages (gamma, lambda) and returns; advantage whitening;
4. `ppo_epochs` passes over the rollout in minibatches: clipped policy loss, clipped value loss,
   optional ptx loss (language modeling on pretraining shards), one optimizer step each;
5. the adaptive KL controller (Ziegler et al.) moves beta toward `kl_target`.

The policy and the value model train together (one optimizer, one `ActorCritic` module); the
reference and reward models are frozen and never handed to the optimizer. What PPO shares with GRPO
and RLOO (prompt fitting, the engine's rollouts, log-probs, the reward model's scores, loading and
freezing models) is in `chatforge.train.rollout`. The checkpoint's
`model.safetensors` is the policy (every command reads it as a chat model), `value.safetensors`
the value model, and `config.json` carries beta, so `--resume` continues exactly.

Two options cut memory (benchmarks/bench_ppo.py measures them):

- `--frozen-dtype bfloat16` keeps the reference and the reward model in bf16: half their memory.
  Their outputs are cast to float32 before the log-softmax and the rewards, so only their
  weights and activations are rounded (to bf16's 8 significant bits, about 0.4%). A CPU
  without bf16 instructions emulates bf16 matmuls: there the scoring passes get slower.
- `--shared-value-head` puts the value head on the policy's own trunk instead of a second
  backbone: one forward pass gives logits and values, and the value model's weights, gradients
  and two AdamW moments (four times a model's size) are gone. The value loss then also trains
  the policy's trunk (scaled by vf_coef). `value.safetensors` holds just the head.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from chatforge.chat import ChatTemplate
from chatforge.checkpoint import WEIGHTS_FILE, load_state_into, model_state_dict, read_json
from chatforge.data.chat_readers import read_prompts
from chatforge.errors import CheckpointError, ConfigError, DataError
from chatforge.generate.tool_loop import ToolUse
from chatforge.lora import BaseModelView, add_adapters, trainable_parameters
from chatforge.model import GPT, ScalarHeadModel, lm_loss
from chatforge.tools import builtin_tools
from chatforge.train.config import PPOConfig, PPOSettings, TrainConfig
from chatforge.train.distributed import DistInfo, all_reduce_sum
from chatforge.train.loop import Trainer, TrainResult, build_optimizer, wrap_model
from chatforge.train.ppo_math import AdaptiveKL, gae, policy_loss, token_rewards, value_loss, whiten
from chatforge.train.rollout import (
    FROZEN_DTYPES,
    RewardFn,
    Rollout,
    Sampler,
    entropy_of,
    fit_prompts,
    freeze,
    load_policy,
    load_reward_model,
    response_logprobs,
    reward_model_scores,
    step_prompts,
)

VALUE_FILE = "value"  # value.safetensors beside the policy's model.safetensors


# ---- models --------------------------------------------------------------------------------------


class ValueHead(nn.Module):
    """The value model of `--shared-value-head`: a scalar head on the policy's final hidden states."""

    def __init__(self, n_embd: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.head = nn.Linear(n_embd, 1, device=device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).squeeze(-1)

    @classmethod
    def from_reward_model(cls, rm: ScalarHeadModel, n_embd: int) -> ValueHead:
        """The reward model's head (its gain and bias folded in) when it reads vectors of the policy's width.

        Otherwise zeros: every first value is 0, a neutral baseline that GAE starts from, where a random
        head on a trunk trained for language would give arbitrary values.
        """
        value = cls(n_embd, device=rm.head.weight.device)
        with torch.no_grad():
            if rm.head.weight.shape == value.head.weight.shape:
                value.head.weight.copy_(rm.gain * rm.head.weight)  # gain * (w.h + b) + bias
                value.head.bias.copy_(rm.gain * rm.head.bias + rm.bias)
            else:
                nn.init.zeros_(value.head.weight)
                nn.init.zeros_(value.head.bias)
        return value


class ActorCritic(nn.Module):
    """The trained pair: the policy (a GPT) and the value model.

    The value model is a scalar head on its own backbone (a ScalarHeadModel started from the reward
    model) or, with `--shared-value-head`, a `ValueHead` on the policy's trunk, so that one forward
    pass gives both logits and values.
    """

    def __init__(self, policy: GPT, value: ScalarHeadModel | ValueHead) -> None:
        super().__init__()
        self.policy, self.value = policy, value

    @property
    def shared(self) -> bool:
        return isinstance(self.value, ValueHead)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shared:
            hidden = self.policy.hidden_states(input_ids)
            return self.policy.lm_head(hidden), self.value(hidden)  # what GPT.forward computes
        return self.policy(input_ids), self.value.values(input_ids)

    def describe_value(self) -> str:
        """The value model in words, for errors about value.safetensors."""
        if self.shared:
            return f"a value head on the policy's {self.policy.config.n_embd}-wide trunk (--shared-value-head)"
        c = self.value.config
        return f"a value model shaped like --reward-model ({c.n_layer} layers, width {c.n_embd}, vocab {c.vocab_size})"


def load_value_weights(model: ActorCritic, file: Path) -> None:
    """value.safetensors into the value model, refusing a file whose tensors are not this run's value model's."""
    expected = {k: tuple(v.shape) for k, v in model_state_dict(model.value).items()}
    if not file.exists():
        raise CheckpointError(f"{file}: missing; expected {model.describe_value()}")
    with safe_open(str(file), "pt") as f:
        names = f.keys()  # a safe_open handle is not iterable
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in names}  # shapes only: no tensor is read
    if saved != expected:
        raise CheckpointError(f"{file}: {shape_difference(saved, expected)}; expected {model.describe_value()}")
    load_state_into(model.value, file)


def shape_difference(saved: dict[str, tuple], expected: dict[str, tuple]) -> str:
    """The first way two {name: shape} maps differ, in words."""
    wrong = [k for k in sorted(saved.keys() & expected.keys()) if saved[k] != expected[k]]
    if wrong:
        return f"{wrong[0]} has shape {saved[wrong[0]]}, expected {expected[wrong[0]]}"
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    return f"missing tensors {missing[:3]}" if missing else f"unexpected tensors {unexpected[:3]}"


# ---- rollouts ------------------------------------------------------------------------------------


# ---- the step ------------------------------------------------------------------------------------


class PPOStep:
    """One PPO iteration (rollout, rewards, advantages, `ppo_epochs` of minibatch updates): the harness's Step."""

    def __init__(self, model: ActorCritic, reference: nn.Module, reward_fn: RewardFn, tokenizer,
                 prompts: list[list[int]], val_prompts: list[list[int]], settings: PPOSettings, cfg: TrainConfig,
                 dist: DistInfo, ptx_data=None) -> None:
        """prompts and val_prompts: token ids of generation prompts that fit the context (`fit_prompts`)."""
        self.model, self.cfg, self.dist = model, cfg, dist
        self.optimizer = build_optimizer(model, cfg)  # the policy and the value model; never the frozen ones
        self.forward_model = wrap_model(model, cfg, dist)
        if not prompts:
            raise DataError("ppo: no prompts")
        if settings.rollout_batch % (dist.world_size * settings.minibatch):
            raise ConfigError(f"ppo: rollout_batch ({settings.rollout_batch}) must be a multiple of processes "
                              f"({dist.world_size}) x minibatch ({settings.minibatch})")
        self.reference, self.reward_fn, self.settings = reference.eval(), reward_fn, settings
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.prompts, self.val_prompts, self.ptx_data = prompts, val_prompts, ptx_data
        self.kl = AdaptiveKL(settings.init_kl_coef, settings.kl_target, settings.kl_horizon)
        self.sampler = Sampler(model.policy, tokenizer, max(settings.rollout_batch, settings.val_prompts),
                               settings.max_new_tokens, cfg.seed)
        # with tools, rollouts run the built-in tools; the results they feed in are not actions (make_rollout)
        self.tool_use = ToolUse(builtin_tools()) if settings.tools else None
        self.bar_keys = ("train/score", "train/kl", "train/beta", "train/response_length", "val/score")

    # ---- checkpoint: policy as the main model, the value model (or head) beside it, beta in config.json ----

    def saved_models(self) -> tuple[nn.Module, dict[str, nn.Module]]:
        return self.model.policy, {VALUE_FILE: self.model.value}

    def checkpoint_config(self) -> dict:
        """beta, so that a resumed run continues the controller; and what value.safetensors holds."""
        return {"kl_coef": self.kl.value, "value_head": "shared" if self.model.shared else "separate"}

    def restore(self, path: Path) -> None:
        load_state_into(self.model.policy, path / WEIGHTS_FILE)
        load_value_weights(self.model, path / f"{VALUE_FILE}.safetensors")
        self.kl.value = float(read_json(path / "config.json", "config")["kl_coef"])

    # ---- one iteration -------------------------------------------------------------------------

    def my_prompts(self, step: int) -> tuple[list[list[int]], list[int]]:
        """This rank's share of step's global prompt batch, and each prompt's global index (its seed)."""
        mine, seeds = step_prompts(len(self.prompts), self.settings.rollout_batch, self.cfg.seed, step, self.dist)
        return [self.prompts[i] for i in mine], seeds

    def rollout(self, ids: list[list[int]], seeds: list[int], temperature: float, greedy: bool = False) -> Rollout:
        """The policy's answers to `ids`, sampled with a seed per prompt (so a rank split or a resume repeats them)."""
        return self.sampler.sample(ids, seeds, temperature, greedy, self.tool_use)

    @torch.no_grad()
    def score_rollout(self, r: Rollout) -> dict[str, torch.Tensor]:
        """Old log-probs, reference log-probs, values, scores; the same arithmetic the update uses."""
        s, device = self.settings, self.dist.device
        ids = r.ids.to(device)
        self.model.eval()
        logits, values = self.model(ids)
        ref_logits = self.reference(ids)  # bf16 with --frozen-dtype bfloat16; response_logprobs casts it
        scores = self.reward_fn(r).to(device) - s.missing_eos_penalty * (~r.ended).float().to(device)
        return {"logprobs": response_logprobs(logits, ids, s.temperature),
                "ref_logprobs": response_logprobs(ref_logits, ids, s.temperature),
                "values": values[:, :-1].float(), "scores": scores,
                "entropy": entropy_of(logits, s.temperature)}

    def run(self, step: int) -> dict[str, float]:
        """Answer this rank's prompts, score them, compute advantages, then update policy and value model."""
        s, device = self.settings, self.dist.device
        prompts, seeds = self.my_prompts(step)
        r = self.rollout(prompts, seeds, s.temperature)
        scored = self.score_rollout(r)
        mask = r.mask.to(device)
        rewards, kl = token_rewards(scored["logprobs"], scored["ref_logprobs"], scored["scores"], mask, self.kl.value)
        if s.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False, across_processes=self.dist.distributed)
        advantages, returns = gae(rewards, scored["values"], mask, s.gamma, s.lam)
        advantages = whiten(advantages, mask, across_processes=self.dist.distributed)
        data = {"ids": r.ids.to(device), "mask": mask, "old_logprobs": scored["logprobs"],
                "old_values": scored["values"], "advantages": advantages, "returns": returns}
        stats = self.optimize(step, data)
        kl_per_answer = kl.sum(1)
        totals = all_reduce_sum(torch.stack([
            scored["scores"].sum(), kl_per_answer.sum(), (scored["entropy"] * mask).sum(),
            mask.sum(1).sum(), r.ended.float().sum().to(device), torch.tensor(float(len(r.responses)), device=device),
        ]).double().cpu())
        n = totals[5].item()
        mean_kl = totals[1].item() / n
        beta = self.kl.value
        if s.adaptive_kl:
            self.kl.update(mean_kl, int(n))
        return {"train/score": totals[0].item() / n, "train/kl": mean_kl, "train/beta": beta,
                "train/entropy": totals[2].item() / max(totals[3].item(), 1),  # per answer token
                "train/response_length": totals[3].item() / n,
                "train/ended": totals[4].item() / n, **stats, "lr": self.cfg.lr_at(step),
                "tokens": int(r.lengths.sum())}

    def optimize(self, step: int, data: dict[str, torch.Tensor]) -> dict[str, float]:
        """`ppo_epochs` seeded passes over the rollout in minibatches, one optimizer step each; mean statistics."""
        s, lr = self.settings, self.cfg.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rows = data["ids"].shape[0]
        sums: dict[str, float] = {}
        updates = 0
        self.model.train()
        self.model.policy.eval()  # dropout off: the log-probs must be those of the sampled distribution
        self.model.value.eval()
        for epoch in range(s.ppo_epochs):
            order = torch.from_numpy(np.random.default_rng([self.cfg.seed, step, epoch, self.dist.rank])
                                     .permutation(rows))
            for start in range(0, rows, s.minibatch):
                idx = order[start : start + s.minibatch]
                mb = {k: v[idx] for k, v in data.items()}
                loss, stats = self.minibatch_loss(mb, step, epoch, start)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip or float("inf"))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                stats["grad_norm"] = float(grad_norm)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                updates += 1
        reduced = all_reduce_sum(torch.tensor([sums[k] for k in sorted(sums)], dtype=torch.float64))
        return {f"train/{k}": reduced[i].item() / (updates * self.dist.world_size) for i, k in enumerate(sorted(sums))}

    def minibatch_loss(self, mb: dict[str, torch.Tensor], step: int, epoch: int,
                       start: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped policy loss + vf_coef * clipped value loss (+ ptx_coef * LM loss), and its parts, detached."""
        s = self.settings
        logits, values = self.forward_model(mb["ids"])
        logprobs = response_logprobs(logits, mb["ids"], s.temperature)
        pg, stats = policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], mb["mask"], s.cliprange)
        vf = value_loss(values[:, :-1].float(), mb["old_values"], mb["returns"], mb["mask"], s.cliprange_value)
        loss = pg + s.vf_coef * vf
        out = {"policy_loss": pg.detach(), "value_loss": vf.detach(), **{k: v.detach() for k, v in stats.items()}}
        if s.ptx_coef and self.ptx_data is not None:
            x, y = self.ptx_data.sample_batch(np.random.default_rng([self.cfg.seed, step, epoch, start, 7]),
                                              s.minibatch, min(self.model.policy.config.context_length, 128))
            ptx = lm_loss(self.model.policy(x.to(self.dist.device)), y.to(self.dist.device))
            loss = loss + s.ptx_coef * ptx
            out["ptx_loss"] = ptx.detach()
        out["loss"] = loss.detach()
        return loss, out

    # ---- evaluation: greedy answers to held-out prompts, scored by the reward function -----------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy answers to the held-out prompts: their mean score, KL to the reference and length."""
        if not self.val_prompts:
            return {}
        prompts = self.val_prompts[: self.settings.val_prompts]
        r = self.rollout(prompts, list(range(len(prompts))), self.settings.temperature, greedy=True)
        scored = self.score_rollout(r)
        mask = r.mask.to(self.dist.device)
        kl = ((scored["logprobs"] - scored["ref_logprobs"]) * mask).sum(1)
        return {"val/score": scored["scores"].mean().item(), "val/kl": kl.mean().item(),
                "val/response_length": mask.sum(1).mean().item()}


def build_models(cfg: PPOConfig, device: torch.device) -> tuple[ActorCritic, nn.Module, ScalarHeadModel, object]:
    """Policy and reference from the SFT checkpoint (with LoRA, the reference is the policy's base: adapters off);
    reward model; value model (or head) initialized from it."""
    sft = load_policy("ppo", cfg.policy, device)
    rm = load_reward_model("ppo", cfg.reward_model, sft, cfg.policy, device)
    policy, dtype = sft.model, FROZEN_DTYPES[cfg.ppo.frozen_dtype]
    if cfg.ppo.shared_value_head:
        value = ValueHead.from_reward_model(rm.model, policy.config.n_embd)
    else:
        value = copy.deepcopy(rm.model)  # the value model starts as the reward model, in float32
    if cfg.lora.rank:  # one frozen base: the policy is it with adapters on, the reference with them off
        reference = BaseModelView(add_adapters(policy, cfg.lora, base=cfg.policy))
    else:
        reference = freeze(copy.deepcopy(policy), dtype)
    return ActorCritic(policy, value), reference, freeze(rm.model, dtype), sft.tokenizer


def describe_value_start(model: ActorCritic, rm: ScalarHeadModel) -> str:
    """Where the value model starts, for the run's opening lines (see ValueHead.from_reward_model)."""
    width = model.policy.config.n_embd
    if not model.shared:
        return "model: a float32 copy of the reward model"
    if rm.config.n_embd == width:
        return "head on the policy's trunk, started from the reward model's head"
    return f"head on the policy's trunk, started at zeros (reward model width {rm.config.n_embd}, policy {width})"


def run_ppo(cfg: PPOConfig, dist: DistInfo, resume: bool = False, overwrite: bool = False,
            callbacks: list | None = None, reward_fn: RewardFn | None = None) -> TrainResult:
    if not cfg.policy or not cfg.reward_model:
        raise ConfigError("ppo: --policy (the SFT checkpoint) and --reward-model are required")
    if not cfg.prompts:
        raise ConfigError("ppo: --prompts is required ({\"prompt\"} JSONL)")
    torch.manual_seed(cfg.train.seed)
    model, reference, rm, tokenizer = build_models(cfg, dist.device)
    template, context = ChatTemplate(tokenizer), model.policy.config.context_length
    builtin = [t.spec() for t in builtin_tools().values()] if cfg.ppo.tools else []  # declared in every prompt
    records = read_prompts(cfg.prompts).prompts
    prompts = fit_prompts([r.messages for r in records], cfg.prompts, "--prompts", template, context,
                          cfg.ppo.max_new_tokens, [builtin + r.tools for r in records])
    val_records = read_prompts(cfg.val).prompts[: cfg.ppo.val_prompts] if cfg.val else []
    val = fit_prompts([r.messages for r in val_records], cfg.val, "--val", template, context, cfg.ppo.max_new_tokens,
                      [builtin + r.tools for r in val_records])
    ptx = None
    if cfg.ppo.ptx_coef:
        if not cfg.ppo.ptx_data:
            raise ConfigError("ppo: --ptx-coef needs --ptx-data (token shards from `chatforge data prepare`)")
        from chatforge.data.shards import TokenDataset

        ptx = TokenDataset(cfg.ppo.ptx_data, "train", expected_tokenizer_hash=tokenizer.hash)
    run_config = {k: v for k, v in asdict(cfg).items() if k not in ("train", "out")}
    step = PPOStep(model, reference, reward_fn or reward_model_scores(rm), tokenizer, prompts, val, cfg.ppo, cfg.train,
                   dist, ptx_data=ptx)
    trainer = Trainer(step, cfg.train, cfg.out, dist, tokenizer=tokenizer, run_config=run_config,
                      extra_config={"stage": "ppo"}, callbacks=callbacks)
    if dist.is_main:
        print(f"ppo: {len(prompts)} prompts, {cfg.ppo.rollout_batch} answers per iteration, "
              f"{cfg.ppo.ppo_epochs} epochs of minibatches of {cfg.ppo.minibatch}; beta {cfg.ppo.init_kl_coef}"
              f"{' (adaptive)' if cfg.ppo.adaptive_kl else ''}; {dist.world_size} process(es)")
        frozen = "reward model" if cfg.lora.rank else "reference and reward model"
        print(f"ppo: value {describe_value_start(model, rm)}; {frozen} in {cfg.ppo.frozen_dtype}")
        if cfg.lora.rank:
            print(f"ppo: LoRA rank {cfg.lora.rank} on {cfg.lora.target_modules}: {trainable_parameters(model):,} "
                  "parameters train (adapters and value head); the reference is the policy's base, adapters off")
    return trainer.fit(resume=resume, overwrite=overwrite)

