"""Zero-shot detectors: each score equals its paper's formula computed slowly, one forward per position,
in float64, on tiny random GPTs; then what the formulas promise (a model's own samples against random
text), windows, contexts, and the calibrated thresholds with their refusals."""

import json
import math
import random
import statistics

import pytest
import torch

from chatforge.checkpoint import load_checkpoint, save_checkpoint
from chatforge.detect.calibrate import Threshold, apply_threshold, calibrate, read_reference
from chatforge.detect.zero_shot import (
    METHODS,
    ZeroShotScore,
    binoculars,
    fast_detectgpt,
    fingerprint,
    perplexity_burstiness,
    sentence_of_tokens,
    windows,
)
from chatforge.errors import ConfigError, DataError
from chatforge.model import GPT, GPTConfig

ALPHABET = " abcdefghijklmnopqrstuvwxyz.,!?\n"
EOT = 0
V = len(ALPHABET) + 1


class CharTokenizer:
    """One token per character; id 0 is <|endoftext|>, which starts every text's history."""

    vocab_size = V
    eot_id = EOT
    hash = "char-tokenizer"

    def encode(self, text):
        return [ALPHABET.index(c) + 1 for c in text]

    def decode(self, ids):
        return "".join(ALPHABET[i - 1] for i in ids if i != EOT)


TOK = CharTokenizer()
TEXT = "the cat sat on the mat. a dog ran far away!\nwhy not?"
OTHER = "other words, longer than the first text, to pad the batch."


def tiny_gpt(seed: int, context_length: int = 64, sharpness: float = 20.0) -> GPT:
    """A random GPT whose next-token distributions are peaked (the final LayerNorm's gains drawn with
    standard deviation `sharpness`: about 2.3 nats of entropy per token where uniform is 3.5), so its own
    samples differ from random text."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=32, context_length=context_length))
    with torch.no_grad():
        model.ln_f.weight.normal_(0.0, sharpness)
    return model.eval()


def uniform_gpt() -> GPT:
    """A GPT whose logits are exactly 0: every next-token distribution is uniform over V ids."""
    model = tiny_gpt(0)
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.zero_()
    return model


def log_probs(model: GPT, tokens: list[int], j: int, start: int = 0) -> torch.Tensor:
    """log p(. | tokens[start:j]) in float64: one forward, then logits - log sum exp(logits)."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens[start:j]]))[0, -1].double()
    return logits - torch.log(torch.exp(logits).sum())


def sequence(text: str, context: str | None = None) -> tuple[list[int], int]:
    """<|endoftext|>, the context and the text's tokens; the index of the text's first token."""
    history = [EOT] + (TOK.encode(context) if context else [])
    return history + TOK.encode(text), len(history)


def slow_fast_detectgpt(model, text, context=None, start_of=lambda j: 0):
    tokens, first = sequence(text, context)
    ll = mu = var = 0.0
    for j in range(first, len(tokens)):
        lp = log_probs(model, tokens, j, start_of(j))
        p = lp.exp()
        ll += float(lp[tokens[j]])
        mean = float((p * lp).sum())
        mu += mean
        var += float((p * lp * lp).sum()) - mean**2
    return (ll - mu) / math.sqrt(var)


def sample_text(model: GPT, n: int, seed: int) -> str:
    """n characters sampled from the model at temperature 1 (<|endoftext|> excluded: it is not text)."""
    g = torch.Generator().manual_seed(seed)
    ids = [EOT]
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            logits[EOT] = -math.inf
            ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g)))
    return TOK.decode(ids)


def random_text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(ALPHABET) for _ in range(n))


# ---- Fast-DetectGPT ---------------------------------------------------------------------------------


def test_fast_detectgpt_equals_the_analytic_criterion_computed_per_position():
    model = tiny_gpt(1)
    scores = fast_detectgpt([TEXT, OTHER, TEXT], model, TOK, contexts=[None, None, "answer me,"])
    for s, text, context in zip(scores, [TEXT, OTHER, TEXT], [None, None, "answer me,"]):
        assert s.method == "fast_detectgpt" and s.verdict == "uncalibrated" and s.threshold is None
        assert s.tokens_scored == len(text)  # <|endoftext|> lets the first character be scored too
        assert s.score == pytest.approx(slow_fast_detectgpt(model, text, context), rel=1e-4, abs=1e-4)
    assert scores[0].score != pytest.approx(scores[2].score, abs=1e-3)  # the context changed it
    d = scores[0].details
    assert d["mean_log_likelihood"] < d["mean_expected_log_likelihood"] + 0.5  # figures, not placeholders
    assert d["params"] == {"context_length": 64, "stride": 32}


