"""Zero-shot detectors of machine text: a language model's own statistics, no classifier trained.

Three methods, each one score per text and a direction (METHODS):

- `perplexity_burstiness` (GPTZero-style). log-perplexity = the mean over the scored tokens of
  -log p(token); burstiness = the population standard deviation, across sentences, of each sentence's
  mean token log-perplexity (sentences that hold at least one scored token; a sentence ends at . ! ? or
  ... followed by white space, or at a line break). Score = log-perplexity + burstiness, both in nats
  per token; lower means machine (machine text is predictable and evenly so). Both parts are reported.
- `fast_detectgpt` (Bao et al. 2024), the analytic criterion with one model sampling and scoring:
  (ll - mu) / sqrt(var), ll = sum_t log p_t(x_t), mu = sum_t E_{v~p_t} log p_t(v), var = sum_t
  Var_{v~p_t} log p_t(v). Higher means machine (text sampled from the model scores about 0, human text
  below). It grows like -sqrt(T) for human text, so calibrate on texts of the lengths you will score.
- `binoculars` (Hans et al. 2024), the base model observing and the chat model performing: log-ppl =
  the performer's mean -log q_t(x_t); x-ppl = the mean cross-entropy -sum_v p_t(v) log q_t(v) of the
  observer's distribution p_t against the performer's q_t; score = log-ppl / x-ppl. Lower means machine.

Departures from the reference implementations, where their users found faults:
- The prompt a text answered (`contexts`) conditions the models but is not scored: only the text's
  tokens count. A context given as token ids (a chat template's rendering) is used as is; a string is
  normalized and tokenized after the `<|endoftext|>` that starts every pretraining document (when the
  tokenizer has `eot_id`), which also lets the first token of a text without context be scored.
- Binoculars' two means run over the same positions, those that predict a token of the text (the
  reference averages x-ppl over one more position, and masks by pad id, so an end-of-text inside the text
  vanished); texts are never truncated.
- Texts longer than the context are scored in windows: the targets are cut into chunks of `stride`
  tokens (half the context by default) and each chunk is predicted from a window of the `context_length`
  tokens before its end, so every token is scored once and sees at least context_length - stride + 1
  tokens before it (all of them near the start).
- Every score reports `tokens_scored`; fewer than `min_tokens` (16) give the verdict "too short".
- A score gets a verdict only from a threshold calibrated on human text (chatforge.detect.calibrate),
  which records the method, these parameters and the models' `fingerprint`, and refuses other ones.

Texts are batched: windows are right-padded, which causal attention makes exact (no real token sees a
pad), and pad positions are masked out of every sum; no gradients are kept.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from chatforge.detect.score import normalize_text
from chatforge.errors import ConfigError

MIN_TOKENS = 16  # below this many scored tokens no verdict is given
MAX_BATCH_LOGITS = 1 << 24  # rows x length x vocab per forward (64 MiB of fp32 logits), at least one row
BURSTINESS = "population std across sentences of the sentence mean token log-perplexity"
_SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*\s+|\n\s*")

Context = str | Sequence[int] | None


@dataclass
class ZeroShotScore:
    """One text's score. `score` is None when the text is too short to score; `verdict` is "machine" or
    "human" once a calibrated threshold is applied, "uncalibrated" before, "too short" when fewer than
    the minimum tokens (or, for burstiness, sentences) could be scored; `message` says why."""

    method: str
    score: float | None
    tokens_scored: int
    verdict: str
    threshold: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Method:
    name: str
    direction: str  # "higher" or "lower": which side of the threshold means machine
    models: tuple[str, ...]  # the models the scoring function takes, in order
    summary: str
    score: Callable[..., list[ZeroShotScore]]  # (texts, *models, tokenizer, contexts=None, **options)


# ---- inputs and windows ---------------------------------------------------------------------------


@dataclass
class _Encoded:
    ids: list[int]  # the text's tokens
    history: list[int]  # what conditions them without being scored: <|endoftext|> and the context

    @property
    def first_scored(self) -> int:
        """Index in `ids` of the first scored token (the first has nothing before it without history)."""
        return 0 if self.history else 1


def _encode(texts: Sequence[str], contexts: Sequence[Context] | None, tokenizer: Any) -> list[_Encoded]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ConfigError("texts: expected a list of strings")
    if contexts is not None and len(contexts) != len(texts):
        raise ConfigError(f"contexts: got {len(contexts)} for {len(texts)} texts; expected one (or None) per text")
    bos = [tokenizer.eot_id] if getattr(tokenizer, "eot_id", None) is not None else []
    out = []
    for i, text in enumerate(texts):
        context = contexts[i] if contexts is not None else None
        if context is None or isinstance(context, str):
            history = bos + (tokenizer.encode(normalize_text(context)) if context else [])
        else:
            history = [int(t) for t in context]
        out.append(_Encoded(tokenizer.encode(normalize_text(text)), history))
    return out


def windows(n_tokens: int, first: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, first_target, stop) per window over a sequence of `n_tokens`: the model reads tokens
    start..stop-2 (at most `context_length`) and scores targets first_target..stop-1, predicted at input
    positions target-1-start. Targets from `first` on are each scored once, with at least
    context_length - stride + 1 tokens before them, or all of them."""
    if not 1 <= stride <= context_length:
        raise ConfigError(f"stride: got {stride}; expected 1 to the context length ({context_length})")
    first = max(first, 1)
    out: list[tuple[int, int, int]] = []
    j0 = first
    while j0 < n_tokens:
        j1 = min(n_tokens, j0 + stride if out else max(j0 + stride, context_length + 1))
        out.append((max(0, j1 - 1 - context_length), j0, j1))
        j0 = j1
    return out


