"""Logits processors: per-row penalties, bans, bias and sampling warpers, and the sampler.

Every row of a decode batch belongs to a different request with its own `SamplingParams`, so each
processor holds one parameter per row (a tensor or a list) and works on the whole (B, V) batch at
once, as vLLM does. A processor whose rows all have the neutral value is not built at all, so a
batch of plain greedy requests pays nothing: `LogitsPipeline.__call__` returns its input.

Order, applied to the model's float32 logits each step:

    1. logit_bias          logits[id] += bias                             (penalties, bias and bans
    2. repetition_penalty  CTRL: seen tokens, score<0 ? score*p : score/p  act on the model's raw
    3. presence/frequency  logits -= count*frequency + (count>0)*presence  scores, in logit units)
    4. no_repeat_ngram     -inf on tokens completing an n-gram seen before
    5. min_tokens          -inf on the row's stop ids until min_tokens exist
    6. grammar             -inf on tokens the row's grammar forbids; stop  (structured output, grammar.py)
                           ids allowed exactly when the JSON is complete
    7. temperature         logits / T                                     (then the warpers shape
    8. top_k               keep the k best (and ties with the k-th)        the distribution that is
    9. top_p               keep the smallest nucleus with mass >= top_p    actually sampled)
   10. min_p               drop tokens with prob < min_p * max prob
   11. watermark           logits[green] += delta                         (chatforge/generate/watermark.py)

Why this order: it is transformers' `_get_logits_processor` order (SequenceBias, RepetitionPenalty,
NoRepeatNGram, MinNewTokensLength, then Temperature, TopK, TopP, MinP) and vLLM's (logit_bias before
the sampler; in it repetition, frequency, presence, then temperature, top-k/top-p, min-p). The bias
comes before the CTRL penalty because that penalty is multiplicative (order matters); it is the
caller's edit of the model's logits, which the penalties then see. The -inf bans are absorbing
(-inf*p, -inf/p and -inf+x stay -inf), so they may sit anywhere in 1-5. The grammar mask comes last of
the bans and wins over them: a row whose allowed tokens were all banned samples uniformly among them, and
a complete grammar allows the stop ids even before min_tokens (grammar.py). Temperature comes before
top-p and min-p so they cut the distribution that is sampled (top-k does not care: it is monotone).
The watermark comes after all of them, as in transformers since its PR #34849: its bias reorders only
the tokens the warpers kept (-inf + delta stays -inf), so top-k and top-p mean the same with and
without it, and greedy rows take the argmax of the biased logits (the watermark applies to them too).
Top-k runs before top-p, so top-p measures mass among the k survivors. Greedy rows (temperature 0,
or beam search) get neutral warper values and are decided by argmax in `sample_next`.

Log-probabilities (`token_logprobs`) are taken from the RAW model logits, before any processing:
that is the model's own distribution (what transformers' `output_logits=True` + log_softmax gives
and what vLLM reports by default); the processed one has -inf holes and depends on each request's
sampling knobs, so the same text would score differently under greedy and sampled requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from chatforge.generate.params import SamplingParams

NEG_INF = float("-inf")
Rows = Sequence[int] | Tensor


def _row_list(rows: Rows) -> list[int]:
    return [int(r) for r in (rows.tolist() if isinstance(rows, Tensor) else rows)]


def _f32(values: list[float], device: torch.device | str) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


class TokenHistory:
    """Each row's prompt + generated tokens, and the (B, V) tallies the penalties read.

    `tokens[r]` (prompt then generated) is always kept; the tensors `generated_counts` (int32
    counts of generated tokens, for presence/frequency) and `seen` (bool, prompt or generated, for
    the CTRL penalty) are built on first use and updated by `append` from then on, so a batch that
    uses no penalty never pays for them.
    """

    def __init__(self, prompts: Sequence[Sequence[int]], vocab_size: int,
                 device: torch.device | str = "cpu") -> None:
        self.tokens = [[int(t) for t in p] for p in prompts]
        self.prompt_lens = [len(p) for p in self.tokens]
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._counts: Tensor | None = None
        self._seen: Tensor | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def generated_lens(self) -> list[int]:
        return [len(t) - p for t, p in zip(self.tokens, self.prompt_lens)]

    @property
    def num_generated(self) -> Tensor:
        """(B,) int64 number of tokens generated so far per row."""
        return torch.tensor(self.generated_lens, dtype=torch.long, device=self.device)

    def generated(self, row: int) -> list[int]:
        return self.tokens[row][self.prompt_lens[row]:]

    @property
    def generated_counts(self) -> Tensor:
        """(B, V) int32: how often each token was generated in each row."""
        if self._counts is None:
            self._counts = self._tally([self.generated(r) for r in range(len(self))])
        return self._counts

    @property
    def seen(self) -> Tensor:
        """(B, V) bool: the token occurs in the row's prompt or generated tokens."""
        if self._seen is None:
            self._seen = self._tally(self.tokens) > 0
        return self._seen

    def _tally(self, seqs: list[list[int]]) -> Tensor:
        out = torch.zeros(len(seqs), self.vocab_size, dtype=torch.int32)
        for r, seq in enumerate(seqs):
            if seq:
                out[r] = torch.bincount(torch.tensor(seq), minlength=self.vocab_size)
        return out.to(self.device)

    def append(self, tokens: Tensor | Sequence[int]) -> None:
        """Add one generated token to every row."""
        ids = tokens.reshape(-1).tolist() if isinstance(tokens, Tensor) else [int(t) for t in tokens]
        if len(ids) != len(self):
            raise ValueError(f"append: got {len(ids)} tokens for {len(self)} rows")
        for seq, t in zip(self.tokens, ids):
            seq.append(t)
        if self._counts is None and self._seen is None:
            return
        rows = torch.arange(len(ids), device=self.device)
        cols = (tokens.reshape(-1).to(self.device, torch.long) if isinstance(tokens, Tensor)
                else torch.tensor(ids, device=self.device))
        if self._counts is not None:
            self._counts[rows, cols] += 1
        if self._seen is not None:
            self._seen[rows, cols] = True

    def extend_row(self, row: int, tokens: Sequence[int]) -> None:
        """Add tokens after one row's generated ones (tool results the engine fed in): they count as
        generated, since everything after the prompt is the answer's."""
        ids = [int(t) for t in tokens]
        self.tokens[row] += ids
        if ids and self._counts is not None:
            self._counts[row] += torch.bincount(torch.tensor(ids), minlength=self.vocab_size).to(self._counts)
        if ids and self._seen is not None:
            self._seen[row, torch.tensor(ids, device=self.device)] = True

    def select(self, rows: Rows) -> TokenHistory:
        """A new history of the given rows, in that order (repeats allowed: n > 1 copies)."""
        idx = _row_list(rows)
        out = TokenHistory([], self.vocab_size, self.device)
        out.tokens = [list(self.tokens[r]) for r in idx]
        out.prompt_lens = [self.prompt_lens[r] for r in idx]
        index = torch.tensor(idx, dtype=torch.long, device=self.device)
        out._counts = None if self._counts is None else self._counts.index_select(0, index)
        out._seen = None if self._seen is None else self._seen.index_select(0, index)
        return out

    def add_rows(self, other: TokenHistory) -> TokenHistory:
        """Append `other`'s rows after ours, in place; returns self."""
        if other.vocab_size != self.vocab_size:
            raise ValueError(f"add_rows: vocab size {other.vocab_size} != {self.vocab_size}")
        counts = None if self._counts is None else other.generated_counts.to(self.device)
        seen = None if self._seen is None else other.seen.to(self.device)
        self.tokens += [list(t) for t in other.tokens]
        self.prompt_lens += list(other.prompt_lens)
        if counts is not None:
            self._counts = torch.cat([self._counts, counts])
        if seen is not None:
            self._seen = torch.cat([self._seen, seen])
        return self


