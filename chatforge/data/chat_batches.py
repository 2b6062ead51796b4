"""Conversations as training rows: next-token labels only where the chat template trains (the
assistant's tokens), rows padded or packed, and the loss over those tokens.

SFT trains on these batches and evaluation measures held-out conversations with the same code, so
neither imports the other. Packed rows carry each position's example index and a position that
restarts at 0 per example; `packed_attention_mask` keeps attention inside an example, so a packed
example computes exactly what it would alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from chatforge.chat import ChatTemplate, Conversation
from chatforge.model import IGNORE_INDEX, lm_loss

Batch = dict[str, torch.Tensor]


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
