"""Logits processors as a specification: each equals transformers' processor on the same logits,
per-row parameters in a mixed batch equal each row processed alone, and seeds reproduce tokens."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chatforge.generate.params import SamplingParams
from chatforge.generate.processors import (
    LogitBias,
    LogitsPipeline,
    MinP,
    MinTokens,
    NoRepeatNGram,
    PresenceFrequencyPenalty,
    RepetitionPenalty,
    Temperature,
    TokenHistory,
    TopK,
    TopP,
    inverse_cdf,
    sample_next,
    token_logprobs,
)

tlp = pytest.importorskip("transformers.generation.logits_process")

V = 40
INF = float("inf")


def logits_for(seed: int, rows: int = 4, vocab: int = V, ties: bool = False) -> torch.Tensor:
    """Random logits; with ties, values on a coarse grid so many tokens share a logit."""
    x = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    return (x * 2).round() / 2 if ties else x


def no_ids(rows: int) -> torch.LongTensor:
    return torch.zeros(rows, 1, dtype=torch.long)  # the warpers ignore input_ids


def per_row(value, rows: int = 4, dtype=torch.float32) -> torch.Tensor:
    return torch.full((rows,), value, dtype=dtype)


def history(seqs: list[list[int]], prompt_lens: list[int], vocab: int = V) -> TokenHistory:
    """A history whose rows hold seqs[r], of which the first prompt_lens[r] tokens are the prompt."""
    h = TokenHistory([s[:n] for s, n in zip(seqs, prompt_lens)], vocab)
    for r, (s, n) in enumerate(zip(seqs, prompt_lens)):
        h.tokens[r] += s[n:]
    return h


# --- warpers: equal to transformers, ties and edge cases included ---------------------------------

@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 3, 17, V, V + 5])
def test_top_k_equals_transformers(k, ties):
    x = logits_for(k, ties=ties)
    assert torch.equal(TopK(per_row(k, dtype=torch.long))(x), tlp.TopKLogitsWarper(k)(no_ids(4), x.clone()))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("p", [1e-9, 0.01, 0.3, 0.5, 0.9, 0.999])
def test_top_p_equals_transformers(p, ties):
    x = logits_for(int(p * 1000), ties=ties)
    ours = TopP(per_row(p, dtype=torch.float64))(x)
    assert torch.equal(ours, tlp.TopPLogitsWarper(p)(no_ids(4), x.clone()))


def test_top_p_threshold_is_formed_like_transformers():
    # 1 - top_p is computed in float64 then compared in float32; from a float32 top_p (0.99900001)
    # the threshold would be 0.00099999 and the 0.000999995 token would survive
    x = torch.tensor([[0.000999995, 0.5, 0.499000005]]).log()
    ours = TopP(torch.tensor([0.999], dtype=torch.float64))(x)
    assert torch.equal(ours, tlp.TopPLogitsWarper(0.999)(no_ids(1), x.clone())) and ours[0, 0] == -INF


def test_top_p_one_is_off():
    # transformers' generate() adds no TopP warper at 1.0 (the warper itself would still drop tokens
    # whose probability underflows to 0); ours keeps every token
    x = logits_for(0)
    x[:, 0] = -200.0
    assert torch.equal(TopP(per_row(1.0, dtype=torch.float64))(x), x)
    assert TopP.build([1.0, 1.0], "cpu") is None


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("m", [0.0, 0.05, 0.2, 0.5, 1.0])
def test_min_p_equals_transformers(m, ties):
    x = logits_for(int(m * 100), ties=ties)
    assert torch.equal(MinP(per_row(m))(x), tlp.MinPLogitsWarper(m)(no_ids(4), x.clone()))


@pytest.mark.parametrize("t", [0.3, 0.7, 1.0, 2.5])
def test_temperature_equals_transformers(t):
    x = logits_for(1)
    assert torch.equal(Temperature(per_row(t))(x), tlp.TemperatureLogitsWarper(t)(no_ids(4), x.clone()))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), ties=st.booleans(), t=st.floats(0.05, 3.0),
       k=st.integers(0, V + 2), p=st.floats(0.01, 1.0), m=st.floats(0.0, 1.0))
def test_warper_chain_equals_transformers(seed, ties, t, k, p, m):
    x = logits_for(seed, rows=2, ties=ties)
    ours = LogitsPipeline.from_params([SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m)] * 2,
                                      [[], []])(x, TokenHistory([[1], [2]], V))
    chain = [tlp.TemperatureLogitsWarper(t)]
    chain += [tlp.TopKLogitsWarper(k)] if k else []
    chain += [tlp.TopPLogitsWarper(p)] if p < 1 else []
    chain += [tlp.MinPLogitsWarper(m)]
    assert torch.equal(ours, tlp.LogitsProcessorList(chain)(no_ids(2), x.clone()))


def test_top_k_per_row_with_off_rows():
    x = logits_for(5, ties=True)
    out = TopK(torch.tensor([1, 0, 5, V + 3]))(x)
    for r, k in enumerate([1, 0, 5, V + 3]):
        expected = tlp.TopKLogitsWarper(k)(no_ids(1), x[r:r + 1].clone()) if k else x[r:r + 1]
        assert torch.equal(out[r:r + 1], expected)


# --- penalties and bans ---------------------------------------------------------------------------

SEQS = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [7], [2, 2, 2, 0, 1, 2, 2], [0, 1, 0, 1, 0, 1, 0, 1, 0]]
PROMPT_LENS = [4, 1, 2, 5]


@pytest.mark.parametrize("penalty", [0.5, 0.9, 1.0, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(penalty):
    x, h = logits_for(2), history(SEQS, PROMPT_LENS)
    out = RepetitionPenalty(per_row(penalty))(x, h)
    for r, seq in enumerate(SEQS):  # transformers penalizes every token of input_ids (prompt + output)
        expected = tlp.RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([seq]), x[r:r + 1].clone())
        assert torch.equal(out[r:r + 1], expected)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_equals_transformers(n):
    x, h = logits_for(3), history(SEQS, PROMPT_LENS)
    out = NoRepeatNGram([n] * 4)(x, h)
    for r, seq in enumerate(SEQS):
        expected = tlp.NoRepeatNGramLogitsProcessor(n)(torch.tensor([seq]), x[r:r + 1].clone())
        assert torch.equal(out[r:r + 1], expected)
    assert torch.equal(NoRepeatNGram([0, n, 0, 0])(x, h)[[0, 2, 3]], x[[0, 2, 3]])


def test_presence_frequency_is_the_openai_formula():
    x, h = logits_for(4), history(SEQS, PROMPT_LENS)
    presence, frequency = [0.5, -1.0, 2.0, 0.0], [0.25, 1.5, -0.5, 2.0]
    out = PresenceFrequencyPenalty(torch.tensor(presence), torch.tensor(frequency))(x, h)
    for r in range(4):
        counts = Counter(SEQS[r][PROMPT_LENS[r]:])  # generated tokens only: the prompt is not penalized
        for j in range(V):
            c = counts[j]
            expected = x[r, j].item() - c * frequency[r] - (c > 0) * presence[r]
            assert out[r, j].item() == pytest.approx(expected, abs=1e-5)


def test_logit_bias_adds_per_row():
    x = logits_for(6, rows=3)
    bias = LogitBias.build([{3: 5.0, 7: -100.0}, {}, {0: 100.0}], "cpu")
    out = bias(x)
    expected = x.clone()
    expected[0, 3] += 5.0
    expected[0, 7] -= 100.0
    expected[2, 0] += 100.0
    assert torch.equal(out, expected)
    assert out[2].argmax() == 0 and out[0].softmax(-1)[7] < 1e-30
    assert LogitBias.build([{}, {}], "cpu") is None


def test_logit_bias_equals_transformers_sequence_bias():
    x = logits_for(7, rows=1)
    ours = LogitBias.build([{3: 5.0, 7: -100.0, 11: 0.5}], "cpu")(x)
    theirs = tlp.SequenceBiasLogitsProcessor([[[3], 5.0], [[7], -100.0], [[11], 0.5]])(no_ids(1), x.clone())
    assert torch.equal(ours, theirs)


def test_min_tokens_bans_stop_ids_until_reached():
    params = [SamplingParams(min_tokens=3, stop_token_ids=[9]), SamplingParams(), SamplingParams(min_tokens=1)]
    pipe = LogitsPipeline.from_params(params, [[2], [2], [2, 5]])
    h = TokenHistory([[1, 1], [1], [4]], V)
    x = logits_for(8, rows=3)
    for step in range(5):
        out = pipe(x, h)
        assert torch.isinf(out[0, [2, 9]]).all() == (step < 3)  # 2 from the engine, 9 from stop_token_ids
        assert torch.equal(out[1], x[1])
        assert torch.isinf(out[2, [2, 5]]).all() == (step < 1)
        h.append(torch.tensor([4, 4, 4]))


def test_min_tokens_equals_transformers():
    x, h = logits_for(9, rows=1), TokenHistory([[5, 6, 7]], V)
    theirs = tlp.MinNewTokensLengthLogitsProcessor(3, 2, [2, 9])
    for _ in range(3):
        ids = torch.tensor([h.tokens[0]])
        assert torch.equal(MinTokens([2], [[2, 9]])(x, h), theirs(ids, x.clone()))
        h.append([1])


# --- the pipeline: per-row parameters, order, greedy rows -----------------------------------------

MIXED = [
    SamplingParams(temperature=1.5, top_k=9, top_p=0.95, repetition_penalty=1.3, logit_bias={3: 6.0}),
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.3, min_p=0.1, presence_penalty=0.5, frequency_penalty=0.8),
    SamplingParams(temperature=0, repetition_penalty=1.5, logit_bias={0: 3.0, 8: -2.0}, no_repeat_ngram_size=2,
                   top_k=1, top_p=0.1),
    SamplingParams(top_p=0.5, no_repeat_ngram_size=3, min_tokens=20, seed=3),
]
MIXED_SEQS = SEQS + [[1, 2, 3, 1, 2]]
MIXED_PROMPTS = PROMPT_LENS + [3]


def test_pipeline_equals_transformers_chain_per_row():
    """Bias, CTRL penalty, n-gram ban, min new tokens, then temperature, top-k, top-p, min-p."""
    x, h = logits_for(10, rows=5), history(MIXED_SEQS, MIXED_PROMPTS)
    stops = [[0]] * 5
    out = LogitsPipeline.from_params(MIXED, stops)(x, h)
    for r, p in enumerate(MIXED):
        if p.presence_penalty or p.frequency_penalty:
            continue  # not a transformers processor; checked by hand above
        chain = [tlp.SequenceBiasLogitsProcessor([[[i], b] for i, b in p.logit_bias.items()])] if p.logit_bias else []
        chain += [tlp.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)] if p.repetition_penalty != 1 else []
        chain += [tlp.NoRepeatNGramLogitsProcessor(p.no_repeat_ngram_size)] if p.no_repeat_ngram_size else []
        chain += [tlp.MinNewTokensLengthLogitsProcessor(MIXED_PROMPTS[r], p.min_tokens, stops[r])]
        if p.temperature:  # do_sample=True: the warpers follow
            chain += [tlp.TemperatureLogitsWarper(p.temperature)] if p.temperature != 1 else []
            chain += [tlp.TopKLogitsWarper(p.top_k)] if p.top_k else []
            chain += [tlp.TopPLogitsWarper(p.top_p)] if p.top_p < 1 else []
            chain += [tlp.MinPLogitsWarper(p.min_p)] if p.min_p else []
        expected = tlp.LogitsProcessorList(chain)(torch.tensor([MIXED_SEQS[r]]), x[r:r + 1].clone())
        assert torch.equal(out[r:r + 1], expected), f"row {r}"


def test_mixed_batch_equals_each_row_alone():
    x, h = logits_for(11, rows=5), history(MIXED_SEQS, MIXED_PROMPTS)
    stops = [[0], [1], [], [0, 2], [7]]
    pipe = LogitsPipeline.from_params(MIXED, stops)
    out = pipe(x, h)
    for r in range(5):
        alone = LogitsPipeline.from_params([MIXED[r]], [stops[r]])(x[r:r + 1], h.select([r]))
        assert torch.equal(out[r:r + 1], alone)
        assert torch.equal(pipe.select([r])(x[r:r + 1], h.select([r])), alone)


def test_greedy_rows_untouched_by_warpers():
    x = logits_for(12, rows=2)
    greedy = SamplingParams(temperature=0, top_k=1, top_p=0.1, min_p=0.9)
    pipe = LogitsPipeline.from_params([greedy, SamplingParams(top_k=2)], [[], []])
    out = pipe(x, TokenHistory([[1], [1]], V))
    assert torch.equal(out[0], x[0]) and torch.isinf(out[1]).sum() == V - 2
    assert pipe.greedy.tolist() == [True, False]
    beam = SamplingParams(num_beams=4, top_k=1, temperature=0.5)  # sampling parameters do not apply
    assert LogitsPipeline.from_params([beam], [[]]).processors == []


def test_plain_greedy_batch_builds_nothing():
    pipe = LogitsPipeline.from_params([SamplingParams(temperature=0, seed=1)] * 3, [[0]] * 3)
    x = logits_for(13, rows=3)
    assert pipe.processors == [] and pipe(x, TokenHistory([[1]] * 3, V)) is x


def test_pipeline_never_modifies_its_input():
    x, h = logits_for(14, rows=5), history(MIXED_SEQS, MIXED_PROMPTS)
    before = x.clone()
    LogitsPipeline.from_params(MIXED, [[0]] * 5)(x, h)
    assert torch.equal(x, before)


def test_pipeline_select_and_add_rows():
    stops = [[0], [1], [], [0, 2], [7]]
    pipe = LogitsPipeline.from_params(MIXED, stops)
    x, h = logits_for(15, rows=5), history(MIXED_SEQS, MIXED_PROMPTS)
    picked = pipe.select(torch.tensor([4, 4, 0]))
    assert picked.generators[0] is picked.generators[1] is pipe.generators[4]
    fresh = LogitsPipeline.from_params([MIXED[4], MIXED[4], MIXED[0]], [stops[4], stops[4], stops[0]])
    assert torch.equal(picked(x[[4, 4, 0]], h.select([4, 4, 0])), fresh(x[[4, 4, 0]], h.select([4, 4, 0])))
    grown = pipe.select([1]).add_rows(pipe.select([2, 3]))
    assert len(grown) == 3 and grown.greedy.tolist() == [True, False, True]
    assert torch.equal(grown(x[1:4], h.select([1, 2, 3])), pipe(x, h)[1:4])


# --- sampling and logprobs ------------------------------------------------------------------------

def step_logits(request: int, step: int) -> torch.Tensor:
    """The logits a request sees at a step, the same whatever else is in the batch."""
    return logits_for(1000 * request + step, rows=1)[0]


def decode(requests: dict[int, SamplingParams], order: list[int], steps: int = 12) -> dict[int, list[int]]:
    """Run `steps` decode steps for the requests batched in `order`; each request's tokens."""
    params = [requests[q] for q in order]
    pipe = LogitsPipeline.from_params(params, [[] for _ in order])
    h = TokenHistory([[1, 2]] * len(order), V)
    for step in range(steps):
        x = torch.stack([step_logits(q, step) for q in order])
        h.append(sample_next(pipe(x, h), pipe.greedy, pipe.generators))
    return {q: h.generated(i) for i, q in enumerate(order)}


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    seeded = SamplingParams(temperature=1.2, top_p=0.95, presence_penalty=0.3, seed=1234)
    others = {1: SamplingParams(temperature=1.0), 2: SamplingParams(temperature=0),
              3: SamplingParams(temperature=0.8, seed=99), 4: SamplingParams(temperature=2.0, top_k=7)}
    alone = decode({0: seeded}, [0])[0]
    assert decode({0: seeded}, [0])[0] == alone
    assert decode({0: seeded, **others}, [1, 2, 0, 3, 4])[0] == alone
    assert decode({0: seeded, **others}, [3, 0, 4])[0] == alone
    reseeded = SamplingParams(temperature=1.2, top_p=0.95, presence_penalty=0.3, seed=4321)
    assert decode({0: reseeded}, [0])[0] != alone