class Processor(Protocol):
    def __call__(self, logits: Tensor, history: TokenHistory) -> Tensor: ...


def _ban(logits: Tensor, rows: list[int], cols: list[int]) -> Tensor:
    """A copy of logits with -inf at each (rows[i], cols[i])."""
    if not rows:
        return logits
    out = logits.clone()
    index = torch.tensor([rows, cols], dtype=torch.long).to(logits.device)
    out[index[0], index[1]] = NEG_INF
    return out


class LogitBias:
    """logits[r, id] += bias for each (id, bias) of row r (OpenAI logit_bias: -100 bans, 100 forces).

    `ids` and `values` are (B, L), padded with id 0 and bias 0.
    """

    def __init__(self, ids: Tensor, values: Tensor) -> None:
        self.ids, self.values = ids, values

    @classmethod
    def build(cls, biases: list[dict[int, float]], device: torch.device | str) -> LogitBias | None:
        width = max((len(b) for b in biases), default=0)
        if width == 0:
            return None
        ids = torch.zeros(len(biases), width, dtype=torch.long)
        values = torch.zeros(len(biases), width)
        for r, bias in enumerate(biases):
            ids[r, :len(bias)] = torch.tensor(list(bias), dtype=torch.long)
            values[r, :len(bias)] = torch.tensor(list(bias.values()), dtype=torch.float32)
        return cls(ids.to(device), values.to(device))

    def __call__(self, logits: Tensor, history: TokenHistory | None = None) -> Tensor:
        return logits.scatter_add(1, self.ids, self.values)