# ---- the forward passes ---------------------------------------------------------------------------

Stats = Callable[[list[torch.Tensor], torch.Tensor], dict[str, torch.Tensor]]


@contextmanager
def _evaluating(models: Sequence[torch.nn.Module]):
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _check_models(models: Sequence[torch.nn.Module], tokenizer: Any) -> int:
    """The context length the windows use; ConfigError when the vocabularies do not fit."""
    vocab = {m.config.vocab_size for m in models}
    if len(vocab) > 1:
        raise ConfigError(f"the models have different vocabularies ({sorted(vocab)} ids); "
                          "they must share one tokenizer")
    if tokenizer.vocab_size > min(vocab):
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {min(vocab)}; "
                          "use the checkpoint's own tokenizer")
    return min(m.config.context_length for m in models)


def token_stats(encoded: list[_Encoded], models: Sequence[torch.nn.Module], stats: Stats, context_length: int,
                stride: int, max_batch_logits: int = MAX_BATCH_LOGITS) -> list[dict[str, torch.Tensor]]:
    """Per text, `stats`' per-position values (1-D float64, CPU) over its scored tokens, in order."""
    rows = []  # (text, window tokens, targets, first and stop position of the scored logits)
    for i, enc in enumerate(encoded):
        tokens = enc.history + enc.ids
        first = len(enc.history) + enc.first_scored
        for start, j0, j1 in windows(len(tokens), first, context_length, stride):
            rows.append((i, tokens[start:j1 - 1], tokens[start + 1:j1], j0 - 1 - start, j1 - 1 - start))
    parts: dict[int, list[tuple[int, dict[str, torch.Tensor]]]] = {i: [] for i in range(len(encoded))}
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][1]))
    vocab = models[0].config.vocab_size
    device = next(models[0].parameters()).device
    with _evaluating(models), torch.inference_mode():
        at = 0
        while at < len(order):
            width = len(rows[order[at]][1])
            batch = order[at:at + max(1, max_batch_logits // max(1, width * vocab))]
            at += len(batch)
            idx = torch.zeros(len(batch), width, dtype=torch.long)
            targets = torch.zeros(len(batch), width, dtype=torch.long)
            for b, r in enumerate(batch):
                idx[b, :len(rows[r][1])] = torch.tensor(rows[r][1])
                targets[b, :len(rows[r][2])] = torch.tensor(rows[r][2])
            logits = [_logits(m, idx.to(device)) for m in models]
            values = {k: v.double().cpu() for k, v in stats(logits, targets.to(device)).items()}
            for b, r in enumerate(batch):
                text, lo, hi = rows[r][0], rows[r][3], rows[r][4]
                parts[text].append((r, {k: v[b, lo:hi] for k, v in values.items()}))
    return [_concat([p for _, p in sorted(parts[i], key=lambda x: x[0])]) for i in range(len(encoded))]


def _concat(pieces: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if not pieces:  # nothing scored: every statistic is empty
        return defaultdict(lambda: torch.zeros(0, dtype=torch.float64))
    return {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}


def _logits(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx)
    if not isinstance(logits, torch.Tensor) or logits.shape != (*idx.shape, model.config.vocab_size):
        raise ConfigError(f"{type(model).__name__} does not give next-token logits; expected a language model "
                          "(a GPT checkpoint, not a reward or value model)")
    return logits


def nll_stats(logits: list[torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """-log p(target) under the first model."""
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    return {"nll": -logp.gather(-1, targets[..., None]).squeeze(-1)}


def analytic_stats(logits: list[torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """-log p(target), and the mean and variance of log p(v) for v drawn from p (the sampling model is
    the scoring model); the variance as E[(log p - mean)^2], free of E[x^2] - E[x]^2's cancellation."""
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    p = logp.exp()
    mean = (p * logp).sum(-1)
    var = (p * (logp - mean[..., None]).square()).sum(-1)
    return {"nll": -logp.gather(-1, targets[..., None]).squeeze(-1), "mean": mean, "var": var}


def binoculars_stats(logits: list[torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """logits = [performer, observer]: the performer's -log q(target) and the cross-entropy
    -sum_v p(v) log q(v) of the observer's p against the performer's q."""
    logq = torch.log_softmax(logits[0].float(), dim=-1)
    p = torch.softmax(logits[1].float(), dim=-1)
    return {"nll": -logq.gather(-1, targets[..., None]).squeeze(-1), "xent": -(p * logq).sum(-1)}


# ---- the methods ----------------------------------------------------------------------------------


def _params(context_length: int, stride: int | None) -> dict[str, Any]:
    return {"context_length": context_length, "stride": stride or max(1, context_length // 2)}


def _too_short(method: str, n: int, min_tokens: int, details: dict[str, Any], why: str = "") -> ZeroShotScore:
    why = why or f"{n} tokens could be scored; a score needs at least {min_tokens}"
    return ZeroShotScore(method, None, n, "too short", details=details, message=why)


def _score_all(method: str, texts: Sequence[str], models: Sequence[torch.nn.Module], tokenizer: Any,
               contexts: Sequence[Context] | None, stats: Stats, stride: int | None,
               max_batch_logits: int) -> tuple[list[_Encoded], list[dict[str, torch.Tensor]], dict[str, Any]]:
    context_length = _check_models(models, tokenizer)
    params = _params(context_length, stride)
    if method == "perplexity_burstiness":
        params["burstiness"] = BURSTINESS
    encoded = _encode(texts, contexts, tokenizer)
    values = token_stats(encoded, models, stats, context_length, params["stride"], max_batch_logits)
    return encoded, values, params


def fast_detectgpt(texts: Sequence[str], model: torch.nn.Module, tokenizer: Any,
                   contexts: Sequence[Context] | None = None, *, min_tokens: int = MIN_TOKENS,
                   stride: int | None = None, max_batch_logits: int = MAX_BATCH_LOGITS) -> list[ZeroShotScore]:
    """Fast-DetectGPT's analytic criterion, `model` sampling and scoring; higher means machine.
    details: the per-token means of ll, mu and var, and the scoring parameters."""
    _, values, params = _score_all("fast_detectgpt", texts, [model], tokenizer, contexts, analytic_stats,
                                   stride, max_batch_logits)
    out = []
    for v in values:
        n = len(v["nll"])
        details: dict[str, Any] = {"params": params}
        if n < min_tokens:
            out.append(_too_short("fast_detectgpt", n, min_tokens, details))
            continue
        ll, mu, var = -float(v["nll"].sum()), float(v["mean"].sum()), float(v["var"].sum())
        details.update(mean_log_likelihood=ll / n, mean_expected_log_likelihood=mu / n, mean_variance=var / n)
        out.append(ZeroShotScore("fast_detectgpt", (ll - mu) / math.sqrt(max(var, 1e-12)), n, "uncalibrated",
                                 details=details))
    return out


def binoculars(texts: Sequence[str], observer: torch.nn.Module, performer: torch.nn.Module, tokenizer: Any,
               contexts: Sequence[Context] | None = None, *, min_tokens: int = MIN_TOKENS,
               stride: int | None = None, max_batch_logits: int = MAX_BATCH_LOGITS) -> list[ZeroShotScore]:
    """Binoculars: the performer's log-perplexity over the observer-performer cross-perplexity; lower
    means machine. observer: the base model; performer: the chat model (one tokenizer for both)."""
    _, values, params = _score_all("binoculars", texts, [performer, observer], tokenizer, contexts,
                                   binoculars_stats, stride, max_batch_logits)
    out = []
    for v in values:
        n = len(v["nll"])
        details: dict[str, Any] = {"params": params}
        if n < min_tokens:
            out.append(_too_short("binoculars", n, min_tokens, details))
            continue
        ppl, x_ppl = float(v["nll"].mean()), float(v["xent"].mean())
        details.update(log_perplexity=ppl, cross_perplexity=x_ppl)
        out.append(ZeroShotScore("binoculars", ppl / x_ppl, n, "uncalibrated", details=details))
    return out


def perplexity_burstiness(texts: Sequence[str], model: torch.nn.Module, tokenizer: Any,
                          contexts: Sequence[Context] | None = None, *, min_tokens: int = MIN_TOKENS,
                          stride: int | None = None,
                          max_batch_logits: int = MAX_BATCH_LOGITS) -> list[ZeroShotScore]:
    """GPTZero-style: log-perplexity + burstiness (see the module's docstring), lower means machine.
    details: log_perplexity, perplexity, burstiness, the sentences' mean log-perplexities."""
    encoded, values, params = _score_all("perplexity_burstiness", texts, [model], tokenizer, contexts,
                                         nll_stats, stride, max_batch_logits)
    out = []
    for enc, v in zip(encoded, values):
        nll, details = v["nll"], {"params": params}
        n = len(nll)
        if n < min_tokens:
            out.append(_too_short("perplexity_burstiness", n, min_tokens, details))
            continue
        sentence = torch.tensor(sentence_of_tokens(enc.ids, tokenizer)[enc.first_scored:])
        means = [float(nll[sentence == s].mean()) for s in sorted(set(sentence.tolist()))]
        log_ppl = float(nll.mean())
        details.update(log_perplexity=log_ppl, perplexity=math.exp(log_ppl), sentence_log_perplexities=means)
        if len(means) < 2:
            out.append(_too_short("perplexity_burstiness", n, min_tokens, details,
                                  "burstiness needs at least 2 sentences with scored tokens; the text has 1"))
            continue
        burst = float(torch.tensor(means, dtype=torch.float64).std(correction=0))
        details["burstiness"] = burst
        out.append(ZeroShotScore("perplexity_burstiness", log_ppl + burst, n, "uncalibrated", details=details))
    return out


def sentence_of_tokens(ids: list[int], tokenizer: Any) -> list[int]:
    """The sentence (0, 1, ...) each token belongs to: the one its last character falls in, found by
    bisecting the lengths of decoded prefixes (any tokenizer with `decode`)."""
    text = tokenizer.decode(ids)
    ends = [m.end() for m in _SENTENCE_END.finditer(text) if m.end() < len(text)]
    lengths: dict[int, int] = {}

    def length(i: int) -> int:
        if i not in lengths:
            lengths[i] = len(tokenizer.decode(ids[:i]))
        return lengths[i]

    counts = []  # tokens that end within sentences 0..k
    for end in ends:
        lo, hi = counts[-1] if counts else 0, len(ids)
        while lo < hi:  # the largest i with length(i) <= end
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if length(mid) <= end else (lo, mid - 1)
        counts.append(lo)
    sentence, at = [], 0
    for k, count in enumerate(counts + [len(ids)]):
        sentence += [k] * (count - at)
        at = max(at, count)
    return sentence


# ---- identity of what was scored --------------------------------------------------------------------


def fingerprint(tokenizer: Any, *models: torch.nn.Module) -> dict[str, Any]:
    """What a calibrated threshold is tied to: the tokenizer's hash and, per model in the method's order
    (binoculars: observer, then performer), its config and a digest of its weights (every tensor's
    name, shape and up to 4096 evenly spaced values: cheap, and different for differently trained
    checkpoints)."""
    return {"tokenizer": tokenizer.hash, "models": [
        {"config": m.config.to_dict(), "weights": weights_digest(m)} for m in models]}


def weights_digest(model: torch.nn.Module, samples: int = 4096) -> str:
    h = hashlib.sha256()
    with torch.inference_mode():
        for name, t in sorted(model.state_dict().items()):
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // samples)
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(flat[::step][:samples].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


METHODS: dict[str, Method] = {
    "perplexity_burstiness": Method("perplexity_burstiness", "lower", ("model",),
                                    "log-perplexity + burstiness (GPTZero-style)", perplexity_burstiness),
    "fast_detectgpt": Method("fast_detectgpt", "higher", ("model",),
                             "Fast-DetectGPT's analytic criterion, one model sampling and scoring", fast_detectgpt),
    "binoculars": Method("binoculars", "lower", ("observer", "performer"),
                         "Binoculars: base model observing, chat model performing", binoculars),
}