def test_copies_of_a_seeded_request_share_its_generator():
    """n > 1: select([0, 0, 0]) copies a row; the copies draw one after another from its generator,
    so they differ from each other and reproduce with the seed."""
    def three_draws(seed: int) -> list[list[int]]:
        pipe = LogitsPipeline.from_params([SamplingParams(temperature=3.0, seed=seed)], [[]]).select([0, 0, 0])
        return [sample_next(logits_for(step, rows=3), pipe.greedy, pipe.generators).tolist() for step in range(4)]

    assert three_draws(5) == three_draws(5) != three_draws(6)
    assert any(len(set(draw)) > 1 for draw in three_draws(5))


def test_sample_next_greedy_rows_take_argmax_and_sampling_respects_masks():
    x = logits_for(16, rows=3)
    filtered = TopK(torch.tensor([0, 3, 1]))(x)
    greedy = torch.tensor([True, False, False])
    gens = [None, torch.Generator().manual_seed(0), None]
    for _ in range(20):
        tokens = sample_next(filtered, greedy, gens)
        assert tokens[0] == x[0].argmax() and tokens[2] == x[2].argmax()
        assert tokens[1] in x[1].topk(3).indices


def test_sample_next_follows_the_distribution():
    probs = torch.tensor([[0.1, 0.6, 0.3, 0.0]])
    n, gen = 4000, torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for generators in ([gen] * n, [None] * n):  # seeded rows one by one; unseeded rows in one call
            draws = sample_next(probs.log().expand(n, 4), torch.zeros(n, dtype=torch.bool), generators)
            freq = torch.bincount(draws, minlength=4) / n
            assert torch.allclose(freq, probs[0], atol=0.03) and freq[3] == 0