class RepetitionPenalty:
    """CTRL penalty (transformers' RepetitionPenaltyLogitsProcessor) on tokens in the prompt or output:
    a negative logit is multiplied by the row's penalty, a positive one divided by it. `penalty`: (B,)."""

    def __init__(self, penalty: Tensor) -> None:
        self.penalty = penalty

    @classmethod
    def build(cls, penalties: list[float], device: torch.device | str) -> RepetitionPenalty | None:
        if all(p == 1.0 for p in penalties):
            return None
        return cls(_f32(penalties, device))

    def __call__(self, logits: Tensor, history: TokenHistory) -> Tensor:
        p = self.penalty[:, None]
        return torch.where(history.seen, torch.where(logits < 0, logits * p, logits / p), logits)


class PresenceFrequencyPenalty:
    """OpenAI: logits[j] -= count[j] * frequency + (count[j] > 0) * presence, over generated tokens.
    `presence`, `frequency`: (B,)."""

    def __init__(self, presence: Tensor, frequency: Tensor) -> None:
        self.presence, self.frequency = presence, frequency

    @classmethod
    def build(cls, presence: list[float], frequency: list[float],
              device: torch.device | str) -> PresenceFrequencyPenalty | None:
        if all(p == 0 for p in presence) and all(f == 0 for f in frequency):
            return None
        return cls(_f32(presence, device), _f32(frequency, device))

    def __call__(self, logits: Tensor, history: TokenHistory) -> Tensor:
        counts = history.generated_counts
        return logits - (counts * self.frequency[:, None] + (counts > 0) * self.presence[:, None])


