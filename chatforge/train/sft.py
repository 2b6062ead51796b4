"""Supervised fine-tuning: conversations in the chat template, loss on assistant tokens only.

Each conversation is rendered by `ChatTemplate` into token ids and a mask of the tokens the model
must produce (assistant content and its `<|end|>`, tool calls). The inputs are ids[:-1]; the
label of position i is ids[i+1] where that token is trained, else IGNORE_INDEX, so user and
system tokens are context only and carry no gradient.

Rows of a batch are built two ways:

- padding: one conversation per row, right-padded to the longest in the batch. Padding sits
  after every real token, so plain causal attention is exact.
- packing (the default): conversations laid end to end in rows of `seq_len` tokens, so no
  compute goes to padding. Each row carries the example index of every position; attention is
  causal *within* an example only (a block-diagonal mask) and positions restart at 0 for each
  example, so a packed example computes exactly what it would alone.

The order is a seeded shuffle per epoch, and the global batch of step s is rows [s·B, (s+1)·B)
of the endless stream of epochs, so the harness's exact resume and data parallelism hold here too.

Replay (`replay_coef` > 0): each row also carries a window of pretraining text drawn at random (seeded by
the step) from token shards, and the step's loss adds `replay_coef` times its summed LM loss, over the same
normalizer (the batch's assistant tokens). Fine-tuning on a narrow set of conversations otherwise
overwrites what pretraining stored: the demo's SFT model lost 15 points of fact knowledge without it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from chatforge.chat import ChatTemplate
from chatforge.checkpoint import load_checkpoint
from chatforge.data.chat_batches import Example, collate, conversation_loss, encode_example, forward_logits, pack
from chatforge.data.chat_readers import read_conversations
from chatforge.data.readers import hold_out
from chatforge.data.shards import TokenDataset
from chatforge.errors import ConfigError, DataError
from chatforge.lora import add_adapters, trainable_parameters
from chatforge.model import GPT, IGNORE_INDEX, lm_loss
from chatforge.train.config import SFTConfig
from chatforge.train.distributed import DistInfo
from chatforge.train.loop import TrainResult
from chatforge.train.supervised import Batch, supervised_trainer


class SupervisedChat:
    """The SFT Objective."""

    def __init__(self, train: list[Example], val: list[Example], batch_size: int, seq_len: int, pad_id: int,
                 seed: int, packing: bool = True, replay: Replay | None = None) -> None:
        if not train:
            raise DataError("sft: no training examples with an assistant token")
        self.train, self.val = train, val
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.seed, self.packing, self.replay = seed, packing, replay
        self._epochs: list[list[list[int]]] = []  # rows of each epoch, built as needed
        self._starts = [0]  # global index of each epoch's first row

    def _epoch_rows(self, epoch: int) -> list[list[int]]:
        while len(self._epochs) <= epoch:
            e = len(self._epochs)
            order = np.random.default_rng([self.seed, e]).permutation(len(self.train)).tolist()
            rows = (pack(order, [len(x.input_ids) for x in self.train], self.seq_len) if self.packing
                    else [[i] for i in order])
            self._epochs.append(rows)
            self._starts.append(self._starts[-1] + len(rows))
        return self._epochs[epoch]

    def _row(self, index: int) -> list[int]:
        epoch = 0
        while True:
            rows = self._epoch_rows(epoch)
            if index < self._starts[epoch + 1]:
                return rows[index - self._starts[epoch]]
            epoch += 1

    def batch(self, step: int) -> Batch:
        first = step * self.batch_size
        rows = [[self.train[i] for i in self._row(first + r)] for r in range(self.batch_size)]
        width = self.seq_len if self.packing else None
        batch = collate(rows, self.pad_id, width=width, packed=self.packing)
        if self.replay is not None:
            rng = np.random.default_rng([self.seed, step, 7])
            windows = self.replay.data.sample_batch(rng, self.batch_size, self.replay.length)
            batch["replay_x"], batch["replay_y"] = windows
        return batch

    def weight(self, batch: Batch) -> float:
        return float((batch["labels"] != IGNORE_INDEX).sum())

    def tokens(self, batch: Batch) -> int:
        return batch["input_ids"].numel() + (batch["replay_x"].numel() if "replay_x" in batch else 0)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        loss = lm_loss(forward_logits(model, batch), batch["labels"], reduction="sum")
        if self.replay is None:
            return loss, {}
        replay = lm_loss(model(batch["replay_x"]), batch["replay_y"])
        # as a summed metric over this slice's assistant tokens, so the harness's division gives the mean
        extra = {"replay_loss": replay.detach() * self.weight(batch)}
        return loss + self.replay.coef * replay * batch["replay_y"].numel(), extra

    def evaluate(self, model: nn.Module, max_batches: int) -> dict[str, float]:
        return {f"val/{k}": v for k, v in conversation_loss(model, self.val, self.pad_id, self.batch_size).items()}


@dataclass(frozen=True)
class Replay:
    """Pretraining windows replayed beside the conversations (see the module docstring)."""

    data: TokenDataset
    coef: float
    length: int


def load_examples(sources: list[str], template: ChatTemplate, seq_len: int, fmt: str, skip_invalid: bool,
                  what: str) -> tuple[list[Example], dict]:
    result = read_conversations(sources, format=fmt, skip_invalid=skip_invalid)
    examples, cut, empty = [], 0, 0
    for conv in result.conversations:
        e = encode_example(template, conv, seq_len)
        if e is None:
            empty += 1
            continue
        cut += len(template.render(conv).ids) > seq_len + 1
        examples.append(e)
    stats = {f"{what}_conversations": len(examples), f"{what}_skipped_invalid": result.skipped,
             f"{what}_truncated": cut, f"{what}_dropped_no_assistant_in_context": empty}
    return examples, stats


def grow_vocab(model: GPT, vocab_size: int) -> GPT:
    """Grow the embedding when the tokenizer has more tokens than the model (GPT-2 + chat tokens)."""
    if model.config.vocab_size < vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model


def run_sft(cfg: SFTConfig, dist: DistInfo, resume: bool = False, overwrite: bool = False,
            callbacks: list | None = None) -> TrainResult:
    if not cfg.init_from:
        raise ConfigError("sft: --init-from is required (a pretrained checkpoint, ours or a GPT-2 directory)")
    if not cfg.data:
        raise ConfigError("sft: --data is required (conversation files: OpenAI messages, Alpaca or ShareGPT JSONL)")
    ckpt = load_checkpoint(cfg.init_from)
    tokenizer, template = ckpt.tokenizer, ChatTemplate(ckpt.tokenizer)
    grown = tokenizer.vocab_size - ckpt.model.config.vocab_size
    torch.manual_seed(cfg.train.seed)  # the adapters' A starts random: the same on every process and run
    chat_tokens = [i for name, i in tokenizer.special_ids.items() if name != "eot"] if cfg.lora_chat_tokens else []
    model = add_adapters(grow_vocab(ckpt.model, tokenizer.vocab_size), cfg.lora, base=cfg.init_from,
                         tokens=chat_tokens).to(dist.device)
    seq_len = min(cfg.seq_len or model.config.context_length, model.config.context_length)
    train, stats = load_examples(cfg.data, template, seq_len, cfg.format, cfg.skip_invalid, "train")
    if cfg.val:
        val, val_stats = load_examples(cfg.val, template, seq_len, cfg.format, cfg.skip_invalid, "val")
        stats |= val_stats
    else:
        train, val = hold_out(train, cfg.val_fraction, [cfg.train.seed, 7919], "sft: conversations")
    torch.manual_seed(cfg.train.seed + dist.rank)
    replay = None
    if cfg.replay_coef:
        replay = Replay(TokenDataset(cfg.replay_data, "train", expected_tokenizer_hash=tokenizer.hash),
                        cfg.replay_coef, min(cfg.replay_len, model.config.context_length))
    objective = SupervisedChat(train, val, cfg.train.batch_size, seq_len, template.eot_id, cfg.train.seed,
                               packing=cfg.packing, replay=replay)
    if dist.is_main:
        notes = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in stats.items() if v and "conversations" not in k)
        print(f"sft: {len(train)} training / {len(val)} validation conversations"
              f"{' (' + notes + ')' if notes else ''}; {'packed' if cfg.packing else 'padded'} rows of {seq_len}; "
              f"from {cfg.init_from}")
        if cfg.lora.rank:
            rows = f" and the {len(chat_tokens)} chat tokens' embedding rows" if chat_tokens else ""
            frozen = f" (the {grown} tokens added to the model stay at the mean embedding)" if grown > 0 and not (
                chat_tokens) else ""
            print(f"sft: LoRA rank {cfg.lora.rank} on {cfg.lora.target_modules}{rows}: {trainable_parameters(model):,} "
                  f"of {model.num_params():,} parameters train{frozen}")
    run_config = {k: v for k, v in asdict(cfg).items() if k not in ("train", "out")} | {"data_stats": stats}
    trainer = supervised_trainer(model, objective, cfg.train, cfg.out, dist, tokenizer=tokenizer, run_config=run_config,
                                 extra_config={"stage": "sft", "chat_template": "chatforge"}, callbacks=callbacks)
    return trainer.fit(resume=resume, overwrite=overwrite)