def test_inverse_cdf_never_draws_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.125, 0.0, 0.375, 0.0, 0.0]] * 4)  # need not sum to 1
    u = torch.tensor([[0.0], [0.2499], [0.25], [1 - 2**-53]], dtype=torch.float64)
    assert inverse_cdf(probs, u).tolist() == [1, 1, 3, 3]


def test_token_logprobs_are_log_softmax_of_the_raw_logits():
    x = logits_for(17, rows=3)
    chosen = torch.tensor([0, 5, 39])
    lp, top_ids, top_lp = token_logprobs(x, chosen, 5)
    ref = torch.log_softmax(x, -1)
    assert torch.equal(lp, ref[torch.arange(3), chosen])
    assert torch.equal(top_lp, ref.gather(1, top_ids)) and torch.equal(top_lp, ref.topk(5).values)
    assert token_logprobs(x, chosen, 0)[1].shape == (3, 0)
    assert token_logprobs(x, chosen, V + 10)[1].shape == (3, V)


# --- the history ----------------------------------------------------------------------------------

def recount(h: TokenHistory) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.zeros(len(h), h.vocab_size, dtype=torch.int32)
    seen = torch.zeros(len(h), h.vocab_size, dtype=torch.bool)
    for r in range(len(h)):
        for t in h.generated(r):
            counts[r, t] += 1
        seen[r, h.tokens[r]] = True
    return counts, seen


