"""PPO's arithmetic, free of models and data; each piece is checked against a hand computation in tests/test_ppo.py.

Per-token tensors are (B, T) with a mask of 1 at response tokens and 0 at prompt and padding
positions; every mean here is over the masked entries only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from chatforge.train.distributed import all_reduce_sum


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the entries where mask is 1 (0 when there are none)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
           across_processes: bool = False) -> torch.Tensor:
    """(x - mean) / std over the masked entries, zero elsewhere; the mean is kept when shift_mean is False.

    Rewards keep their mean (shift_mean=False) so that whitening changes their scale, not their sign;
    advantages are centred. With across_processes the mean and variance are those of the global batch:
    each process's sums are added up over all processes (in float64, so that how the batch is split
    over processes barely moves them), and every process then whitens its rows with the same statistics.
    """
    if across_processes:
        sums = all_reduce_sum(torch.stack([(x * mask).sum(), mask.sum()]).double().cpu())
        mean = (sums[0] / sums[1]).to(x)
        var = (all_reduce_sum(((x - mean) ** 2 * mask).sum().double().cpu().reshape(1))[0] / sums[1]).to(x)
    else:
        mean = masked_mean(x, mask)
        var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def token_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                  beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards -beta * kl_t with each row's score added at its last response token; and kl_t."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    rewards[torch.arange(len(scores)), last_index(mask)] += scores
    return rewards * mask, kl


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last masked position (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * (mask > 0)).argmax(1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimates and returns over the policy's actions (mask 1), rows right-padded.

    Positions with mask 0 inside an answer (tool results the engine fed in) are not actions: the action
    before them is followed by the action after them, so the recursion steps over them, carrying the
    running estimate and the next value across; they get no advantage and no return."""
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(running)
    for t in reversed(range(T)):
        acts = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(acts, delta + gamma * lam * running, running)
        next_value = torch.where(acts, values[:, t], next_value)
        advantages[:, t] = running * mask[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, masked mean over tokens; with clip fraction, approx KL and mean ratio."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
             "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
             "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> torch.Tensor:
    """0.5 * max of the plain and the clipped squared errors, masked mean."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


@dataclass
class AdaptiveKL:
    """Ziegler et al.'s controller: beta *= 1 + clip(KL/target - 1, ±0.2) * n / horizon."""

    value: float
    target: float
    horizon: int

    def update(self, kl: float, n: int) -> None:
        error = float(np.clip(kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + error * n / self.horizon
