"""Reward model: a scalar head on the SFT model, trained on rankings with InstructGPT's loss.

Each preference record is one prompt and its K responses ranked best to worst. All of a
prompt's responses go in one batch element, (K_max, T) token rows, so the C(K,2) pairs share
one forward pass per response and the loss is normalized per prompt (`ranking_loss`). A
response is scored on the whole conversation, at its closing `<|end|>`: the chat template's
rendering of the prompt (with the tools it declared) and the response, which for an answer that
used tools holds its calls, their results and what followed, so the score reads them all. A plain
text answer renders as the generation prompt, the text and `<|end|>`. When that is longer than
the context, the oldest tokens are cut.

After training, the reward is normalized so that the SFT policy's own answers to the training
prompts score mean 0 and std 1 (gain and bias saved in the model), as InstructGPT did before PPO.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import torch
from torch import nn

from chatforge.chat import ChatTemplate, Conversation, Message
from chatforge.checkpoint import load_checkpoint
from chatforge.data.chat_readers import Preference, read_preference_splits
from chatforge.errors import ConfigError, DataError
from chatforge.generate.engine import Engine
from chatforge.generate.params import SamplingParams
from chatforge.lora import add_adapters, trainable_parameters
from chatforge.model import ScalarHeadModel, ranking_loss
from chatforge.train.config import RewardConfig
from chatforge.train.distributed import DistInfo
from chatforge.train.loop import TrainResult
from chatforge.train.supervised import Batch, supervised_trainer


def response_ids(template: ChatTemplate, prompt: Conversation | Sequence[Message], response: str | Sequence[Message],
                 seq_len: int) -> list[int]:
    """The rendered prompt (its tools included) and response, cut from the left to seq_len tokens.

    A string is one assistant turn: generation prompt + text + `<|end|>`. A list of messages may
    hold tool turns; it ends with an assistant turn, so the last token is an `<|end|>` the model wrote.
    """
    conv = prompt if isinstance(prompt, Conversation) else Conversation(list(prompt))
    answer = [Message("assistant", response)] if isinstance(response, str) else list(response)
    return template.render(Conversation([*conv.messages, *answer], conv.tools)).ids[-seq_len:]


def encode_preferences(template: ChatTemplate, prefs: list[Preference], seq_len: int) -> list[list[list[int]]]:
    """Each preference's responses as token rows, best first."""
    return [[response_ids(template, p.conversation(), r, seq_len) for r in p.responses] for p in prefs]


def collate_groups(groups: list[list[list[int]]], pad_id: int) -> Batch:
    """(B, K_max, T) ids and (B, K_max) lengths; a missing response has length 0."""
    k_max = max(len(g) for g in groups)
    width = max(len(r) for g in groups for r in g)
    ids = torch.full((len(groups), k_max, width), pad_id, dtype=torch.long)
    lengths = torch.zeros((len(groups), k_max), dtype=torch.long)
    for b, g in enumerate(groups):
        for k, r in enumerate(g):
            ids[b, k, : len(r)] = torch.tensor(r)
            lengths[b, k] = len(r)
    return {"input_ids": ids, "lengths": lengths}


def group_scores(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, list[int]]:
    """Scores of every present response, groups in order (best first), and the group sizes."""
    ids, lengths = batch["input_ids"], batch["lengths"]
    present = lengths.reshape(-1) > 0
    flat_ids = ids.reshape(-1, ids.shape[-1])[present]
    scores = model(flat_ids, lengths.reshape(-1)[present])
    return scores, (lengths > 0).sum(1).tolist()


def pair_metrics(scores: torch.Tensor, sizes: list[int]) -> dict[str, torch.Tensor]:
    """Per-prompt mean pairwise accuracy and margin (better minus worse), summed over prompts."""
    accuracy, margin = scores.new_zeros(()), scores.new_zeros(())
    start = 0
    for k in sizes:
        r = scores[start : start + k].detach()
        better, worse = torch.triu_indices(k, k, offset=1, device=scores.device)
        accuracy = accuracy + (r[better] > r[worse]).float().mean()
        margin = margin + (r[better] - r[worse]).mean()
        start += k
    return {"accuracy": accuracy, "margin": margin}