def test_token_history_select_and_add_rows_keep_counts_consistent():
    eager = TokenHistory([[1, 2, 2], [3], [4, 5]], V)
    lazy = TokenHistory([[1, 2, 2], [3], [4, 5]], V)
    assert eager.generated_counts.sum() == 0 and eager.seen.sum() == 5  # built now, updated from here
    for h in (eager, lazy):
        h.append(torch.tensor([2, 3, 7]))
        h.append([2, 8, 9])
    eager, lazy = eager.select([2, 0, 0]), lazy.select(torch.tensor([2, 0, 0]))
    for h in (eager, lazy):
        h.append(torch.tensor([7, 1, 6]))
        h = h.add_rows(TokenHistory([[5, 5]], V))
        h.append([5, 5, 5, 5])
    assert eager.tokens == lazy.tokens == [[4, 5, 7, 9, 7, 5], [1, 2, 2, 2, 2, 1, 5], [1, 2, 2, 2, 2, 6, 5], [5, 5, 5]]
    assert eager.num_generated.tolist() == [4, 4, 4, 1]
    counts, seen = recount(eager)
    assert torch.equal(eager._counts, counts) and torch.equal(eager._seen, seen)
    assert torch.equal(lazy.generated_counts, counts) and torch.equal(lazy.seen, seen)


def test_token_history_rejects_mismatches():
    h = TokenHistory([[1], [2]], V)
    with pytest.raises(ValueError, match="2 rows"):
        h.append([1])
    with pytest.raises(ValueError, match="vocab"):
        h.add_rows(TokenHistory([[1]], V + 1))
