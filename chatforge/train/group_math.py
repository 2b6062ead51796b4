"""GRPO's and RLOO's arithmetic, free of models and data; each piece is checked against a hand computation
in tests/test_grpo.py.

Rewards and advantages are (N,) tensors of N = groups x G answers, a prompt's G answers next to each other
(rows g*G ... g*G + G - 1). Per-token tensors are (B, T) with a mask of 1 at the policy's own answer tokens.
"""

from __future__ import annotations

import torch

GRPO_EPS = 1e-4  # added to the group's std before dividing (TRL's GRPOTrainer)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """GRPO: each answer's reward minus its group's mean, divided by the group's std + 1e-4 when `scale`.

    The std is the sample standard deviation (Bessel's n - 1, torch's default, as TRL). A group whose
    rewards are all equal has std 0 and gets advantage 0 / 1e-4 = 0 on every answer: no signal, no NaN."""
    groups = rewards.view(-1, group_size)
    advantages = groups - groups.mean(1, keepdim=True)
    if scale:
        advantages = advantages / (groups.std(1, keepdim=True) + GRPO_EPS)
    return advantages.reshape(-1)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: r_i minus the mean of the other G - 1 rewards of its group."""
    groups = rewards.view(-1, group_size)
    baseline = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1 with d = log pi_ref - log pi.
    Never negative, 0 where the two agree, unbiased for the sampled token's KL."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor,
                      cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective as a loss, element-wise: max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) with
    rho = exp(log_ratio); and where the clipped term is the larger (the gradient is cut)."""
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, cliprange: float, beta: float,
              tokens: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's loss: per token, the clipped surrogate of the answer's advantage (the same on all its tokens)
    with the token's ratio to the rollout policy, plus beta * k3 KL to the reference; summed over the
    masked tokens and divided by `tokens` (default: the masked tokens here), a token-level mean.

    advantages: (B,), one per answer. ref_logprobs may be None when beta is 0. Statistics: clip fraction,
    mean ratio, approx KL to the rollout policy, and the k3 KL (per token) when beta > 0."""
    log_ratio = (logprobs - old_logprobs) * mask
    per_token, clipped = clipped_surrogate(log_ratio, advantages[:, None], cliprange)
    count = mask.sum().clamp(min=1)
    stats = {"clipfrac": (clipped.float() * mask).sum() / count,
             "ratio": (torch.exp(log_ratio) * mask).sum() / count,
             "approx_kl": 0.5 * (log_ratio**2 * mask).sum() / count}
    if beta:
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
        stats["kl_k3"] = (kl * mask).sum() / count
    loss = (per_token * mask).sum() / (tokens if tokens else count)
    return loss, stats


def rloo_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None, mask: torch.Tensor,
                 beta: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RLOO's rewards with the KL penalty folded in, r = score - beta * sum_t (log pi - log pi_ref) over each
    answer's tokens (TRL's RLOOTrainer); and that per-answer KL (None without a reference)."""
    if ref_logprobs is None:
        return scores, None
    kl = ((logprobs - ref_logprobs) * mask).sum(1)
    return scores - beta * kl, kl


def rloo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """REINFORCE with the leave-one-out advantage, the answer one action (Ahmadian et al.): the clipped
    surrogate of the answer's ratio rho = exp(sum_t (log pi - log pi_old)), mean over answers. At rho = 1
    (the first pass over fresh answers) its gradient is -A * sum_t grad log pi(y_t), REINFORCE's."""
    log_ratio = ((logprobs - old_logprobs) * mask).sum(1)
    per_answer, clipped = clipped_surrogate(log_ratio, advantages, cliprange)
    stats = {"clipfrac": clipped.float().mean(), "ratio": torch.exp(log_ratio).mean(),
             "approx_kl": 0.5 * (log_ratio**2).mean()}
    return per_answer.mean(), stats