def test_fast_detectgpt_puts_the_models_own_samples_far_above_random_text():
    model = tiny_gpt(2)
    samples = [sample_text(model, 48, seed) for seed in range(8)]
    randoms = [random_text(48, seed) for seed in range(8)]
    own = [s.score for s in fast_detectgpt(samples, model, TOK)]
    other = [s.score for s in fast_detectgpt(randoms, model, TOK)]
    # under the model's own distribution the criterion is about standard normal
    assert abs(statistics.mean(own)) < 1.5
    assert statistics.mean(own) > statistics.mean(other) + 10
    assert min(own) > max(other)


# ---- Binoculars -------------------------------------------------------------------------------------


def slow_binoculars(observer, performer, text):
    tokens, first = sequence(text)
    nll, xent = [], []
    for j in range(first, len(tokens)):
        log_q = log_probs(performer, tokens, j)
        p = log_probs(observer, tokens, j).exp()
        nll.append(-float(log_q[tokens[j]]))
        xent.append(-float((p * log_q).sum()))
    return statistics.mean(nll), statistics.mean(xent)


def test_binoculars_equals_performer_perplexity_over_cross_perplexity_per_position():
    observer, performer = tiny_gpt(3), tiny_gpt(4)
    scores = binoculars([TEXT, OTHER], observer, performer, TOK)
    for s, text in zip(scores, [TEXT, OTHER]):
        ppl, x_ppl = slow_binoculars(observer, performer, text)
        assert s.tokens_scored == len(text)
        assert s.details["log_perplexity"] == pytest.approx(ppl, rel=1e-5)
        assert s.details["cross_perplexity"] == pytest.approx(x_ppl, rel=1e-5)
        assert s.score == pytest.approx(ppl / x_ppl, rel=1e-5)
    swapped = binoculars([TEXT], performer, observer, TOK)[0]
    assert swapped.score != pytest.approx(scores[0].score, rel=1e-3)  # the roles are not symmetric


def test_binoculars_with_a_uniform_performer_is_exactly_one():
    # -log q = log V for every token and every observer distribution: log V / log V
    for observer in (tiny_gpt(5), uniform_gpt()):
        s = binoculars([TEXT], observer, uniform_gpt(), TOK)[0]
        assert s.details["log_perplexity"] == pytest.approx(math.log(V), rel=1e-6)
        assert s.details["cross_perplexity"] == pytest.approx(math.log(V), rel=1e-6)
        assert s.score == pytest.approx(1.0, rel=1e-6)


def test_binoculars_with_one_model_observing_and_performing_compares_surprise_with_entropy():
    model = tiny_gpt(6)
    samples = [sample_text(model, 48, 100 + seed) for seed in range(8)]
    own = binoculars(samples, model, model, TOK)
    for s, text in zip(own[:2], samples):
        tokens, first = sequence(text)
        entropy = [-float((lp.exp() * lp).sum()) for lp in (log_probs(model, tokens, j)
                                                             for j in range(first, len(tokens)))]
        assert s.details["cross_perplexity"] == pytest.approx(statistics.mean(entropy), rel=1e-5)
    # a sample's surprise is on average its entropy: about 1; random text is far more surprising
    assert statistics.mean(s.score for s in own) == pytest.approx(1.0, abs=0.2)
    randoms = binoculars([random_text(48, seed) for seed in range(8)], model, model, TOK)
    assert min(s.score for s in randoms) > max(s.score for s in own)


def test_binoculars_refuses_models_with_different_vocabularies():
    torch.manual_seed(0)
    wider = GPT(GPTConfig(vocab_size=V + 7, n_layer=1, n_head=2, n_embd=16, context_length=64)).eval()
    with pytest.raises(ConfigError, match="different vocabularies"):
        binoculars([TEXT], tiny_gpt(0), wider, TOK)


# ---- perplexity and burstiness ----------------------------------------------------------------------


