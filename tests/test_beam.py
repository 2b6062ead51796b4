"""Beam search gives transformers' tokens and scores on a random tiny GPT-2 loaded into chatforge."""

import itertools
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from chatforge.checkpoint import load_checkpoint  # noqa: E402
from chatforge.errors import RequestError  # noqa: E402
from chatforge.generate.beam import _banned_ngram_tokens, beam_search, beam_search_batch  # noqa: E402
from chatforge.generate.params import SamplingParams  # noqa: E402

VOCAB = 96
PROMPT_LENGTHS = (1, 3, 6, 11)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The transformers model, ours (the same weights), two end-token candidates and four prompts.

    initializer_range=0.3 makes the random model's next-token distributions peaked (max prob ~0.17)
    rather than near-uniform, so beams differ by clear margins. To make sure end tokens really get
    generated, eos is the token the model predicts most often (its most frequent argmax over random
    contexts; eos2, the second most often, serves as an extra stop token);
    `test_the_grid_exercises_both_finish_reasons` checks that hypotheses end both ways.
    Tiny models run single-threaded here: extra threads only add overhead (and contention).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                                     bos_token_id=0, eos_token_id=0, initializer_range=0.3)
    hf = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("tiny_gpt2")
    hf.save_pretrained(path)
    ours = load_checkpoint(path, tokenizer=False).model.eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        argmax = hf(torch.randint(0, VOCAB, (32, 12), generator=g)).logits.argmax(-1)
    eos, eos2 = argmax.flatten().bincount(minlength=VOCAB).topk(2).indices.tolist()
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    yield SimpleNamespace(hf=hf, ours=ours, eos=eos, eos2=eos2, prompts=prompts)
    torch.set_num_threads(threads)


def hf_beams(hf, prompt, params: SamplingParams, eos: list[int]) -> list[tuple[list[int], float]]:
    """transformers' returned sequences (prompt, end token and padding stripped) and sequence scores."""
    out = hf.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        num_beams=params.num_beams, do_sample=False, max_new_tokens=params.max_tokens,
        min_new_tokens=params.min_tokens or None, length_penalty=params.length_penalty,
        early_stopping=params.early_stopping, no_repeat_ngram_size=params.no_repeat_ngram_size,
        num_return_sequences=params.n, eos_token_id=eos, pad_token_id=eos[0],
        return_dict_in_generate=True, output_scores=True,
    )
    result = []
    for seq, score in zip(out.sequences[:, len(prompt):].tolist(), out.sequences_scores.tolist(), strict=True):
        cut = next((i for i, t in enumerate(seq) if t in eos), len(seq))
        result.append((seq[:cut], score))
    return result


def assert_same_as_hf(models, prompt, params: SamplingParams, extra_stop: tuple[int, ...] = ()) -> list:
    expected = hf_beams(models.hf, prompt, params, [models.eos, *extra_stop])
    got = beam_search(models.ours, prompt, params, [models.eos])
    assert len(got) == params.num_beams >= params.n
    for (tokens, score), hyp in zip(expected, got[:params.n], strict=True):
        assert hyp.tokens == tokens
        assert hyp.score == pytest.approx(score, abs=1e-4)
        length = len(hyp.tokens) + (hyp.finish_reason == "stop")
        assert hyp.sum_logprobs == pytest.approx(hyp.score * length ** params.length_penalty, rel=1e-5)
    return got


# Every (num_beams, length_penalty, early_stopping) combination twice (r = 0, 1), with the prompt,
# no_repeat_ngram_size, num_return_sequences and max_tokens rotating through their values.
GRID = [
    ((j + 2 * r) % 4, beams, penalty, early, (0, 2, 3)[(j + r) % 3], 1 + (j + r) % 2, (6, 12)[(j // 2 + r) % 2])
    for r in (0, 1)
    for j, (beams, penalty, early) in enumerate(itertools.product((2, 3, 4), (0.5, 1.0, 2.0), (True, False)))
]


@pytest.mark.parametrize("prompt_index,num_beams,length_penalty,early_stopping,ngram,n,max_tokens", GRID)
def test_beam_search_matches_transformers(models, prompt_index, num_beams, length_penalty, early_stopping,
                                          ngram, n, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, num_beams=num_beams, length_penalty=length_penalty,
                            early_stopping=early_stopping, no_repeat_ngram_size=ngram, n=n)
    assert_same_as_hf(models, models.prompts[prompt_index], params)


def test_the_grid_exercises_both_finish_reasons(models):
    """The eos choice in `models` makes end tokens common: hypotheses finish by stop and by length."""
    reasons = set()
    for prompt in models.prompts:
        for hyp in beam_search(models.ours, prompt, SamplingParams(max_tokens=8, num_beams=3), [models.eos]):
            reasons.add(hyp.finish_reason)
    assert reasons == {"stop", "length"}


def test_min_tokens_suppresses_end_tokens_like_min_new_tokens(models):
    free = SamplingParams(max_tokens=10, num_beams=3, n=3)
    hyps = [h for p in models.prompts for h in beam_search(models.ours, p, free, [models.eos])]
    assert min(len(h.tokens) for h in hyps if h.finish_reason == "stop") < 4  # it ends early without min_tokens
    for prompt in models.prompts[:2]:
        got = assert_same_as_hf(models, prompt, SamplingParams(max_tokens=10, min_tokens=4, num_beams=3, n=3))
        assert all(len(h.tokens) >= 4 for h in got)


def test_stop_token_ids_end_beams_like_extra_eos_tokens(models):
    """Two end tokens: transformers then keeps 3 * num_beams candidates per step; so do we."""
    changed = False
    for prompt in models.prompts[:2]:
        params = SamplingParams(max_tokens=8, num_beams=2, n=2, stop_token_ids=[models.eos2], early_stopping=True)
        got = assert_same_as_hf(models, prompt, params, extra_stop=(models.eos2,))
        params.stop_token_ids = []
        changed |= got != beam_search(models.ours, prompt, params, [models.eos])
    assert changed  # the extra stop token ended some beam


def test_batch_equals_one_prompt_at_a_time(models):
    ours, eos, prompts = models.ours, [models.eos], models.prompts
    params = SamplingParams(max_tokens=6, num_beams=2, no_repeat_ngram_size=2)
    assert beam_search_batch(ours, prompts, params, eos) == [beam_search(ours, p, params, eos) for p in prompts]


def test_more_sequences_than_beams_is_refused(models):
    with pytest.raises(RequestError, match="num_beams") as err:
        beam_search(models.ours, [1, 2], SamplingParams(num_beams=2, n=3), [models.eos])
    assert err.value.param == "n"


def test_ignore_eos_runs_to_max_tokens(models):
    params = SamplingParams(max_tokens=7, num_beams=3, ignore_eos=True)
    hyps = beam_search(models.ours, models.prompts[0], params, [models.eos])
    assert [h.finish_reason for h in hyps] == ["length"] * 3 and all(len(h.tokens) == 7 for h in hyps)


@pytest.mark.parametrize("seq,n,banned", [
    ([5, 6, 5], 2, [6]),  # "5 6" seen; after 5, 6 is banned
    ([5, 6, 7, 5, 6], 3, [7]),
    ([5, 6, 7, 5], 3, []),  # the suffix "7 5" is new
    ([1, 2, 3], 1, [1, 2, 3]),  # unigrams: every seen token
    ([4], 2, []),  # no complete n-gram yet
])
def test_banned_ngram_tokens(seq, n, banned):
    assert sorted(_banned_ngram_tokens(seq, n)) == banned
