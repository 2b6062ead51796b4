"""DPO: preference optimization without a reward model or sampling (Rafailov et al., 2023).

For each (prompt, chosen, rejected) pair — a ranked record gives all its C(K,2) pairs — the loss is
-log sigmoid(beta * [(log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))]),
where log pi(y) sums the log-probs of the response's trained tokens, those the chat template's mask
marks as the model's own: an assistant's text, its tool calls and each turn's closing `<|end|>`. In
an answer that used tools, the tool results are context the policy reads, not a choice it made, so
they are left out of the sum (a plain text answer is its tokens and `<|end|>`). The reference
is the starting (SFT) model; its log-probs are computed once before training, for the pairs the run
will draw (`pairs_trained`), so it never sits in memory beside the policy. beta * (log pi - log ref)
is the implicit reward; its accuracy (chosen above rejected) and margin are logged, for training
batches and held-out pairs.

DPO only widens the margin, so it can lower the chosen answer's likelihood too and the text degrades
(on the demo run harmful requests got answers stitched from other requests' steps). `rpo_alpha` adds the
chosen answer's mean token NLL to each pair's loss (RPO, Pang et al. 2024), which keeps it likely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chatforge.chat import ChatTemplate, Message
from chatforge.checkpoint import load_checkpoint
from chatforge.data.chat_readers import Preference, read_preference_splits
from chatforge.errors import ConfigError, DataError
from chatforge.lora import add_adapters, trainable_parameters
from chatforge.model import ScalarHeadModel
from chatforge.train.config import DPOConfig
from chatforge.train.distributed import DistInfo
from chatforge.train.loop import TrainResult
from chatforge.train.supervised import Batch, supervised_trainer


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed sigmoid DPO loss over pairs, and summed implicit-reward metrics."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen - rejected)
    return loss.sum(), {"reward_chosen": chosen.detach().sum(), "reward_rejected": rejected.detach().sum(),
                        "accuracy": (chosen > rejected).float().sum(), "margin": (chosen - rejected).detach().sum()}


Side = tuple[list[int], list[bool]]  # a response's token ids and which of them its log-prob sums


def encode_response(template: ChatTemplate, pref: Preference, response: Sequence[Message], seq_len: int) -> Side:
    """The rendered prompt and response, cut from the left to seq_len, and the response's trained tokens.

    The prompt is never summed, even its own assistant turns: only the template's mask over the
    response is kept. A token cut to be the first has nothing before it and is not summed either.
    """
    prompt = template.render(pref.conversation()).ids
    whole = template.render(pref.conversation(response))
    trained = [False] * len(prompt) + whole.mask[len(prompt):]
    return whole.ids[-seq_len:], [False] + trained[-seq_len:][1:]


def encode_pair(template: ChatTemplate, pref: Preference, better: Sequence[Message], worse: Sequence[Message],
                seq_len: int) -> tuple[Side, Side]:
    """The (chosen, rejected) sides of one pair."""
    return encode_response(template, pref, better, seq_len), encode_response(template, pref, worse, seq_len)


def collate_side(rows: list[Side], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and the (B, T-1) mask of the positions that predict a trained token."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width - 1))
    for b, (seq, trained) in enumerate(rows):
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq) - 1] = torch.tensor(trained[1:], dtype=torch.float32)  # position t predicts token t+1
    return ids, mask


def sequence_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) sum of log-probs of the masked (trained response) tokens."""
    logp = F.log_softmax(model(ids)[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * mask).sum(1)


def pair_picks(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The pairs of a step's batch: rows [step·B, (step+1)·B) of a seeded shuffle per epoch of the n pairs."""
    picks, orders = [], {}
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(i, n)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        picks.append(int(orders[epoch][offset]))
    return picks


def pairs_trained(n: int, batch_size: int, seed: int, steps: int) -> list[int]:
    """Every pair some step of a run of `steps` steps trains on (all n once the run covers an epoch)."""
    if steps * batch_size >= n:
        return list(range(n))
    return sorted({i for step in range(steps) for i in pair_picks(n, batch_size, seed, step)})


class PairObjective:
    """One (chosen, rejected) pair per batch row, with the reference's log-probs precomputed."""

    def __init__(self, pairs: list, val_pairs: list, batch_size: int, pad_id: int, seed: int, beta: float,
                 rpo_alpha: float = 0.0) -> None:
        if not pairs:
            raise DataError("dpo: no preference pairs")
        self.pairs, self.val_pairs = pairs, val_pairs
        self.batch_size, self.pad_id, self.seed, self.beta = batch_size, pad_id, seed, beta
        self.rpo_alpha = rpo_alpha

    def collate(self, items: list) -> Batch:
        chosen_ids, chosen_mask = collate_side([c for c, _, _ in items], self.pad_id)
        rejected_ids, rejected_mask = collate_side([r for _, r, _ in items], self.pad_id)
        refs = torch.tensor([ref for _, _, ref in items], dtype=torch.float32)
        return {"chosen_ids": chosen_ids, "chosen_mask": chosen_mask, "rejected_ids": rejected_ids,
                "rejected_mask": rejected_mask, "ref_chosen": refs[:, 0], "ref_rejected": refs[:, 1]}

    def batch(self, step: int) -> Batch:
        return self.collate([self.pairs[i] for i in pair_picks(len(self.pairs), self.batch_size, self.seed, step)])

    def weight(self, batch: Batch) -> float:
        return float(batch["chosen_ids"].shape[0])

    def tokens(self, batch: Batch) -> int:
        return batch["chosen_ids"].numel() + batch["rejected_ids"].numel()

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        chosen = sequence_logprobs(model, batch["chosen_ids"], batch["chosen_mask"])
        rejected = sequence_logprobs(model, batch["rejected_ids"], batch["rejected_mask"])
        loss, metrics = dpo_loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], self.beta)
        if self.rpo_alpha:
            nll = -chosen / batch["chosen_mask"].sum(1).clamp(min=1)  # mean per trained token of each chosen answer
            loss = loss + self.rpo_alpha * nll.sum()
            metrics["nll_chosen"] = nll.detach().sum()
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, model: nn.Module, max_batches: int) -> dict[str, float]:
        device = next(model.parameters()).device
        totals: dict[str, float] = {}
        for start in range(0, len(self.val_pairs), self.batch_size):
            batch = {k: v.to(device) for k, v in self.collate(self.val_pairs[start : start + self.batch_size]).items()}
            loss, metrics = self.loss(model, batch)
            for k, v in {"loss": loss, **metrics}.items():
                totals[k] = totals.get(k, 0.0) + v.item()
        return {f"val/{k}": v / max(len(self.val_pairs), 1) for k, v in totals.items()}


