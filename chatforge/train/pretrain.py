"""Pretraining: next-token prediction on token shards, a supervised step on the training harness."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from chatforge.checkpoint import load_checkpoint
from chatforge.data.shards import TokenDataset
from chatforge.errors import ConfigError
from chatforge.model import GPT, IGNORE_INDEX, GPTConfig, lm_loss
from chatforge.tokenizer import Tokenizer
from chatforge.train.config import PretrainConfig
from chatforge.train.distributed import DistInfo
from chatforge.train.loop import TrainResult
from chatforge.train.supervised import Batch, supervised_trainer


class LanguageModeling:
    """The pretraining Objective: random windows of the token stream, every token a target."""

    def __init__(self, train: TokenDataset, val: TokenDataset, batch_size: int, seq_len: int, seed: int) -> None:
        self.train_data, self.val_data = train, val
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed

    def batch(self, step: int) -> Batch:
        x, y = self.train_data.sample_batch(np.random.default_rng([self.seed, step]), self.batch_size, self.seq_len)
        return {"input_ids": x, "labels": y}

    def weight(self, batch: Batch) -> float:
        return float((batch["labels"] != IGNORE_INDEX).sum())

    def tokens(self, batch: Batch) -> int:
        return batch["input_ids"].numel()

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        return lm_loss(model(batch["input_ids"]), batch["labels"], reduction="sum"), {}

    def evaluate(self, model: nn.Module, max_batches: int) -> dict[str, float]:
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for x, y in self.val_data.iter_eval_batches(self.batch_size, self.seq_len, max_batches):
            total += lm_loss(model(x.to(device)), y.to(device), reduction="sum").item()
            count += y.numel()
        loss = total / max(count, 1)
        return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}


def load_tokenizer_for(cfg: PretrainConfig) -> Tokenizer:
    if cfg.tokenizer:
        return Tokenizer.from_file(cfg.tokenizer)
    default = Path(cfg.data) / "tokenizer.json"
    if not default.exists():
        raise ConfigError(f"pretrain: no --tokenizer given and {default} does not exist")
    return Tokenizer.from_file(default)


def build_model(cfg: PretrainConfig, tokenizer: Tokenizer) -> GPT:
    torch.manual_seed(cfg.train.seed)
    if cfg.init_from:
        model = load_checkpoint(cfg.init_from, tokenizer=False).model
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"{cfg.init_from}: model vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's "
                f"({tokenizer.vocab_size})"
            )
        return model
    m = cfg.model
    return GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=m.context_length, n_layer=m.n_layer,
                         n_head=m.n_head, n_embd=m.n_embd, dropout=m.dropout))


def run_pretrain(cfg: PretrainConfig, dist: DistInfo, resume: bool = False, overwrite: bool = False,
                 callbacks: list | None = None) -> TrainResult:
    if not cfg.data:
        raise ConfigError("pretrain: --data is required (a directory made by `chatforge data prepare`)")
    tokenizer = load_tokenizer_for(cfg)
    train = TokenDataset(cfg.data, "train", expected_tokenizer_hash=tokenizer.hash)
    val = TokenDataset(cfg.data, "val", expected_tokenizer_hash=tokenizer.hash)
    model = build_model(cfg, tokenizer).to(dist.device)
    seq_len = model.config.context_length if cfg.init_from else cfg.model.context_length
    seq_len = min(seq_len, cfg.model.context_length)
    if cfg.seq_len > seq_len:
        raise ConfigError(f"pretrain: seq_len ({cfg.seq_len}) must be at most the model's context ({seq_len})")
    seq_len = cfg.seq_len or seq_len
    torch.manual_seed(cfg.train.seed + dist.rank)  # dropout differs per process, as in any DDP run
    objective = LanguageModeling(train, val, cfg.train.batch_size, seq_len, cfg.train.seed)
    if dist.is_main:
        print(f"pretrain: {model.num_params() / 1e6:.2f}M parameters "
              f"({model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding), "
              f"{train.num_tokens:,} training tokens, {dist.world_size} process(es) on {dist.device}")
    run_config = {k: v for k, v in asdict(cfg).items() if k not in ("train", "out")}
    trainer = supervised_trainer(model, objective, cfg.train, cfg.out, dist, tokenizer=tokenizer, run_config=run_config,
                                 extra_config={"stage": "pretrain"}, callbacks=callbacks)
    return trainer.fit(resume=resume, overwrite=overwrite)
