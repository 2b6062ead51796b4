"""The engine: transformers-equal greedy decoding, continuous batching, and OpenAI semantics."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from chatforge.accel import kernels  # noqa: E402
from chatforge.checkpoint import load_checkpoint  # noqa: E402
from chatforge.errors import RequestError  # noqa: E402
from chatforge.generate.beam import beam_search  # noqa: E402
from chatforge.generate.engine import Engine  # noqa: E402
from chatforge.generate.params import SamplingParams  # noqa: E402

VOCAB = 96
PROMPTS = [[5, 17, 33], [2], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [9, 9, 9, 9, 1]]


class LetterTokenizer:
    """Token i is one character, so text checks are easy to read; token 0 is end-of-text."""

    special_ids = {"eot": 0}
    eot_id = 0

    def token_bytes(self, i: int) -> bytes:
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 .,!?\n"
        return alphabet[i % len(alphabet)].encode()

    def decode(self, ids):
        return b"".join(self.token_bytes(i) for i in ids).decode()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A random tiny transformers GPT-2 and the same weights loaded into chatforge."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                                     bos_token_id=0, eos_token_id=0, initializer_range=0.3)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(path)
    return hf, load_checkpoint(path, tokenizer=False).model.eval()


@pytest.fixture
def engine(pair):
    return Engine(pair[1], LetterTokenizer(), max_batch_size=8, stop_token_ids=[])


def hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                      pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_greedy_tokens_equal_transformers_generate(pair, engine):
    hf, _ = pair
    for prompt in PROMPTS:
        ours = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
        assert ours.outputs[0].token_ids == hf_greedy(hf, prompt, 12)
        assert ours.outputs[0].finish_reason == "length"


def test_batched_prompts_of_different_lengths_equal_one_at_a_time(engine):
    params = SamplingParams(max_tokens=10, temperature=0)
    together = engine.generate(PROMPTS, params)
    alone = [engine.generate([p], params)[0] for p in PROMPTS]
    assert [c.outputs[0].token_ids for c in together] == [c.outputs[0].token_ids for c in alone]


def test_requests_added_between_decode_steps_get_the_same_tokens(engine):
    params = SamplingParams(max_tokens=8, temperature=0)
    expected = {tuple(p): engine.generate([p], params)[0].outputs[0].token_ids for p in PROMPTS}
    first = engine.add_request(PROMPTS[0], params)
    engine.step()
    engine.step()
    later = engine.add_request(PROMPTS[2], params)  # joins a batch already three tokens in
    engine.step()
    third = engine.add_request(PROMPTS[1], params)
    while engine.has_unfinished():
        engine.step()
    for rid, prompt in ((first, PROMPTS[0]), (later, PROMPTS[2]), (third, PROMPTS[1])):
        assert engine.pop_result(rid).outputs[0].token_ids == expected[tuple(prompt)]


def test_a_cancelled_request_frees_its_slot_and_the_others_are_unaffected(engine):
    params = SamplingParams(max_tokens=10, temperature=0)
    expected = engine.generate([PROMPTS[2]], params)[0].outputs[0].token_ids
    keep = engine.add_request(PROMPTS[2], params)
    drop = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0, n=3))
    engine.step()
    assert engine.num_running == 4
    engine.cancel(drop)
    events = engine.step()
    assert engine.num_running == 1
    assert sum(e.finish_reason == "cancelled" for e in events) == 3
    while engine.has_unfinished():
        engine.step()
    assert engine.pop_result(keep).outputs[0].token_ids == expected


def test_requests_beyond_the_free_slots_wait_their_turn(pair):
    engine = Engine(pair[1], LetterTokenizer(), max_batch_size=2, stop_token_ids=[])
    results = engine.generate(PROMPTS, SamplingParams(max_tokens=5, temperature=0))
    assert [len(c.outputs[0].token_ids) for c in results] == [5, 5, 5, 5]


def test_logprobs_equal_log_softmax_of_transformers_logits(pair, engine):
    hf, _ = pair
    prompt = PROMPTS[0]
    ours = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0, logprobs=5))[0].outputs[0]
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0,
                      eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    for step, entry in enumerate(ours.logprobs):
        ref = torch.log_softmax(out.logits[step][0].float(), -1)
        assert entry.logprob == pytest.approx(ref[entry.token_id].item(), abs=1e-4)
        top = torch.topk(ref, 5)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_echo_gives_prompt_logprobs_with_none_for_the_first_token(pair, engine):
    hf, _ = pair
    prompt = PROMPTS[2]
    result = engine.generate([prompt], SamplingParams(max_tokens=0, echo=True, logprobs=2))[0]
    assert result.outputs[0].token_ids == [] and result.prompt_logprobs[0] is None
    ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    for i in range(1, len(prompt)):
        assert result.prompt_logprobs[i].logprob == pytest.approx(ref[i - 1, prompt[i]].item(), abs=1e-4)


def test_seeded_sampling_is_reproducible_and_n_samples_differ(engine):
    params = SamplingParams(max_tokens=12, temperature=1.5, n=3, seed=7)
    a = engine.generate([PROMPTS[0]], params)[0]
    b = engine.generate([PROMPTS[0]], params)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1
    c = engine.generate([PROMPTS[0], PROMPTS[1]], [params, SamplingParams(max_tokens=3)])[0]
    assert [o.token_ids for o in c.outputs] == [o.token_ids for o in a.outputs]  # whatever else is batched


def test_best_of_keeps_the_n_samples_with_the_highest_mean_logprob(engine):
    all_five = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=8, temperature=1.5, n=5, seed=3,
                                                            logprobs=0))[0].outputs
    best = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=8, temperature=1.5, n=2, best_of=5,
                                                        seed=3))[0].outputs
    ranked = sorted(all_five, key=lambda o: o.mean_logprob, reverse=True)[:2]
    assert [o.token_ids for o in best] == [o.token_ids for o in ranked]
    assert best[0].logprobs is None  # not asked for


def test_a_stop_token_ends_generation_and_is_not_part_of_the_output(engine):
    tokens = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0))[0].outputs[0].token_ids
    stop = tokens[4]
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop]))
    result = out[0].outputs[0]
    assert result.finish_reason == "stop" and result.token_ids == tokens[: tokens.index(stop)]



def test_logprobs_list_the_stop_token_too_as_usage_counts_it(engine):
    """The end token is not text, but it was sampled: its logprob is listed last (lm-evaluation-harness
    drops "the one generated entry" after an echoed prompt), in the result and in the stream."""
    tokens = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0))[0].outputs[0].token_ids
    stop = tokens[2]
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=1, stop_token_ids=[stop])
    done = engine.generate([PROMPTS[0]], params)[0]
    out = done.outputs[0]
    assert out.token_ids == tokens[:2] and done.completion_tokens == 3
    assert [e.token_id for e in out.logprobs] == tokens[:3]
    events = list(engine.stream(PROMPTS[0], params))
    assert events[-1].token_ids == [] and [e.token_id for e in events[-1].logprobs] == [stop]
    assert events[-1].finish_reason == "stop"

def test_a_stop_string_ends_generation_and_is_never_emitted_even_when_streamed(engine):
    tok = LetterTokenizer()
    tokens = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=12, temperature=0))[0].outputs[0].token_ids
    text = tok.decode(tokens)
    stop = text[5:8]
    params = SamplingParams(max_tokens=12, temperature=0, stop=[stop])
    streamed = "".join(e.text for e in engine.stream(PROMPTS[2], params))
    assert streamed == text[: text.find(stop)]
    final = engine.generate([PROMPTS[2]], params)[0].outputs[0]
    assert final.text == streamed and final.finish_reason == "stop"


def test_min_tokens_keeps_stop_tokens_away(engine):
    tokens = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0))[0].outputs[0].token_ids
    params = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[tokens[1]], min_tokens=6)
    result = engine.generate([PROMPTS[0]], params)[0].outputs[0]
    assert len(result.token_ids) >= 6 and tokens[1] not in result.token_ids[:6]


def test_beam_search_through_the_engine_equals_beam_search(pair, engine):
    params = SamplingParams(max_tokens=8, num_beams=3, n=2)
    via_engine = engine.generate([PROMPTS[0]], params)[0].outputs
    direct = beam_search(pair[1], PROMPTS[0], params, [])
    assert [o.token_ids for o in via_engine] == [h.tokens for h in direct[:2]]


@pytest.mark.parametrize(
    ("prompt", "params", "param"),
    [
        ([], SamplingParams(), "prompt"),
        ([1] * 65, SamplingParams(max_tokens=0), "prompt"),
        ([1] * 60, SamplingParams(max_tokens=10), "max_tokens"),
        ([1], SamplingParams(temperature=-0.1), "temperature"),
        ([1], SamplingParams(top_p=0), "top_p"),
        ([1], SamplingParams(top_p=1.5), "top_p"),
        ([1], SamplingParams(logprobs=21), "logprobs"),
        ([1], SamplingParams(n=0), "n"),
        ([1], SamplingParams(n=3, best_of=2), "best_of"),
        ([1], SamplingParams(stop=["a", "b", "c", "d", "e"]), "stop"),
        ([1], SamplingParams(logit_bias={3: 101}), "logit_bias"),
        ([1], SamplingParams(logit_bias={VOCAB: 1}), "logit_bias"),
        ([1, VOCAB], SamplingParams(), "prompt"),  # a token the model has no row for
        ([-1], SamplingParams(), "prompt"),
    ],
)
def test_bad_requests_are_refused_naming_the_parameter(engine, prompt, params, param):
    with pytest.raises(RequestError) as info:
        engine.add_request(prompt, params)
    assert info.value.param == param
    assert not engine.has_unfinished()


def test_stop_ids_past_the_models_rows_are_dropped_not_crashed_on(pair):
    # a GPT-2 directory's tokenizer carries chat tokens (ids past the model's rows): they can never be
    # sampled, so they stop nothing, and min_tokens must not ban them out of range
    engine = Engine(pair[1], LetterTokenizer(), max_batch_size=2, stop_token_ids=[VOCAB + 3])
    assert engine.eos_ids == []
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=4, min_tokens=2, temperature=0))[0].outputs[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


@pytest.mark.slow
@pytest.mark.parametrize("steps", ["fused", "graphs"])
def test_a_compiled_engine_gives_the_eager_engines_tokens_and_warm_up_compiles_every_graph(pair, steps):
    eager = Engine(pair[1], LetterTokenizer(), max_batch_size=8, stop_token_ids=[])
    compiled = Engine(pair[1], LetterTokenizer(), max_batch_size=8, stop_token_ids=[], fused=True, compile=True)
    # where they build, the engine's products are chatforge's own CPU kernels, and its steps of up to
    # 32 rows the fused step (tests/test_accel_fused_step.py); "graphs" sets that aside, so every
    # step runs torch.compile's graphs (with the kernels' products inside), as where they cannot build
    assert kernels.active() == (kernels.unsupported_reason() is None)
    assert compiled.fused == kernels.active()
    if steps == "graphs":
        compiled._fused = None
    elif compiled._fused is None:
        pytest.skip("chatforge's CPU kernels cannot be built here")
    compiled.warm_up()
    # rows at different positions that finish at different steps, one row alone, seeded samples
    lengths = [SamplingParams(max_tokens=m, temperature=0, logprobs=2) for m in (12, 3, 7, 9)]
    sampled = SamplingParams(max_tokens=8, temperature=1.0, seed=5, n=3)
    with torch.compiler.set_stance("fail_on_recompile"):  # warm_up already compiled every graph
        got = compiled.generate(PROMPTS, lengths) + compiled.generate(PROMPTS[:1], lengths[0])
        got_sampled = compiled.generate(PROMPTS[:2], sampled)
    want = eager.generate(PROMPTS, lengths) + eager.generate(PROMPTS[:1], lengths[0])
    assert [c.outputs[0].token_ids for c in got] == [c.outputs[0].token_ids for c in want]
    lp = [t.logprob for c in got for t in c.outputs[0].logprobs]
    assert lp == pytest.approx([t.logprob for c in want for t in c.outputs[0].logprobs], abs=1e-4)
    want_sampled = eager.generate(PROMPTS[:2], sampled)
    assert [[o.token_ids for o in c.outputs] for c in got_sampled] == [[o.token_ids for o in c.outputs]
                                                                         for c in want_sampled]