class RankingObjective:
    """The reward model's Objective: one prompt and all its ranked responses per batch row."""

    def __init__(self, train: list[list[list[int]]], val: list[list[list[int]]], batch_size: int, pad_id: int,
                 seed: int) -> None:
        if not train:
            raise DataError("reward: no training preferences")
        self.train, self.val, self.batch_size, self.pad_id, self.seed = train, val, batch_size, pad_id, seed

    def batch(self, step: int) -> Batch:
        first = step * self.batch_size
        n = len(self.train)
        picks = []
        for i in range(first, first + self.batch_size):
            epoch, offset = divmod(i, n)
            picks.append(int(np.random.default_rng([self.seed, epoch]).permutation(n)[offset]))
        return collate_groups([self.train[i] for i in picks], self.pad_id)

    def weight(self, batch: Batch) -> float:
        return float(batch["input_ids"].shape[0])  # prompts: every prompt weighs the same

    def tokens(self, batch: Batch) -> int:
        return int(batch["lengths"].sum())

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        scores, sizes = group_scores(model, batch)
        return ranking_loss(scores, sizes), pair_metrics(scores, sizes)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, max_batches: int) -> dict[str, float]:
        return {f"val/{k}": v for k, v in preference_metrics(model, self.val, self.pad_id, self.batch_size).items()}


@torch.no_grad()
def preference_metrics(model: nn.Module, groups: list[list[list[int]]], pad_id: int, batch_size: int = 16) -> dict:
    """Mean ranking loss, pairwise accuracy and margin over prompts."""
    device = next(model.parameters()).device
    totals = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
    for start in range(0, len(groups), batch_size):
        batch = {k: v.to(device) for k, v in collate_groups(groups[start : start + batch_size], pad_id).items()}
        scores, sizes = group_scores(model, batch)
        totals["loss"] += ranking_loss(scores, sizes).item()
        for k, v in pair_metrics(scores, sizes).items():
            totals[k] += v.item()
    return {k: v / max(len(groups), 1) for k, v in totals.items()}


@torch.no_grad()
def sample_answers(policy_ckpt, prompts: list[list[Message]], temperature: float, seed: int,
                   max_tokens: int = 96) -> list[str]:
    """One sampled answer of the policy per prompt (seeded per prompt)."""
    return [answers[0] for answers in sample_answer_sets(policy_ckpt, prompts, 1, temperature, seed, max_tokens)]


def sample_answer_sets(policy_ckpt, prompts: list[list[Message]], n: int, temperature: float, seed: int,
                       max_tokens: int = 96, batch_size: int = 32) -> list[list[str]]:
    """n sampled answers of the policy to each prompt (a seed per prompt), through one batched engine."""
    template = ChatTemplate(policy_ckpt.tokenizer)
    context = policy_ckpt.model.config.context_length
    ids = [_fit_for_sampling(template, p, context) for p in prompts]
    engine = Engine(policy_ckpt.model.eval(), policy_ckpt.tokenizer, max_batch_size=max(batch_size, n),
                    stop_token_ids=template.stop_ids)
    params = [SamplingParams(n=n, max_tokens=min(max_tokens, context - len(i)), temperature=temperature,
                             seed=seed + k) for k, i in enumerate(ids)]
    return [[out.text.strip() for out in c.outputs] for c in engine.generate(ids, params)]


