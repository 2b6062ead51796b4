"""Beam search over the KV cache, step for step what transformers 5.x `generate(num_beams=…)` does.

The semantics matched (transformers 5.23, `GenerationMixin._beam_search` and its helpers):

- Scores are log_softmax of the float32 logits; the logits processors then act on those log-probs
  without renormalising (no-repeat n-gram bans and min_tokens set tokens to -inf).
- Each step keeps the top K = max(2, 1 + number of end tokens) · num_beams continuations of all
  beams by accumulated log-prob, so num_beams of them are never an end token. The first step has
  one real beam (the others start at -1e9), so the beams begin as distinct tokens.
- A continuation that ends (an end token, or the max_tokens-th token) counts as a finished
  hypothesis only if it ranks among the top num_beams of the K; the rest are dropped. Its score is
  sum_logprobs / generated_length ** length_penalty, where the length counts the *generated*
  tokens including the end token (not the prompt: transformers 4.x counted the prompt too).
- The num_beams best finished hypotheses are kept. The search stops after the max_tokens-th
  token; with early_stopping=True as soon as num_beams hypotheses are finished; with
  early_stopping=False once num_beams are finished and the best running beam's log-prob divided
  by (tokens generated so far) ** length_penalty is no better than the worst finished score.
- no_repeat_ngram_size bans, at each step, every token that would repeat an n-gram of the prompt
  plus the tokens generated so far.

The prompt is prefilled once (batch 1); its cache is copied into num_beams rows, and each step
the filled part of the cache is reordered by the beams the new running beams came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from chatforge.errors import RequestError
from chatforge.generate.params import SamplingParams
from chatforge.model import GPT, KVCache

NEG = -1.0e9  # transformers' "impossible" score: added, not assigned, so float32 sums match its own


@dataclass
class BeamHypothesis:
    tokens: list[int]  # generated tokens, without the end token
    score: float  # sum_logprobs / generated_length ** length_penalty (length counts the end token)
    sum_logprobs: float
    finish_reason: Literal["stop", "length"]


@dataclass
class _Candidates:
    """The top K continuations of one step."""

    tokens: torch.Tensor  # (K, max_tokens) generated tokens, step t filled in
    sums: torch.Tensor  # (K,) accumulated log-probs
    beams: torch.Tensor  # (K,) the running beam each continues
    ended: torch.Tensor  # (K,) an end token or the last allowed token


@dataclass
class _Finished:
    """The num_beams best finished hypotheses so far (placeholders score NEG and are not finished)."""

    tokens: torch.Tensor  # (num_beams, max_tokens)
    scores: torch.Tensor  # (num_beams,) length-penalised
    sums: torch.Tensor  # (num_beams,)
    lengths: torch.Tensor  # (num_beams,) generated tokens, end token included
    finished: torch.Tensor  # (num_beams,) bool

    @classmethod
    def empty(cls, num_beams: int, max_tokens: int, device: torch.device) -> _Finished:
        return cls(
            tokens=torch.zeros((num_beams, max_tokens), dtype=torch.long, device=device),
            scores=torch.full((num_beams,), NEG, device=device),
            sums=torch.full((num_beams,), NEG, device=device),
            lengths=torch.zeros(num_beams, dtype=torch.long, device=device),
            finished=torch.zeros(num_beams, dtype=torch.bool, device=device),
        )


def _banned_ngram_tokens(seq: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already in `seq` (transformers' NoRepeatNGramLogitsProcessor)."""
    if n <= 0 or len(seq) < n:
        return []
    prefix = seq[len(seq) - n + 1:]
    return [seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i:i + n - 1] == prefix]


def _stop_ids(params: SamplingParams, eos_token_ids: list[int]) -> list[int]:
    """The model's end tokens plus the request's stop tokens (none with ignore_eos), each once."""
    ids = [] if params.ignore_eos else [*eos_token_ids, *params.stop_token_ids]
    return list(dict.fromkeys(ids))


def _log_probs(
    logits: torch.Tensor, prompt: list[int], running: torch.Tensor, step: int,
    params: SamplingParams, stop: torch.Tensor,
) -> torch.Tensor:
    """log_softmax of the logits, then the processors: n-gram bans and min_tokens (no renormalising)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    if params.no_repeat_ngram_size > 0:
        for row, generated in enumerate(running[:, :step].tolist()):
            banned = _banned_ngram_tokens(prompt + generated, params.no_repeat_ngram_size)
            log_probs[row, banned] = float("-inf")
    if step < params.min_tokens and stop.numel():
        log_probs[:, stop] = float("-inf")
    return log_probs


def _top_candidates(
    log_probs: torch.Tensor, running: torch.Tensor, running_sums: torch.Tensor, step: int, k: int,
    stop: torch.Tensor, last: bool,
) -> _Candidates:
    """The k best continuations over all beams by accumulated log-prob (`_get_top_k_continuations`)."""
    vocab = log_probs.shape[-1]
    sums, flat = torch.topk((log_probs + running_sums[:, None]).reshape(-1), k=min(k, log_probs.numel()))
    beams, token = flat // vocab, flat % vocab
    tokens = running[beams]
    tokens[:, step] = token
    ended = torch.isin(token, stop) | last
    return _Candidates(tokens, sums, beams, ended)


def _next_running(cands: _Candidates, num_beams: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The num_beams best continuations that did not end: tokens, accumulated log-probs, source beams."""
    sums = cands.sums + cands.ended.float() * NEG
    keep = torch.topk(sums, k=num_beams).indices
    return cands.tokens[keep], sums[keep], cands.beams[keep]