def banned_ngram_tokens(seq: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already in `seq` (transformers' NoRepeatNGram rule:
    the last n-1 tokens are matched against every earlier n-gram's first n-1; n=1 bans all seen)."""
    if n <= 0 or len(seq) < n:
        return []
    t = torch.tensor(seq, dtype=torch.long)
    windows = t.unfold(0, n, 1)
    matches = (windows[:, :-1] == t[len(seq) + 1 - n:]).all(-1)
    return windows[matches, -1].tolist()


class NoRepeatNGram:
    """-inf on tokens that would repeat an n-gram of the row's prompt + output; `sizes[r]` = 0: off."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes

    @classmethod
    def build(cls, sizes: list[int]) -> NoRepeatNGram | None:
        return cls(list(sizes)) if any(sizes) else None

    def __call__(self, logits: Tensor, history: TokenHistory) -> Tensor:
        rows: list[int] = []
        cols: list[int] = []
        for r, n in enumerate(self.sizes):
            banned = banned_ngram_tokens(history.tokens[r], n)
            rows += [r] * len(banned)
            cols += banned
        return _ban(logits, rows, cols)


class MinTokens:
    """-inf on row r's stop token ids while it has generated fewer than `min_tokens[r]` tokens."""

    def __init__(self, min_tokens: list[int], stop_ids: list[list[int]]) -> None:
        self.min_tokens, self.stop_ids = min_tokens, stop_ids

    @classmethod
    def build(cls, min_tokens: list[int], stop_ids: list[list[int]]) -> MinTokens | None:
        if not any(m > 0 and ids for m, ids in zip(min_tokens, stop_ids)):
            return None
        return cls(list(min_tokens), [list(s) for s in stop_ids])

    def __call__(self, logits: Tensor, history: TokenHistory) -> Tensor:
        rows: list[int] = []
        cols: list[int] = []
        for r, (made, wanted) in enumerate(zip(history.generated_lens, self.min_tokens)):
            if made < wanted:
                rows += [r] * len(self.stop_ids[r])
                cols += self.stop_ids[r]
        return _ban(logits, rows, cols)


class Temperature:
    """logits / temperature per row (`temperature`: (B,) float32, > 0; greedy rows use 1)."""

    def __init__(self, temperature: Tensor) -> None:
        self.temperature = temperature

    @classmethod
    def build(cls, temperatures: list[float], device: torch.device | str) -> Temperature | None:
        if all(t == 1.0 for t in temperatures):
            return None
        return cls(_f32(temperatures, device))

    def __call__(self, logits: Tensor, history: TokenHistory | None = None) -> Tensor:
        return logits / self.temperature[:, None]


class TopK:
    """Keep each row's top_k highest logits and all logits tied with the k-th (transformers'
    TopKLogitsWarper; k above the vocabulary keeps all). `top_k`: (B,) int64, 0 = off."""

    def __init__(self, top_k: Tensor) -> None:
        self.top_k = top_k
        self.max_k = int(top_k.max()) if top_k.numel() else 0

    @classmethod
    def build(cls, top_k: list[int], device: torch.device | str) -> TopK | None:
        return cls(torch.tensor(top_k, dtype=torch.long, device=device)) if any(top_k) else None

    def __call__(self, logits: Tensor, history: TokenHistory | None = None) -> Tensor:
        vocab = logits.size(-1)
        off = self.top_k <= 0
        k = torch.where(off, 1, self.top_k.clamp(max=vocab))
        kth = logits.topk(min(self.max_k, vocab), dim=-1).values.gather(1, k[:, None] - 1)
        kth = kth.masked_fill(off[:, None], NEG_INF)
        return logits.masked_fill(logits < kth, NEG_INF)


class TopP:
    """Nucleus (transformers' TopPLogitsWarper): sort ascending, drop tokens whose cumulative
    probability is <= 1 - top_p, always keep the most probable. `top_p`: (B,); 1 = off. Pass float64
    for bit-exact thresholds: 1 - top_p is formed in float64 and compared in float32, as transformers
    does with a Python float."""

    def __init__(self, top_p: Tensor) -> None:
        top_p = top_p.double()
        self.threshold = torch.where(top_p < 1, 1 - top_p, -1.0).float()

    @classmethod
    def build(cls, top_p: list[float], device: torch.device | str) -> TopP | None:
        if all(p >= 1.0 for p in top_p):
            return None
        return cls(torch.tensor(top_p, dtype=torch.float64, device=device))

    def __call__(self, logits: Tensor, history: TokenHistory | None = None) -> Tensor:
        sorted_logits, order = torch.sort(logits, descending=False)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= self.threshold[:, None]
        remove[:, -1] = False
        return logits.masked_fill(remove.scatter(1, order, remove), NEG_INF)


class MinP:
    """Drop tokens whose probability is below min_p times the row's highest probability
    (transformers' MinPLogitsWarper). `min_p`: (B,) float32 in [0, 1]; 0 = off. Its
    min_tokens_to_keep=1 needs no step here: p_max < min_p * p_max is false for min_p <= 1."""

    def __init__(self, min_p: Tensor) -> None:
        self.min_p = min_p

    @classmethod
    def build(cls, min_p: list[float], device: torch.device | str) -> MinP | None:
        if all(p == 0 for p in min_p):
            return None
        return cls(_f32(min_p, device))

    def __call__(self, logits: Tensor, history: TokenHistory | None = None) -> Tensor:
        probs = logits.softmax(-1)
        return logits.masked_fill(probs < self.min_p[:, None] * probs.amax(-1, keepdim=True), NEG_INF)


def is_greedy(p: SamplingParams) -> bool:
    """Argmax rows: temperature 0, or beam search (where sampling parameters do not apply)."""
    return p.temperature == 0 or p.num_beams > 1


def build_processors(params: list[SamplingParams], stop_ids: list[list[int]],
                     device: torch.device | str, tokenizer: Any = None) -> list[Processor]:
    """The processors some row needs, in the module's documented order (`tokenizer`: what a row's
    grammar is compiled against; needed only when some row has one)."""
    sampling = [not is_greedy(p) for p in params]

    def warp(name: str, neutral: float) -> list:
        return [getattr(p, name) if s else neutral for p, s in zip(params, sampling)]

    stops = [sorted(set(s) | set(p.stop_token_ids)) for p, s in zip(params, stop_ids)]
    built = [
        LogitBias.build([p.logit_bias for p in params], device),
        RepetitionPenalty.build([p.repetition_penalty for p in params], device),
        PresenceFrequencyPenalty.build([p.presence_penalty for p in params],
                                       [p.frequency_penalty for p in params], device),
        NoRepeatNGram.build([p.no_repeat_ngram_size for p in params]),
        MinTokens.build([p.min_tokens for p in params], stops),
        _grammar_mask(params, stops, tokenizer),
        Temperature.build(warp("temperature", 1.0), device),
        TopK.build(warp("top_k", 0), device),
        TopP.build(warp("top_p", 1.0), device),
        MinP.build(warp("min_p", 0.0), device),
        _watermark(params),
    ]
    return [p for p in built if p is not None]


def _grammar_mask(params: list[SamplingParams], stops: list[list[int]], tokenizer: Any) -> Processor | None:
    if all(p.grammar is None for p in params):
        return None  # no import of the grammar library for batches without structured output
    from chatforge.generate.grammar import GrammarMask

    return GrammarMask.build([p.grammar for p in params], [p.max_tokens for p in params], stops, tokenizer)


def _watermark(params: list[SamplingParams]) -> Processor | None:
    if all(p.watermark is None for p in params):
        return None
    from chatforge.generate.watermark import WatermarkBias

    return WatermarkBias.build([p.watermark for p in params])


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded for one request, or None (the global RNG) when it has no seed."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


class LogitsPipeline:
    """The processors for one decode batch, one row per request (see the module docstring for order).

    `greedy` is a (B,) bool tensor kept on the CPU so `sample_next` decides without a device sync;
    `generators[r]` is row r's seeded generator (None: global RNG). `select` and `add_rows` carry the
    generators over (a copied row shares its request's generator, so n copies draw different tokens
    one after another, reproducibly). A rebuilt grammar mask replays each row's generated tokens from
    the history its matcher is called with, so rows keep their place in their grammar.
    """

    def __init__(self, params: list[SamplingParams], stop_ids: list[list[int]],
                 generators: list[torch.Generator | None], device: torch.device | str = "cpu",
                 tokenizer: Any = None) -> None:
        self.device, self.tokenizer = torch.device(device), tokenizer
        self._set_rows(params, stop_ids, generators)

    def _set_rows(self, params: list[SamplingParams], stop_ids: list[list[int]],
                  generators: list[torch.Generator | None]) -> None:
        if not len(params) == len(stop_ids) == len(generators):
            raise ValueError("params, stop_ids and generators must have one entry per row")
        self.params, self.stop_ids, self.generators = list(params), [list(s) for s in stop_ids], list(generators)
        self.greedy = torch.tensor([is_greedy(p) for p in self.params], dtype=torch.bool)
        self.processors = build_processors(self.params, self.stop_ids, self.device, self.tokenizer)

    @classmethod
    def from_params(cls, params: list[SamplingParams], stop_ids: list[list[int]],
                    device: torch.device | str = "cpu", tokenizer: Any = None) -> LogitsPipeline:
        """`stop_ids[r]`: row r's stop tokens (the model's end tokens unless ignore_eos, plus
        stop_token_ids), which min_tokens suppresses and a grammar allows once complete; `tokenizer`:
        the engine's, which rows with a grammar are compiled against."""
        return cls(params, stop_ids, [make_generator(p.seed, device) for p in params], device, tokenizer)

    def __len__(self) -> int:
        return len(self.params)

    def __call__(self, logits: Tensor, history: TokenHistory) -> Tensor:
        """Processed (B, V) logits; the input is never modified."""
        for processor in self.processors:
            logits = processor(logits, history)
        return logits

    def select(self, rows: Rows) -> LogitsPipeline:
        idx = _row_list(rows)
        return LogitsPipeline([self.params[r] for r in idx], [self.stop_ids[r] for r in idx],
                              [self.generators[r] for r in idx], self.device, self.tokenizer)

    def add_rows(self, other: LogitsPipeline) -> LogitsPipeline:
        """Append `other`'s rows after ours, in place; returns self."""
        self.tokenizer = self.tokenizer if self.tokenizer is not None else other.tokenizer
        self._set_rows(self.params + other.params, self.stop_ids + other.stop_ids,
                       self.generators + other.generators)
        return self


def uniforms(generators: Sequence[torch.Generator | None], device: torch.device) -> Tensor:
    """(S, 1) float64 uniforms in [0, 1): one per row from its own generator (None: global RNG)."""
    if all(g is None for g in generators):
        return torch.rand(len(generators), 1, dtype=torch.float64, device=device)
    u = torch.empty(len(generators), 1, dtype=torch.float64, device=device)
    for i, g in enumerate(generators):
        u[i] = torch.rand(1, dtype=torch.float64, device=device, generator=g)
    return u


def inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """(S,) the index i with cdf[i-1] <= u * total < cdf[i] per row: a draw from `probs` (S, V)
    given uniforms u (S, 1) in [0, 1). The cdf is float64, where u < 1 gives u * total < total, so
    the index is in range and a zero-probability token (cdf[i] == cdf[i-1]) is never returned
    (a row of NaNs, which has no distribution, gets the last index rather than an invalid one)."""
    cdf = probs.double().cumsum(-1)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    return index.clamp_(max=probs.size(-1) - 1)


def sample_next(logits: Tensor, greedy: Tensor, generators: Sequence[torch.Generator | None]) -> Tensor:
    """(B,) next tokens: argmax for greedy rows; for the others one draw from softmax(logits) by
    inverse CDF, with one uniform per row from that row's generator (so a seed reproduces its
    tokens whatever else is batched). The same distribution as torch.multinomial, which at
    V=50257 costs ~1.7 ms a row on one CPU thread against ~0.1 ms here."""
    sampling = (~greedy.cpu()).nonzero().flatten().tolist()
    if not sampling:
        return logits.argmax(-1)
    u = uniforms([generators[r] for r in sampling], logits.device)
    if len(sampling) == logits.size(0):
        return inverse_cdf(logits.softmax(-1), u)
    tokens = logits.argmax(-1)
    tokens[sampling] = inverse_cdf(logits[sampling].softmax(-1), u)
    return tokens


def token_logprobs(raw_logits: Tensor, chosen: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(chosen logprob (B,), top-k ids (B, k), top-k logprobs (B, k)) from log_softmax of the RAW
    model logits (see the module docstring for why not the processed ones)."""
    logprobs = raw_logits.float().log_softmax(-1)
    chosen_lp = logprobs.gather(1, chosen.reshape(-1, 1).long()).squeeze(1)
    top = logprobs.topk(min(k, logprobs.size(-1)), dim=-1)
    return chosen_lp, top.indices, top.values