def _fit_for_sampling(template: ChatTemplate, prompt: Conversation | list[Message], context: int) -> list[int]:
    """The prompt's ids with half the context left for the answer (old turns dropped); when the system
    prompt and the latest turn alone leave less, they are kept and the answer gets the room there is."""
    try:
        return template.fit_to_context(prompt, context, reserve=context // 2)[0]
    except DataError:
        return template.fit_to_context(prompt, context, reserve=1)[0]


@torch.no_grad()
def set_normalization(model: ScalarHeadModel, template: ChatTemplate, prompts: list[list[Message]],
                      answers: list[str]) -> dict[str, float]:
    """Set gain and bias so these (prompt, answer) pairs score mean 0 and std 1."""
    model.eval()
    model.gain.fill_(1.0)
    model.bias.fill_(0.0)
    raw = score_texts(model, template, prompts, answers)
    mean, std = statistics.fmean(raw), statistics.pstdev(raw) or 1.0
    model.gain.fill_(1.0 / std)
    model.bias.fill_(-mean / std)
    return {"raw_mean": mean, "raw_std": std, "samples": len(raw)}


@torch.no_grad()
def score_texts(model: ScalarHeadModel, template: ChatTemplate, prompts: Sequence[Conversation | list[Message]],
                responses: Sequence[str | list[Message]], batch_size: int = 32) -> list[float]:
    """Rewards of (prompt, response) pairs; a prompt may be a Conversation with tools, a response a list of
    messages with tool turns (see `response_ids`)."""
    seq_len = model.config.context_length
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        rows = [response_ids(template, p, r, seq_len)
                for p, r in zip(prompts[start : start + batch_size], responses[start : start + batch_size])]
        batch = collate_groups([[r] for r in rows], template.eot_id)
        out += model(batch["input_ids"][:, 0].to(device), batch["lengths"][:, 0].to(device)).tolist()
    return out


def run_reward(cfg: RewardConfig, dist: DistInfo, resume: bool = False, overwrite: bool = False,
               callbacks: list | None = None) -> TrainResult:
    if not cfg.init_from:
        raise ConfigError("reward: --init-from is required (the SFT checkpoint)")
    if not cfg.data:
        raise ConfigError("reward: --data is required (preference JSONL: prompt + chosen/rejected or ranked responses)")
    ckpt = load_checkpoint(cfg.init_from)
    template = ChatTemplate(ckpt.tokenizer)
    torch.manual_seed(cfg.train.seed)
    model = add_adapters(ScalarHeadModel(ckpt.model), cfg.lora, base=cfg.init_from).to(dist.device)
    seq_len = min(cfg.seq_len or model.config.context_length, model.config.context_length)
    train_prefs, val_prefs = read_preference_splits(cfg.data, cfg.val, cfg.skip_invalid, cfg.val_fraction,
                                                    cfg.train.seed, "reward")
    objective = RankingObjective(encode_preferences(template, train_prefs, seq_len),
                                 encode_preferences(template, val_prefs, seq_len), cfg.train.batch_size,
                                 template.eot_id, cfg.train.seed)
    if dist.is_main:
        pairs = sum(len(p.responses) * (len(p.responses) - 1) // 2 for p in train_prefs)
        print(f"reward: {len(train_prefs)} training prompts ({pairs} pairs) / {len(val_prefs)} validation; "
              f"from {cfg.init_from}")
        if cfg.lora.rank:
            print(f"reward: LoRA rank {cfg.lora.rank} on the backbone's {cfg.lora.target_modules}, and the new head: "
                  f"{trainable_parameters(model):,} parameters train")
    run_config = {k: v for k, v in asdict(cfg).items() if k not in ("train", "out")}
    trainer = supervised_trainer(model, objective, cfg.train, cfg.out, dist, tokenizer=ckpt.tokenizer,
                                 run_config=run_config, extra_config={"stage": "reward"}, callbacks=callbacks)
    result = trainer.fit(resume=resume, overwrite=overwrite)
    if not result.interrupted and cfg.normalize_samples:
        # every rank computes the same statistics (same seeds), so save()'s barrier is reached by all
        policy = load_checkpoint(cfg.init_from, device=dist.device)
        # plain text answers to the prompts, tools not offered: an answer sampled without the tool loop
        # cannot hold a call's result, so a call in it would be scored as broken text
        prompts = [train_prefs[i % len(train_prefs)].prompt for i in range(cfg.normalize_samples)]
        answers = sample_answers(policy, prompts, cfg.normalize_temperature, cfg.train.seed)
        stats = set_normalization(model, template, prompts, answers)
        trainer.extra_config["normalization"] = stats
        trainer.save()  # the same checkpoint, now with gain and bias set
        if dist.is_main:
            print(f"reward: normalized on {stats['samples']} SFT answers (raw mean {stats['raw_mean']:.3f}, "
                  f"std {stats['raw_std']:.3f})")
    return result