def _update_finished(done: _Finished, cands: _Candidates, step: int, num_beams: int,
                     length_penalty: float) -> _Finished:
    """Merge the ended continuations among the top num_beams into the best num_beams finished ones."""
    eligible = cands.ended & (torch.arange(cands.sums.numel(), device=cands.sums.device) < num_beams)
    scores = cands.sums / ((step + 1) ** length_penalty)
    scores = scores + (~eligible) * NEG
    merged_scores = torch.cat((done.scores, scores))
    keep = torch.topk(merged_scores, k=num_beams).indices
    lengths = torch.full_like(cands.beams, step + 1)
    return _Finished(
        tokens=torch.cat((done.tokens, cands.tokens))[keep],
        scores=merged_scores[keep],
        sums=torch.cat((done.sums, cands.sums))[keep],
        lengths=torch.cat((done.lengths, lengths))[keep],
        finished=torch.cat((done.finished, eligible))[keep],
    )


def _search_done(done: _Finished, running_sums: torch.Tensor, ended: torch.Tensor, generated: int,
                 params: SamplingParams) -> bool:
    """transformers' stopping rule (`_check_early_stop_heuristic`, `_beam_search_has_unfinished_sequences`)."""
    if bool(ended.all()) or (params.early_stopping and bool(done.finished.all())):
        return True
    # Can the best running beam still beat the worst finished one (an unfinished slot scores NEG)?
    best_possible = running_sums[0] / (generated ** params.length_penalty)
    worst = torch.where(done.finished, done.scores.min(), NEG)
    return not bool((best_possible > worst).any())


def _prefill(model: GPT, prompt: list[int], num_beams: int, max_len: int) -> tuple[torch.Tensor, KVCache]:
    """Run the prompt once (batch 1), then copy its keys/values into a num_beams-row cache."""
    device = next(model.parameters()).device
    small = model.make_kv_cache(1, len(prompt))
    logits = model(torch.tensor([prompt], device=device), kv_cache=small)[:, -1]
    cache = model.make_kv_cache(num_beams, max_len)
    cache.k[:, :, :, :len(prompt)] = small.k
    cache.v[:, :, :, :len(prompt)] = small.v
    return logits.expand(num_beams, -1), cache


def _reorder_cache(cache: KVCache, beams: torch.Tensor, filled: int) -> None:
    """Row i of the cache becomes row beams[i] (only the filled slots are copied)."""
    for kv in (cache.k, cache.v):
        kv[:, :, :, :filled] = kv[:, :, :, :filled].index_select(1, beams)


def _hypotheses(done: _Finished, stop: list[int]) -> list[BeamHypothesis]:
    """The finished hypotheses, best first, end token stripped."""
    out = []
    for tokens, score, total, length, finished in zip(
        done.tokens.tolist(), done.scores.tolist(), done.sums.tolist(), done.lengths.tolist(),
        done.finished.tolist(), strict=True,
    ):
        if not finished:
            continue
        tokens = tokens[:length]
        stopped = tokens[-1] in stop
        out.append(BeamHypothesis(tokens[:-1] if stopped else tokens, score, total, "stop" if stopped else "length"))
    return out


def _check(model: GPT, prompt_ids: list[int], params: SamplingParams) -> None:
    params.validate(model.config.vocab_size, model.config.context_length, len(prompt_ids))
    if params.n > params.num_beams:
        raise RequestError(f"n ({params.n}) must be <= num_beams ({params.num_beams})", param="n")


@torch.inference_mode()
def beam_search(model: GPT, prompt_ids: list[int], params: SamplingParams,
                eos_token_ids: list[int]) -> list[BeamHypothesis]:
    """Beam search as transformers' `generate(num_beams=…, do_sample=False)`; num_beams hypotheses, best first.

    End tokens are `eos_token_ids` plus `params.stop_token_ids` (none with `ignore_eos`);
    `max_tokens` is max_new_tokens and `min_tokens` min_new_tokens.
    """
    _check(model, prompt_ids, params)
    prompt, num_beams, max_tokens = list(prompt_ids), params.num_beams, params.max_tokens
    if max_tokens == 0:
        return [BeamHypothesis([], 0.0, 0.0, "length") for _ in range(num_beams)]
    model.eval()
    stop_ids = _stop_ids(params, eos_token_ids)
    logits, cache = _prefill(model, prompt, num_beams, len(prompt) + max_tokens)
    device = logits.device
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    k = max(2, 1 + len(stop_ids)) * num_beams
    running = torch.zeros((num_beams, max_tokens), dtype=torch.long, device=device)
    running_sums = torch.zeros(num_beams, device=device)
    running_sums[1:] = NEG  # all rows hold the same prompt: only the first may expand on step 0
    done = _Finished.empty(num_beams, max_tokens, device)
    for step in range(max_tokens):
        log_probs = _log_probs(logits, prompt, running, step, params, stop)
        cands = _top_candidates(log_probs, running, running_sums, step, k, stop, step + 1 == max_tokens)
        running, running_sums, beams = _next_running(cands, num_beams)
        done = _update_finished(done, cands, step, num_beams, params.length_penalty)
        if _search_done(done, running_sums, cands.ended, step + 1, params):
            break
        _reorder_cache(cache, beams, len(prompt) + step)
        logits = model(running[:, step:step + 1], kv_cache=cache, pos_offset=len(prompt) + step)[:, -1]
    return _hypotheses(done, stop_ids)


def beam_search_batch(model: GPT, prompts: list[list[int]], params: SamplingParams,
                      eos_token_ids: list[int]) -> list[list[BeamHypothesis]]:
    """`beam_search` for each prompt in turn (exactly transformers' per-prompt result, no padding effects)."""
    return [beam_search(model, prompt, params, eos_token_ids) for prompt in prompts]
