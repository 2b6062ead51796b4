"""The watermark of Kirchenbauer et al. (2023): before each token, the previous tokens seed a random
"green list" of a share gamma of the vocabulary, and the green tokens' logits get a bias delta. A
reader who knows the key recomputes the lists and counts green tokens (chatforge/detect/score.py).

Two seeding schemes, as the reference implementation (jwkirchenbauer/lm-watermarking) and
transformers' `WatermarkLogitsProcessor` define them:

- `lefthash`: the seed is key * (sum of the h previous tokens) (the additive PRF). With h = 1 this is
  transformers' `lefthash`, and the green lists, counts and z-scores equal its `WatermarkDetector`'s
  (tests/test_watermark.py); transformers looks at the last token only, whatever its context width.
- `selfhash`: the window is the h - 1 previous tokens and the candidate token itself; with T the
  key-seeded permutation table of 1,000,003 entries, the seed is min over the window of
  key * (T[t] + 1) * (T[candidate] + 1) in 64-bit arithmetic (the anchored min-hash). A candidate is
  green when it is in its own green list, so the bias goes to the best `candidates` tokens that pass
  that test (the reference's rejection sampling over the top 40). transformers computes it the same
  way, so selfhash matches it too.

The green list for a seed is the first int(gamma * V) entries of `torch.randperm(V)` drawn from a CPU
generator seeded with seed mod (2^64 - 1): the same lists on every machine.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor

from chatforge.errors import ConfigError

DEFAULT_KEY = 15485863  # the reference's and transformers' default: the millionth prime (not a secret)
SCHEMES = ("lefthash", "selfhash")
TABLE_SIZE = 1_000_003
SEED_MODULUS = 2**64 - 1
INT64 = 2**64


@dataclass(frozen=True)
class WatermarkConfig:
    """What the generator and the detector must share. `key` is the secret: it never appears in a repr,
    a log line, a response or a metric."""

    key: int = field(default=DEFAULT_KEY, repr=False)
    gamma: float = 0.25  # the green list's share of the vocabulary
    delta: float = 2.0  # the bias added to green tokens' logits
    seeding_scheme: str = "lefthash"
    context_width: int = 1  # h: lefthash's previous tokens; selfhash's window, the candidate included
    candidates: int = 40  # selfhash: how many of the best tokens are tested against their own list

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.key, int) and 0 < self.key < 2**63, "key", "a positive 63-bit integer"),
            (0.0 < self.gamma < 1.0, "gamma", f"in (0, 1), got {self.gamma}"),
            (self.delta >= 0.0, "delta", f">= 0, got {self.delta}"),
            (self.seeding_scheme in SCHEMES, "seeding_scheme",
             f"one of {', '.join(SCHEMES)}, got {self.seeding_scheme!r}"),
            (self.context_width >= 1, "context_width", f">= 1, got {self.context_width}"),
            (self.candidates >= 1, "candidates", f">= 1, got {self.candidates}"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"watermark: {name} must be {expected}")

    @property
    def selfhash(self) -> bool:
        return self.seeding_scheme == "selfhash"

    def public(self) -> dict:
        """The settings without the key: what a response or a log may show."""
        return {"gamma": self.gamma, "delta": self.delta, "seeding_scheme": self.seeding_scheme,
                "context_width": self.context_width}


def key_from_text(text: str) -> int:
    """A watermark key from what a user types: a decimal integer is taken as is (transformers'
    `hashing_key`), any other text is hashed (the first 63 bits of its SHA-256)."""
    text = text.strip()
    if not text:
        raise ConfigError("watermark: the key is empty")
    if text.isdigit():
        key = int(text)
        if not 0 < key < 2**63:
            raise ConfigError("watermark: a numeric key must be in [1, 2^63)")  # the key is not echoed: a secret
        return key
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1 or 1


@lru_cache(maxsize=4)
def _permutation_table(key: int) -> array:
    """selfhash's hash: a permutation of 0..TABLE_SIZE-1 drawn from a generator seeded with the key
    (8 MB as an int64 array; a list of Python ints would take 36)."""
    generator = torch.Generator().manual_seed(key)
    return array("q", torch.randperm(TABLE_SIZE, generator=generator).numpy().tobytes())


def _wrap_int64(value: int) -> int:
    value %= INT64
    return value - INT64 if value >= 2**63 else value


class GreenLists:
    """Seeds and green lists for one key and vocabulary. The lists are cached by seed as vocabulary-sized
    masks (text repeats its contexts; 512 masks of GPT-2's vocabulary take 26 MB), and each is drawn
    from a generator of its own, so threads may share one GreenLists."""

    def __init__(self, config: WatermarkConfig, vocab_size: int, cache_size: int = 512) -> None:
        if vocab_size < 2:
            raise ConfigError(f"watermark: the vocabulary must have at least 2 tokens, got {vocab_size}")
        self.config, self.vocab_size = config, vocab_size
        self.size = int(vocab_size * config.gamma)
        if self.size < 1:
            raise ConfigError(f"watermark: gamma {config.gamma} of {vocab_size} tokens leaves an empty green list")
        self._masks = lru_cache(maxsize=cache_size)(self._mask)

    def seed(self, window: tuple[int, ...]) -> int:
        """The seed from a window of token ids: the h previous tokens (lefthash) or the h - 1 previous
        tokens and the candidate itself (selfhash)."""
        key = self.config.key
        if not self.config.selfhash:
            return key * sum(window)
        table = _permutation_table(key)
        anchor = table[window[-1] % TABLE_SIZE] + 1
        return min(_wrap_int64(key * (table[t % TABLE_SIZE] + 1) * anchor) for t in window)

    def _draw(self, seed: int) -> Tensor:
        generator = torch.Generator().manual_seed(seed % SEED_MODULUS)
        return torch.randperm(self.vocab_size, generator=generator)[: self.size]

    def _mask(self, seed: int) -> Tensor:
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[self._draw(seed)] = True
        return mask

    def ids(self, window: tuple[int, ...]) -> Tensor:
        """The green token ids for a window, in the order the permutation drew them (not cached)."""
        return self._draw(self.seed(window))

    def mask(self, window: tuple[int, ...]) -> Tensor:
        """The green list for a window as a (V,) bool mask (cached)."""
        return self._masks(self.seed(window))

    def is_green(self, window: tuple[int, ...], token: int) -> bool:
        """Whether `token` is green after `window` (for selfhash, `window` ends with `token`)."""
        return bool(self.mask(window)[token])

    def window_before(self, tokens: list[int] | tuple[int, ...],
                      candidate: int | None = None) -> tuple[int, ...] | None:
        """The window that seeds the token after `tokens` (selfhash: the `candidate` for that place), or
        None where there are too few tokens before it (the reference skips such places)."""
        h = self.config.context_width
        if self.config.selfhash:
            before = tuple(tokens[len(tokens) - (h - 1):]) if h > 1 else ()
            return before + (int(candidate),) if len(before) == h - 1 else None
        return tuple(tokens[len(tokens) - h:]) if len(tokens) >= h else None


@lru_cache(maxsize=4)
def green_lists(config: WatermarkConfig, vocab_size: int) -> GreenLists:
    """One GreenLists per key and vocabulary (the last four used), so its caches outlive a decode batch
    and a detection request."""
    return GreenLists(config, vocab_size)


class WatermarkBias:
    """The engine's watermark processor, applied last (after temperature, top-k, top-p and min-p, as
    transformers orders it since its PR #34849): green tokens' logits get delta, so the watermark moves
    probability only among the tokens the sampler may still choose. `configs[r]` is row r's watermark
    (None: that row is not watermarked)."""

    def __init__(self, configs: list[WatermarkConfig | None]) -> None:
        self.configs = configs

    @classmethod
    def build(cls, configs: list[WatermarkConfig | None]) -> WatermarkBias | None:
        return cls(configs) if any(c is not None for c in configs) else None

    def __call__(self, logits: Tensor, history) -> Tensor:
        """`history.tokens[r]`: row r's prompt and generated tokens; the lists are over the logits' width
        (the model's vocabulary, which the detector must be given)."""
        out = logits.clone()
        for row, config in enumerate(self.configs):
            if config is None or config.delta == 0.0:
                continue
            lists, tokens = green_lists(config, logits.size(-1)), history.tokens[row]
            if config.selfhash:
                green = self._selfhash_green(lists, tokens, logits[row])
            else:
                green = self._lefthash_green(lists, tokens)
            if green is not None and len(green):
                out[row, green.to(out.device)] += config.delta
        return out

    @staticmethod
    def _lefthash_green(lists: GreenLists, tokens: list[int]) -> Tensor | None:
        window = lists.window_before(tokens)
        return None if window is None else lists.mask(window)

    @staticmethod
    def _selfhash_green(lists: GreenLists, tokens: list[int], row_logits: Tensor) -> Tensor | None:
        if lists.window_before(tokens, 0) is None:
            return None
        best = row_logits.topk(min(lists.config.candidates, row_logits.numel())).indices.tolist()
        green = [c for c in best if lists.is_green(lists.window_before(tokens, c), c)]
        return torch.tensor(green, dtype=torch.long)
