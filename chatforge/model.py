"""The GPT: GPT-2's architecture, readable top to bottom.

Token + learned position embeddings, a stack of pre-LayerNorm blocks (causal self-attention and
a GELU MLP, each added to the residual stream), a final LayerNorm and a language-model head tied
to the token embedding. Attention goes through `scaled_dot_product_attention`, which picks the
fastest kernel available.

The forward pass optionally takes a KV cache and the position of the first new token, so the
inference engine can prefill a prompt once and then decode one token at a time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from chatforge.errors import ConfigError

IGNORE_INDEX = -100  # label value that contributes no loss (prompt tokens, padding)


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    context_length: int = 256  # GPT-2 calls it n_positions
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model config: dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model config: unknown field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**d)


class KVCache:
    """Preallocated keys and values for every layer: (n_layer, batch, n_head, max_len, head_dim).

    The caller tracks positions: a forward with `pos_offset=p` on T new tokens writes slots
    p..p+T-1 and attends over slots 0..p+T-1.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_len = max_len or config.context_length
        shape = (config.n_layer, batch_size, config.n_head, self.max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: position {end} > max_len {self.max_len}")
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        layer: int,
        kv_cache: KVCache | None,
        pos_offset: int,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v, pos_offset)
        dropout = self.dropout if self.training else 0.0
        if T == 1 and dropout == 0.0 and torch.compiler.is_compiling():  # a compiled decode step
            y = single_query_attention(q, k, v, attn_mask)
        elif attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        elif T == 1:  # one new token sees everything cached
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        elif k.shape[2] == T:  # causal over new tokens only
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:  # new tokens after a cached prefix: token i sees the prefix and new tokens <= i
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new token per row over its cache, written out for torch.compile: two batched
    products and a softmax inductor fuses with the scaling and the mask. In the compiled decode
    steps SDPA's CPU kernel is slow on the cache's slices: written out, GPT-2 small's 16-row step is
    26% faster at context 200 and 39% at 600, about even at 32 (paired, one process). In the one-row
    graph (no mask) inductor's attention pattern turns this back into SDPA's kernel, which is as
    fast there."""
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, 1, S)
    if attn_mask is not None:
        scores = scores + attn_mask
    return torch.softmax(scores, dim=-1) @ v


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(gelu_tanh(self.c_fc(x))))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU, the tanh approximation ("gelu_new" in transformers): 0.5·x·(1 + tanh(u)).

    Under torch.compile it is written as x·sigmoid(2u), the same function: inductor then fuses it
    into one loop built on exp, about twice as fast on CPU (forward and backward) as its tanh.
    Eager keeps PyTorch's single fused kernel.
    """
    if torch.compiler.is_compiling():
        return x * torch.sigmoid(_GELU_2U * (x + 0.044715 * x * x * x))
    return F.gelu(x, approximate="tanh")


_GELU_2U = 2 * math.sqrt(2 / math.pi)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, layer, kv_cache, pos_offset, attn_mask) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), layer, kv_cache, pos_offset, attn_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.context_length, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one matrix reads and writes tokens
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual
        # stream's variance does not grow with depth (two additions per block).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        kv_cache: KVCache | None = None,
        pos_offset: int = 0,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final (post-LayerNorm) hidden states, (B, T, n_embd); scalar heads read these.

        position_ids (B, T) overrides pos_offset (left-padded batches); attn_mask is a boolean
        (B, 1, T, S) or (T, S) mask, True where attention is allowed, over cached + new keys, or
        an additive float mask of the same shape (0 allowed, -inf hidden).
        """
        T = idx.shape[1]
        if position_ids is None:
            if pos_offset + T > self.config.context_length:
                raise ValueError(
                    f"sequence of {pos_offset + T} tokens exceeds context_length {self.config.context_length}"
                )
            position_ids = torch.arange(pos_offset, pos_offset + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(position_ids))
        for i, block in enumerate(self.h):
            x = block(x, i, kv_cache, pos_offset, attn_mask)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, **kwargs) -> torch.Tensor:
        """Next-token logits (B, T, vocab_size); keyword arguments as in `hidden_states`."""
        return self.lm_head(self.hidden_states(idx, **kwargs))

    @torch.no_grad()
    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow the (tied) token embedding to vocab_size rows; new rows start at the mean embedding.

        The mean keeps new tokens' logits ordinary at first (a random row could dominate the softmax).
        """
        old = self.wte.weight
        if vocab_size < old.shape[0]:
            raise ValueError(f"cannot shrink the vocabulary from {old.shape[0]} to {vocab_size}")
        wte = nn.Embedding(vocab_size, old.shape[1], device=old.device, dtype=old.dtype)
        wte.weight[: old.shape[0]] = old
        wte.weight[old.shape[0] :] = old.mean(dim=0)
        self.wte = wte
        self.lm_head = nn.Linear(old.shape[1], vocab_size, bias=False, device=old.device, dtype=old.dtype)
        self.lm_head.weight = self.wte.weight
        self.config.vocab_size = vocab_size

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); non_embedding drops the embeddings, as in GPT-2's paper."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward) done by matmuls.

        6 per weight (2 forward, 4 backward) over the non-embedding weights and the LM head, plus
        attention scores and mixing: PaLM's 12·L·T·C halved, because causal attention only
        needs the lower triangle (conservative: it never overstates utilization).
        """
        c = self.config
        T = seq_len or c.context_length
        weights = self.num_params(non_embedding=True) + c.n_embd * c.vocab_size
        return 6 * weights + 6 * c.n_layer * T * c.n_embd

    def make_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.config, batch_size, max_len, device=p.device, dtype=p.dtype)


def lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of next-token predictions; targets equal to IGNORE_INDEX count for nothing."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


class ScalarHeadModel(nn.Module):
    """A GPT backbone with a scalar head read at each sequence's last real token: a reward or value model.

    `score` gives one number per sequence (the reward model's output), `values` one per position
    (the PPO value model's). The reward normalization (gain, bias) is part of the model so a saved
    reward model scores on the scale it was normalized to: score = gain * head(h_last) + bias.
    """

    def __init__(self, backbone: GPT) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.head = nn.Linear(backbone.config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(backbone.config.n_embd + 1))
        nn.init.zeros_(self.head.bias)
        self.register_buffer("gain", torch.ones(()))
        self.register_buffer("bias", torch.zeros(()))

    def values(self, idx: torch.Tensor, **kwargs) -> torch.Tensor:
        """(B, T) head outputs at every position, normalized; keyword arguments as in GPT.hidden_states."""
        return self.gain * self.head(self.backbone.hidden_states(idx, **kwargs)).squeeze(-1) + self.bias

    def score(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B,) the value at each row's last real token; rows are right-padded, lengths count real tokens."""
        per_position = self.values(idx)
        return per_position.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.score(idx, lengths)


def ranking_loss(scores: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
    """InstructGPT's loss over rankings, summed over groups: each group's mean over its C(K,2) pairs
    of -log sigmoid(r_better - r_worse).

    `scores` holds each group's responses in rank order (best first), groups one after another.
    Normalizing by the pair count weighs every prompt equally however many responses it has,
    and all pairs of one prompt share one forward pass per response (no overfitting from
    repeating a response across pairs as separate examples).
    """
    total = scores.new_zeros(())
    start = 0
    for k in group_sizes:
        r = scores[start : start + k]
        better, worse = torch.triu_indices(k, k, offset=1, device=scores.device)
        total = total + (-F.logsigmoid(r[better] - r[worse])).mean()
        start += k
    return total