@torch.no_grad()
def with_reference_logprobs(model: nn.Module, encoded: list, pad_id: int, device, batch_size: int = 32) -> list:
    """(chosen, rejected, (ref_chosen, ref_rejected)) for each pair, from the model before training."""
    model.eval()
    out = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        sides = []
        for k in (0, 1):
            ids, mask = collate_side([pair[k] for pair in chunk], pad_id)
            sides.append(sequence_logprobs(model, ids.to(device), mask.to(device)).tolist())
        out += [(c, r, (a, b)) for (c, r), a, b in zip(chunk, *sides)]
    return out


def pairs_of(template: ChatTemplate, prefs: list[Preference], seq_len: int) -> list:
    """Every (better, worse) pair of every preference, encoded."""
    return [encode_pair(template, p, better, worse, seq_len) for p in prefs for better, worse in p.pairs()]


def run_dpo(cfg: DPOConfig, dist: DistInfo, resume: bool = False, overwrite: bool = False,
            callbacks: list | None = None) -> TrainResult:
    if not cfg.init_from:
        raise ConfigError("dpo: --init-from is required (the SFT checkpoint; it is also the reference)")
    if not cfg.data:
        raise ConfigError("dpo: --data is required (preference JSONL)")
    ckpt = load_checkpoint(cfg.init_from, device=dist.device)
    if isinstance(ckpt.model, ScalarHeadModel):
        raise ConfigError(f"dpo: {cfg.init_from} is a reward model; expected the SFT (chat) model")
    template, model = ChatTemplate(ckpt.tokenizer), ckpt.model
    seq_len = min(cfg.seq_len or model.config.context_length, model.config.context_length)
    train_prefs, val_prefs = read_preference_splits(cfg.data, cfg.val, cfg.skip_invalid, cfg.val_fraction,
                                                    cfg.train.seed, "dpo")
    pad = template.eot_id
    encoded = pairs_of(template, train_prefs, seq_len)
    # the reference's log-probs only of the pairs the run will draw: a short run on many rankings (the
    # demo's 100 steps of 16 pairs among 20,000) would otherwise spend most of its time on the others
    used = pairs_trained(len(encoded), cfg.train.batch_size, cfg.train.seed, cfg.train.max_steps)
    train: list = [None] * len(encoded)
    for i, pair in zip(used, with_reference_logprobs(model, [encoded[i] for i in used], pad, dist.device)):
        train[i] = pair
    val = with_reference_logprobs(model, pairs_of(template, val_prefs, seq_len), pad, dist.device)
    torch.manual_seed(cfg.train.seed)  # the adapters' A starts random: the same on every process and run
    add_adapters(model, cfg.lora, base=cfg.init_from)  # after the reference's log-probs: those are the base's
    torch.manual_seed(cfg.train.seed + dist.rank)
    objective = PairObjective(train, val, cfg.train.batch_size, pad, cfg.train.seed, cfg.beta, cfg.rpo_alpha)
    if dist.is_main:
        print(f"dpo: {len(train)} training pairs ({len(train_prefs)} prompts) / {len(val)} validation pairs; "
              f"beta {cfg.beta}{f', rpo_alpha {cfg.rpo_alpha}' if cfg.rpo_alpha else ''}; "
              f"reference log-probs precomputed for the {len(used)} pairs the run trains on; "
              f"from {cfg.init_from}")
        if cfg.lora.rank:
            print(f"dpo: LoRA rank {cfg.lora.rank} on {cfg.lora.target_modules}: {trainable_parameters(model):,} "
                  "parameters train")
    run_config = {k: v for k, v in asdict(cfg).items() if k not in ("train", "out")}
    trainer = supervised_trainer(model, objective, cfg.train, cfg.out, dist, tokenizer=ckpt.tokenizer,
                                 run_config=run_config, extra_config={"stage": "dpo"}, callbacks=callbacks)
    return trainer.fit(resume=resume, overwrite=overwrite)
