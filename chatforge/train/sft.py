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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from chatforge.chat import ChatTemplate, Conversation
from chatforge.checkpoint import load_checkpoint
from chatforge.data.chat_readers import read_conversations
from chatforge.data.readers import hold_out
from chatforge.errors import ConfigError, DataError
from chatforge.model import GPT, IGNORE_INDEX, lm_loss
from chatforge.train.distributed import DistInfo
from chatforge.train.loop import TrainConfig, TrainResult
from chatforge.train.supervised import Batch, supervised_trainer


def _sft_train_defaults() -> TrainConfig:
    return TrainConfig(max_steps=300, batch_size=16, lr=3e-4, warmup_steps=20, weight_decay=0.0,
                       eval_every=50, eval_batches=10, save_every=200)


@dataclass
class SFTConfig:
    data: list[str] = field(default_factory=list)  # conversation files (messages / Alpaca / ShareGPT)
    val: list[str] = field(default_factory=list)  # held-out conversations; default: val_fraction of data
    init_from: str = ""  # the pretrained checkpoint (ours or a Hugging Face GPT-2 directory)
    out: str = "runs/default/sft"
    format: str = "auto"  # "auto", "messages", "alpaca" or "sharegpt"
    skip_invalid: bool = False  # skip (and count) bad records instead of stopping at the first
    val_fraction: float = 0.05
    packing: bool = True
    seq_len: int = 0  # tokens per row; 0: the model's context length
    train: TrainConfig = field(default_factory=_sft_train_defaults)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def encode_example(template: ChatTemplate, conv: Conversation, seq_len: int) -> Example | None:
    """Inputs and next-token labels (IGNORE_INDEX where untrained), cut to seq_len; None if nothing trained."""
    rendered = template.render(conv)
    ids, mask = rendered.ids[: seq_len + 1], rendered.mask[: seq_len + 1]
    labels = labels_from(ids, mask)
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Example(ids[:-1], labels)


def labels_from(ids: list[int], mask: list[bool]) -> list[int]:
    """Next-token targets of ids[:-1]: the next token where it is trained, else IGNORE_INDEX."""
    return [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]


def pack(order: list[int], lengths: list[int], seq_len: int) -> list[list[int]]:
    """Lay examples (in `order`) end to end into rows of at most seq_len tokens; a row never splits one."""
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        if current and used + lengths[i] > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        rows.append(current)
    return rows


def collate(examples: list[list[Example]], pad_id: int, width: int | None = None, packed: bool = True) -> Batch:
    """Rows of examples into tensors; `doc_ids` and `position_ids` only for packed rows."""
    width = width or max(sum(len(e.input_ids) for e in row) for row in examples)
    B = len(examples)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    doc_ids = torch.full((B, width), -1, dtype=torch.long)
    position_ids = torch.zeros((B, width), dtype=torch.long)
    for b, row in enumerate(examples):
        at = 0
        for d, e in enumerate(row):
            n = len(e.input_ids)
            input_ids[b, at : at + n] = torch.tensor(e.input_ids)
            labels[b, at : at + n] = torch.tensor(e.labels)
            doc_ids[b, at : at + n] = d
            position_ids[b, at : at + n] = torch.arange(n)
            at += n
    batch = {"input_ids": input_ids, "labels": labels}
    if packed:
        batch |= {"doc_ids": doc_ids, "position_ids": position_ids}
    return batch


def packed_attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean: position i sees j <= i of its own example (padding sees only padding)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


def forward_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    if "doc_ids" in batch:
        return model(batch["input_ids"], position_ids=batch["position_ids"],
                     attn_mask=packed_attention_mask(batch["doc_ids"]))
    return model(batch["input_ids"])


class SupervisedChat:
    """The SFT Objective."""

    def __init__(self, train: list[Example], val: list[Example], batch_size: int, seq_len: int, pad_id: int,
                 seed: int, packing: bool = True) -> None:
        if not train:
            raise DataError("sft: no training examples with an assistant token")
        self.train, self.val = train, val
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.seed, self.packing = seed, packing
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
        return collate(rows, self.pad_id, width=width, packed=self.packing)

    def weight(self, batch: Batch) -> float:
        return float((batch["labels"] != IGNORE_INDEX).sum())

    def tokens(self, batch: Batch) -> int:
        return batch["input_ids"].numel()

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        return lm_loss(forward_logits(model, batch), batch["labels"], reduction="sum"), {}

    def evaluate(self, model: nn.Module, max_batches: int) -> dict[str, float]:
        return {f"val/{k}": v for k, v in conversation_loss(model, self.val, self.pad_id, self.batch_size).items()}


@torch.no_grad()
def conversation_loss(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 16) -> dict:
    """Mean loss over the trained (assistant) tokens of `examples`, and its perplexity."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        rows = [[e] for e in examples[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in collate(rows, pad_id, packed=False).items()}
        total += lm_loss(model(batch["input_ids"]), batch["labels"], reduction="sum").item()
        count += int((batch["labels"] != IGNORE_INDEX).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


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
    model = grow_vocab(ckpt.model, tokenizer.vocab_size).to(dist.device)
    seq_len = min(cfg.seq_len or model.config.context_length, model.config.context_length)
    train, stats = load_examples(cfg.data, template, seq_len, cfg.format, cfg.skip_invalid, "train")
    if cfg.val:
        val, val_stats = load_examples(cfg.val, template, seq_len, cfg.format, cfg.skip_invalid, "val")
        stats |= val_stats
    else:
        train, val = hold_out(train, cfg.val_fraction, [cfg.train.seed, 7919], "sft: conversations")
    torch.manual_seed(cfg.train.seed + dist.rank)
    objective = SupervisedChat(train, val, cfg.train.batch_size, seq_len, template.eot_id, cfg.train.seed,
                               packing=cfg.packing)
    if dist.is_main:
        notes = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in stats.items() if v and "conversations" not in k)
        print(f"sft: {len(train)} training / {len(val)} validation conversations"
              f"{' (' + notes + ')' if notes else ''}; {'packed' if cfg.packing else 'padded'} rows of {seq_len}; "
              f"from {cfg.init_from}")
    run_config = {k: v for k, v in asdict(cfg).items() if k not in ("train", "out")} | {"data_stats": stats}
    trainer = supervised_trainer(model, objective, cfg.train, cfg.out, dist, tokenizer=tokenizer, run_config=run_config,
                                 extra_config={"stage": "sft", "chat_template": "chatforge"}, callbacks=callbacks)
    return trainer.fit(resume=resume, overwrite=overwrite)