def test_perplexity_burstiness_equals_sentence_by_sentence_computation():
    model = tiny_gpt(7)
    sentences = ["the cat sat on the mat. ", "a dog ran far away!\n", "why not? ", "it is late."]
    text = "".join(sentences)
    s = perplexity_burstiness([text], model, TOK)[0]
    tokens, first = sequence(text)
    nll = [-float(log_probs(model, tokens, j)[tokens[j]]) for j in range(first, len(tokens))]
    means, at = [], 0
    for sentence in sentences:  # one token per character: each sentence's tokens by its length
        means.append(statistics.mean(nll[at:at + len(sentence)]))
        at += len(sentence)
    assert s.details["sentence_log_perplexities"] == pytest.approx(means, rel=1e-5)
    assert s.details["log_perplexity"] == pytest.approx(statistics.mean(nll), rel=1e-5)
    assert s.details["perplexity"] == pytest.approx(math.exp(statistics.mean(nll)), rel=1e-5)
    assert s.details["burstiness"] == pytest.approx(statistics.pstdev(means), rel=1e-4)
    assert s.score == pytest.approx(statistics.mean(nll) + statistics.pstdev(means), rel=1e-5)


def test_a_uniform_model_gives_log_v_perplexity_and_no_burstiness():
    s = perplexity_burstiness([TEXT], uniform_gpt(), TOK)[0]
    assert s.details["log_perplexity"] == pytest.approx(math.log(V), rel=1e-6)
    assert s.details["burstiness"] == pytest.approx(0.0, abs=1e-6)
    assert s.score == pytest.approx(math.log(V), rel=1e-6)


def test_burstiness_needs_two_sentences():
    s = perplexity_burstiness(["one long sentence without any end at all"], tiny_gpt(0), TOK)[0]
    assert s.verdict == "too short" and s.score is None and s.tokens_scored == 40
    assert "2 sentences" in s.message


def test_sentences_of_bpe_tokens_follow_the_text(small_tokenizer):
    text = "The capital of Veloria is Kesh. Mira walked her dog!\n\n3 plus 3 is 6. Done"
    ids = small_tokenizer.encode(text)
    sentence = sentence_of_tokens(ids, small_tokenizer)
    pieces = ["".join(small_tokenizer.decode([t]) for t, s in zip(ids, sentence) if s == k)
              for k in range(max(sentence) + 1)]
    assert "".join(pieces) == text  # each token in the sentence where it ends; spaces where the BPE puts them
    assert [p.strip() for p in pieces] == ["The capital of Veloria is Kesh.", "Mira walked her dog!", "3 plus 3 is 6.",
                                           "Done"]


# ---- what every method shares ----------------------------------------------------------------------


def score_with(method, texts, **options):
    models = [tiny_gpt(8)] * len(METHODS[method].models)
    return METHODS[method].score(texts, *models, TOK, **options)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_too_short_texts_get_no_score(method):
    short, empty, enough = score_with(method, ["a short. one", "", "sixteen chars. and more."])
    for s, n in ((short, 12), (empty, 0)):
        assert (s.score, s.verdict, s.tokens_scored) == (None, "too short", n)
        assert f"{n} tokens could be scored; a score needs at least 16" == s.message
    assert enough.score is not None and enough.verdict == "uncalibrated"
    assert score_with(method, ["a short. one"], min_tokens=4)[0].score is not None


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_context_conditions_the_text_but_is_not_scored(method):
    alone, prompted, as_ids = score_with(method, [TEXT] * 3, contexts=[None, "tell me, why not?", [EOT, 5, 6, 7]])
    assert alone.tokens_scored == prompted.tokens_scored == as_ids.tokens_scored == len(TEXT)
    assert prompted.score != pytest.approx(alone.score, rel=1e-4)
    assert as_ids.score != pytest.approx(alone.score, rel=1e-4)
    with pytest.raises(ConfigError, match="contexts: got 1 for 3 texts"):
        score_with(method, [TEXT] * 3, contexts=["one"])


def test_batches_equal_one_text_at_a_time():
    model = tiny_gpt(9)
    texts = [TEXT, OTHER, "short but enough text", TEXT[::-1]]
    together = fast_detectgpt(texts, model, TOK)
    one_row_per_forward = fast_detectgpt(texts, model, TOK, max_batch_logits=1)
    for a, b in zip(together, one_row_per_forward):
        assert a.score == pytest.approx(b.score, rel=1e-5)


@pytest.mark.parametrize("n,first,context_length,stride", [(100, 1, 16, 8), (100, 30, 16, 8), (17, 1, 16, 8),
                                                          (5, 1, 16, 8), (64, 1, 16, 16), (40, 3, 16, 1)])
def test_windows_score_each_token_once_with_enough_before_it(n, first, context_length, stride):
    targets = []
    for start, lo, hi in windows(n, first, context_length, stride):
        assert (hi - 1) - start <= context_length  # the tokens read fit the context
        for j in range(lo, hi):
            assert j - start >= min(j, context_length - stride + 1)  # history seen before token j
        targets += range(lo, hi)
    assert targets == list(range(first, n))


