"""Plain autoregressive sampling with a KV cache: greedy or temperature / top-k / top-p.

The full engine (batching, beam search, penalties, stop strings, streaming) builds on the same
model interface; this is the minimal path `chatforge sample` and the demo use.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from chatforge.model import GPT


@dataclass
class SampleConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set with mass >= top_p."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def stream_tokens(model: GPT, prompt_ids: Sequence[int], cfg: SampleConfig) -> Iterator[int]:
    """Yield new token ids one at a time until a stop token, max_new_tokens or the context ends."""
    if not prompt_ids:
        raise ValueError("prompt must contain at least one token")
    model.eval()
    device = next(model.parameters()).device
    ctx = model.config.context_length
    prompt = list(prompt_ids)[-ctx:]  # keep the most recent context if the prompt is too long
    budget = min(cfg.max_new_tokens, ctx - len(prompt))
    gen = torch.Generator(device=device)
    if cfg.seed is not None:
        gen.manual_seed(cfg.seed)
    else:
        gen.seed()
    cache = model.make_kv_cache(1, len(prompt) + max(budget, 0))
    logits = model(torch.tensor([prompt], device=device), kv_cache=cache)[:, -1]
    pos = len(prompt)
    for _ in range(budget):
        if cfg.temperature <= 0:
            token = int(logits.argmax(-1))
        else:
            probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=gen))
        if token in cfg.stop_token_ids:
            return
        yield token
        logits = model(torch.tensor([[token]], device=device), kv_cache=cache, pos_offset=pos)[:, -1]
        pos += 1


def sample(model: GPT, prompt_ids: Sequence[int], cfg: SampleConfig) -> list[int]:
    return list(stream_tokens(model, prompt_ids, cfg))
