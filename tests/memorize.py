"""A tiny GPT that memorizes a few conversations, so greedy decoding writes known tool calls and answers.

Tests of the tool-call loop, the server's function calling and the page's tool cards need a model that
calls tools on cue; a few hundred steps on the template's trained tokens (calls and answers, not the
questions or the results) take seconds.
"""

from __future__ import annotations

import torch

from chatforge.chat import ChatTemplate, Conversation
from chatforge.model import GPT, GPTConfig


def memorize(tokenizer, conversations: list[Conversation], context_length: int = 320, steps: int = 250) -> GPT:
    """A 2-layer GPT trained on `conversations` until its loss on their trained tokens is near 0."""
    template = ChatTemplate(tokenizer)
    rendered = [template.render(c) for c in conversations]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=context_length, n_layer=2, n_head=2,
                          n_embd=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = [_batch(group) for group in _by_length(rendered)]
    for _ in range(steps):
        opt.zero_grad()
        losses = [_loss(model, ids, targets) for ids, targets in batches]
        sum(losses).backward()
        opt.step()
    worst = max(loss.item() for loss in losses)
    assert worst < 0.01, f"the model did not memorize its conversations (loss {worst:.4f})"
    return model.eval()


def _by_length(rendered: list) -> list[list]:
    """Groups of conversations of similar length (each padded to its longest, not to the longest of all)."""
    groups: list[list] = []
    for r in sorted(rendered, key=lambda r: len(r.ids)):
        if groups and len(r.ids) <= 1.5 * len(groups[-1][0].ids):
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _batch(group: list) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r.ids) for r in group)
    ids = torch.tensor([r.ids + [0] * (width - len(r.ids)) for r in group])
    trained = [[t if m else -100 for t, m in zip(r.ids[1:], r.mask[1:])] for r in group]
    return ids, torch.tensor([t + [-100] * (width - len(t)) for t in trained])


def _loss(model: GPT, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100)