def test_long_texts_are_scored_in_windows_of_the_context():
    model, C, stride = tiny_gpt(10, context_length=16), 16, 8
    text = (TEXT + " " + OTHER)[:70]

    def start_of(j):  # chunks end at C + 1, then every `stride` tokens; a chunk ending at e reads from e - 1 - C
        end = C + 1 if j < C + 1 else C + 1 + stride * ((j - C - 1) // stride + 1)
        return max(0, min(end, len(text) + 1) - 1 - C)

    s = fast_detectgpt([text], model, TOK)[0]
    assert s.tokens_scored == 70 and s.details["params"] == {"context_length": 16, "stride": 8}
    assert s.score == pytest.approx(slow_fast_detectgpt(model, text, start_of=start_of), rel=1e-4, abs=1e-4)
    other_stride = fast_detectgpt([text], model, TOK, stride=4)[0]
    assert other_stride.score != pytest.approx(s.score, rel=1e-5)


def test_scoring_leaves_the_model_in_its_mode_and_refuses_a_foreign_tokenizer():
    model = tiny_gpt(11).train()
    fast_detectgpt([TEXT], model, TOK)
    assert model.training

    class Bigger(CharTokenizer):
        vocab_size = V + 1

    with pytest.raises(ConfigError, match="tokenizer has 34 ids but the model only 33"):
        fast_detectgpt([TEXT], model, Bigger())
    with pytest.raises(ConfigError, match="list of strings"):
        fast_detectgpt(TEXT, model, TOK)


# ---- calibration ------------------------------------------------------------------------------------


def made_up(method: str, values, tokens: int = 40) -> list[ZeroShotScore]:
    return [ZeroShotScore(method, float(v), tokens, "uncalibrated", details={"params": {"stride": 8}})
            for v in values]


FP = {"tokenizer": "t", "models": [{"config": {"n_layer": 2}, "weights": "w"}]}


def test_calibration_takes_the_conservative_quantile_in_the_methods_direction():
    values = list(range(100))
    random.Random(0).shuffle(values)
    high = calibrate("fast_detectgpt", made_up("fast_detectgpt", values), 0.05, FP)
    assert (high.direction, high.threshold, high.achieved_fpr, high.n_reference) == ("higher", 94, 0.05, 100)
    low = calibrate("binoculars", made_up("binoculars", values), 0.05, FP)
    assert (low.direction, low.threshold, low.achieved_fpr) == ("lower", 5, 0.05)
    between = calibrate("fast_detectgpt", made_up("fast_detectgpt", values), 0.034, FP)
    assert (between.threshold, between.achieved_fpr) == (96, 0.03)  # 3.4 texts allowed: 3 flagged
    tied = calibrate("fast_detectgpt", made_up("fast_detectgpt", [1.0] * 40), 0.05, FP)
    assert tied.achieved_fpr == 0.0  # a tie is never flagged
    assert high.params == {"stride": 8} and high.tokens_scored == {"min": 40, "median": 40, "max": 40}


def test_calibration_refuses_too_few_human_texts_and_wrong_inputs():
    with pytest.raises(ConfigError, match=r"at least 100 human texts long enough to score; got 99 \(0 too short\)"):
        calibrate("fast_detectgpt", made_up("fast_detectgpt", range(99)), 0.01, FP)
    short = ZeroShotScore("fast_detectgpt", None, 3, "too short")
    with pytest.raises(ConfigError, match=r"got 99 \(1 too short\)"):
        calibrate("fast_detectgpt", made_up("fast_detectgpt", range(99)) + [short], 0.01, FP)
    assert calibrate("fast_detectgpt", made_up("fast_detectgpt", range(100)), 0.01, FP).threshold == 98
    with pytest.raises(ConfigError, match="fpr: got 0"):
        calibrate("fast_detectgpt", made_up("fast_detectgpt", range(100)), 0, FP)
    with pytest.raises(ConfigError, match="got a binoculars score"):
        calibrate("fast_detectgpt", made_up("binoculars", range(100)), 0.05, FP)
    with pytest.raises(ConfigError, match="unknown zero-shot method"):
        calibrate("gptzero", made_up("gptzero", range(100)), 0.05, FP)
    with pytest.raises(ConfigError, match="differ from the scores'"):
        calibrate("fast_detectgpt", made_up("fast_detectgpt", range(100)), 0.05, FP, params={"stride": 4})


def test_thresholds_round_trip_through_json(tmp_path):
    made = calibrate("binoculars", made_up("binoculars", range(50)), 0.1, FP)
    path = made.save(tmp_path / "threshold.json")
    assert Threshold.load(path) == made == Threshold.from_json(made.to_json())
    assert json.loads(path.read_text())["format"] == "chatforge-zero-shot-threshold-v1"
    with pytest.raises(DataError, match="missing"):
        Threshold.load(tmp_path / "nothing.json")
    with pytest.raises(DataError, match="format"):
        Threshold.from_json('{"method": "binoculars"}')


def test_apply_threshold_gives_verdicts_and_refuses_what_it_was_not_made_for():
    threshold = calibrate("fast_detectgpt", made_up("fast_detectgpt", range(20)), 0.1, FP)  # flags > 17
    scores = made_up("fast_detectgpt", [17, 17.5]) + [ZeroShotScore("fast_detectgpt", None, 3, "too short")]
    judged = apply_threshold(scores + made_up("fast_detectgpt", [30], tokens=400), threshold, FP)
    assert [s.verdict for s in judged] == ["human", "machine", "too short", "machine"]
    assert all(s.threshold == 17 for s in judged) and judged[0].message == ""
    assert "calibrated on texts of 40 to 40 tokens" in judged[3].message
    with pytest.raises(ConfigError, match="the tokenizer differs"):
        apply_threshold(scores, threshold, {**FP, "tokenizer": "u"})
    with pytest.raises(ConfigError, match="model 1's weights differ"):
        apply_threshold(scores, threshold, {**FP, "models": [{"config": {"n_layer": 2}, "weights": "x"}]})
    with pytest.raises(ConfigError, match="cannot judge a binoculars score"):
        apply_threshold(made_up("binoculars", [1]), threshold, FP)
    other = [ZeroShotScore("fast_detectgpt", 1.0, 40, "uncalibrated", details={"params": {"stride": 4}})]
    with pytest.raises(ConfigError, match="made with parameters"):
        apply_threshold(other, threshold, FP)


def test_calibrated_on_random_text_fast_detectgpt_flags_the_models_samples():
    model = tiny_gpt(12)
    human = fast_detectgpt([random_text(40, 1000 + i) for i in range(20)], model, TOK)
    fp = fingerprint(TOK, model)
    threshold = calibrate("fast_detectgpt", human, 0.05, fp)
    assert threshold.achieved_fpr <= 0.05 and threshold.params == {"context_length": 64, "stride": 32}
    samples = fast_detectgpt([sample_text(model, 40, seed) for seed in range(4)], model, TOK)
    assert [s.verdict for s in apply_threshold(samples, threshold, fp)] == ["machine"] * 4
    new_human = apply_threshold(fast_detectgpt([random_text(40, i) for i in range(4)], model, TOK), threshold, fp)
    assert [s.verdict for s in new_human] == ["human"] * 4
    with pytest.raises(ConfigError, match="weights differ"):
        apply_threshold(samples, threshold, fingerprint(TOK, tiny_gpt(13)))
    with pytest.raises(ConfigError, match="made with parameters"):
        apply_threshold(fast_detectgpt([TEXT], model, TOK, stride=8), threshold, fp)


def test_a_checkpoints_fingerprint_survives_saving_and_loading(tmp_path, small_tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16, context_length=32))
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "ckpt", model, small_tokenizer))
    assert fingerprint(ckpt.tokenizer, ckpt.model) == fingerprint(small_tokenizer, model)
    assert fingerprint(small_tokenizer, model)["tokenizer"] == small_tokenizer.hash
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight[3, 5] += 0.1  # trained a little further
    assert fingerprint(small_tokenizer, model) != fingerprint(ckpt.tokenizer, ckpt.model)
    text = "The capital of Veloria is Kesh. Mira walked her dog."
    s = fast_detectgpt([text], ckpt.model, ckpt.tokenizer)[0]  # BPE: every token scored after <|endoftext|>
    assert s.tokens_scored == len(small_tokenizer.encode(text)) and s.score is not None


def test_read_reference_reads_texts_and_contexts(tmp_path):
    path = tmp_path / "human.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "context": "why?"}\n')
    assert read_reference(path) == (["one", "two"], [None, "why?"])
    path.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(DataError, match="human.jsonl:2"):
        read_reference(path)
    with pytest.raises(DataError, match="missing"):
        read_reference(tmp_path / "none.jsonl")
