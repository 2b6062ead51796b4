"""The watermark (Kirchenbauer et al. 2023): green lists, the engine's bias, and the z-test, checked
against transformers' WatermarkLogitsProcessor and WatermarkDetector on the same token ids and key."""

import json
import math
import random

import numpy as np
import pytest
import torch
from transformers import GPT2Config
from transformers.generation import WatermarkDetector, WatermarkingConfig, WatermarkLogitsProcessor

from chatforge.detect.score import (
    best_window,
    detect_watermark,
    green_flags,
    normalize_text,
    p_value,
    score_ids,
)
from chatforge.errors import ConfigError
from chatforge.generate.processors import TokenHistory
from chatforge.generate.watermark import GreenLists, WatermarkBias, WatermarkConfig, key_from_text

VOCAB = 1000
KEY = 15485863


def their_detector(config: WatermarkConfig, vocab: int, ignore_repeated_ngrams: bool) -> WatermarkDetector:
    model_config = GPT2Config(vocab_size=vocab, bos_token_id=vocab - 1)
    settings = WatermarkingConfig(greenlist_ratio=config.gamma, bias=config.delta, hashing_key=config.key,
                                  seeding_scheme=config.seeding_scheme, context_width=config.context_width)
    return WatermarkDetector(model_config, "cpu", settings, ignore_repeated_ngrams=ignore_repeated_ngrams)


def text_with_repeats(seed: int, length: int, vocab: int = VOCAB) -> list[int]:
    """Token ids with repeated n-grams in them (a phrase said twice), never the detector's BOS id."""
    rng = random.Random(seed)
    ids = [rng.randrange(vocab - 1) for _ in range(length)]
    return ids + ids[5:25] + [rng.randrange(vocab - 1) for _ in range(10)] + ids[:12]


@pytest.mark.parametrize("vocab", [VOCAB, 50257])
def test_lefthash_green_lists_equal_transformers(vocab):
    config = WatermarkConfig(key=KEY, gamma=0.25)
    theirs = WatermarkLogitsProcessor(vocab, "cpu", greenlist_ratio=0.25, hashing_key=KEY)
    ours = GreenLists(config, vocab)
    for previous in [0, 1, 7, 464, vocab - 1]:
        expected = theirs._get_greenlist_ids(torch.tensor([3, previous]))
        assert torch.equal(ours.ids((previous,)), expected)
    assert len(ours.ids((5,))) == int(vocab * 0.25)


@pytest.mark.parametrize("scheme,width", [("lefthash", 1), ("selfhash", 1), ("selfhash", 4)])
@pytest.mark.parametrize("ignore_repeated_ngrams", [False, True])
def test_detector_counts_and_z_equal_transformers(scheme, width, ignore_repeated_ngrams):
    config = WatermarkConfig(key=KEY, gamma=0.25, seeding_scheme=scheme, context_width=width)
    lists = GreenLists(config, VOCAB)
    theirs = their_detector(config, VOCAB, ignore_repeated_ngrams)
    for seed in range(3):
        ids = text_with_repeats(seed, 60)
        expected = theirs(torch.tensor([ids]), z_threshold=4.0, return_dict=True)
        ours = score_ids(ids, lists, ignore_repeated_ngrams=ignore_repeated_ngrams, min_tokens=1)
        assert ours.tokens_scored == expected.num_tokens_scored[0]
        assert ours.green_tokens == expected.num_green_tokens[0]
        assert ours.z == pytest.approx(float(expected.z_score[0]), rel=1e-12)
        assert ours.p_value == pytest.approx(float(expected.p_value[0]), rel=1e-9)
    # repeats are what the two settings disagree on: the text has some
    with_repeats = score_ids(text_with_repeats(0, 60), lists, ignore_repeated_ngrams=False, min_tokens=1)
    without = score_ids(text_with_repeats(0, 60), lists, ignore_repeated_ngrams=True, min_tokens=1)
    assert with_repeats.tokens_scored > without.tokens_scored


@pytest.mark.parametrize("scheme,width", [("lefthash", 1), ("selfhash", 1), ("selfhash", 4)])
def test_the_engine_bias_equals_transformers_logits_processor(scheme, width):
    config = WatermarkConfig(key=KEY, gamma=0.25, delta=2.0, seeding_scheme=scheme, context_width=width)
    theirs = WatermarkLogitsProcessor(VOCAB, "cpu", greenlist_ratio=0.25, bias=2.0, hashing_key=KEY,
                                      seeding_scheme=scheme, context_width=width)
    torch.manual_seed(0)
    prompts = [[5, 17, 33, 901], [2, 2, 8, 40, 41, 42]]
    logits = torch.randn(2, VOCAB)
    history = TokenHistory(prompts, VOCAB)
    ours = WatermarkBias.build([config, config])(logits, history)
    for row, prompt in enumerate(prompts):
        expected = theirs(torch.tensor([prompt]), logits[row:row + 1].clone())
        assert torch.equal(ours[row], expected[0])
    assert torch.equal(logits, logits.clone())  # the input is not modified


def test_rows_without_a_watermark_are_untouched_and_top_k_holes_stay_closed():
    config = WatermarkConfig(key=KEY)
    logits = torch.randn(2, VOCAB)
    logits[1, 10:] = float("-inf")  # what top-k left of row 1
    out = WatermarkBias.build([None, config])(logits, TokenHistory([[1, 2], [3, 4]], VOCAB))
    assert torch.equal(out[0], logits[0])
    assert torch.isinf(out[1, 10:]).all()  # the watermark never brings back a token the warpers removed
    assert WatermarkBias.build([None, None]) is None


def test_z_and_p_value_are_the_formulas_of_the_paper():
    config = WatermarkConfig(key=KEY, gamma=0.25)
    lists = GreenLists(config, VOCAB)
    ids = text_with_repeats(1, 80)
    flags = [f for f in green_flags(ids, lists, ignore_repeated_ngrams=True) if f is not None]
    result = score_ids(ids, lists)
    green, scored = sum(flags), len(flags)
    assert (result.green_tokens, result.tokens_scored) == (green, scored)
    assert result.z == pytest.approx((green - 0.25 * scored) / math.sqrt(scored * 0.25 * 0.75))
    assert result.green_fraction == green / scored
    # the exact normal survival function, not an approximation (scipy.stats.norm.sf(4) = 3.167124183311992e-05)
    assert p_value(4.0) == pytest.approx(3.167124183311992e-05, rel=1e-12)
    assert p_value(0.0) == 0.5 and 0.0 < p_value(30.0) < 1e-190  # no underflow to 0 until z > 37


def test_lefthash_wider_than_one_token_seeds_with_the_sum_of_the_window():
    """The reference's additive PRF: key x (sum of the h previous tokens); transformers reads the last only."""
    lists = GreenLists(WatermarkConfig(key=KEY, context_width=3), VOCAB)
    assert lists.seed((5, 17, 40)) == KEY * 62
    assert lists.window_before([1, 5, 17, 40]) == (5, 17, 40) and lists.window_before([17, 40]) is None
    expected = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(KEY * 62 % (2**64 - 1)))[:250]
    assert torch.equal(lists.ids((5, 17, 40)), expected)


def test_green_lists_need_the_key():
    ours = GreenLists(WatermarkConfig(key=KEY), VOCAB)
    other = GreenLists(WatermarkConfig(key=KEY + 2), VOCAB)
    overlap = len(set(ours.ids((7,)).tolist()) & set(other.ids((7,)).tolist())) / ours.size
    assert 0.1 < overlap < 0.4  # about gamma: another key's list is as good as random


def test_context_seeds_the_first_tokens_without_being_scored():
    lists = GreenLists(WatermarkConfig(key=KEY), VOCAB)
    ids = text_with_repeats(2, 30)
    alone, with_prompt = green_flags(ids, lists), green_flags(ids, lists, context=[11, 12])
    assert alone[0] is None and with_prompt[0] is not None
    assert len(with_prompt) == len(ids)  # the context's own tokens are never scored
    assert with_prompt[1:] == alone[1:]


class DigitTokenizer:
    """A tokenizer of digits and spaces, enough to test the text path: one token per character."""

    vocab_size = 11

    def encode(self, text):
        return [10 if c == " " else int(c) for c in text if c.isdigit() or c == " "]

    def decode(self, ids):
        return "".join(" " if i == 10 else str(i) for i in ids)


def watermarked_digits(config: WatermarkConfig, length: int, seed: int) -> str:
    """Digits where every token is taken from its green list (delta -> infinity)."""
    lists, rng, ids = GreenLists(config, DigitTokenizer.vocab_size), random.Random(seed), [3]
    for _ in range(length):
        ids.append(rng.choice(lists.ids((ids[-1],)).tolist()))
    return DigitTokenizer().decode(ids[1:])


def human_digits(length: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("0123456789 ") for _ in range(length))


def test_a_watermarked_text_is_detected_and_a_human_one_is_not():
    config = WatermarkConfig(key=KEY, gamma=0.5)
    tok = DigitTokenizer()
    marked = detect_watermark(watermarked_digits(config, 200, 0), tok, config, ignore_repeated_ngrams=False)
    human = detect_watermark(human_digits(200, 0), tok, config, ignore_repeated_ngrams=False)
    assert marked.verdict == "watermarked" and marked.z > 8
    assert human.verdict == "not watermarked" and human.z < 4
    assert marked.to_dict()["verdict"] == "watermarked"


def test_a_text_too_short_gets_an_answer_not_a_verdict():
    config = WatermarkConfig(key=KEY)
    result = detect_watermark("12 34", DigitTokenizer(), config)
    assert result.verdict == "too short" and result.z is None and result.p_value is None
    assert "at least 16" in result.message


def test_zero_width_characters_and_odd_spaces_do_not_change_the_score():
    config = WatermarkConfig(key=KEY, gamma=0.5)
    text = watermarked_digits(config, 120, 1)
    disguised = "\u200b".join(text).replace(" ", "\u00a0")
    assert normalize_text(disguised) == text
    tok = DigitTokenizer()
    assert detect_watermark(disguised, tok, config).z == detect_watermark(text, tok, config).z
    assert normalize_text("e\u0301") == "\u00e9"  # NFC


def test_the_windowed_mode_finds_a_watermarked_passage_inside_human_text():
    config = WatermarkConfig(key=KEY, gamma=0.5)
    tok = DigitTokenizer()
    before, passage, after = human_digits(300, 1), watermarked_digits(config, 64, 2), human_digits(300, 3)
    text = before + passage + after
    whole = detect_watermark(text, tok, config, ignore_repeated_ngrams=False, windowed=True)
    assert whole.window is not None and whole.window["verdict"] == "watermarked"
    assert whole.window["start_char"] >= len(before) - 16 and whole.window["end_char"] <= len(before) + 64 + 16
    assert whole.window["windows_tried"] > 100 and whole.window["corrected_p_value"] > whole.window["p_value"]
    # human text alone: the best of many windows is no verdict, thanks to the correction
    human = detect_watermark(human_digits(700, 4), tok, config, ignore_repeated_ngrams=False, windowed=True)
    assert human.window["verdict"] == "not watermarked"


def test_best_window_of_an_all_green_stretch():
    flags = [False] * 40 + [True] * 32 + [False] * 40
    window = best_window(flags, 0.5, sizes=(16, 32))
    assert (window["first_token"], window["last_token"], window["green_tokens"]) == (40, 71, 32)
    assert best_window([True] * 5, 0.5) is None


def test_keys_from_text():
    assert key_from_text("15485863") == 15485863
    assert key_from_text("my secret") == key_from_text(" my secret ") != key_from_text("my secret!")
    assert 0 < key_from_text("my secret") < 2**63
    with pytest.raises(ConfigError, match="key is empty"):
        key_from_text("  ")


def test_the_key_never_shows_in_a_repr():
    config = WatermarkConfig(key=987654321987)
    assert "987654321987" not in repr(config) and "987654321987" not in str(config.public())


@pytest.mark.parametrize("field,value,expected", [
    ("gamma", 1.0, "gamma must be in"), ("gamma", 0.0, "gamma must be in"), ("delta", -1.0, "delta must be"),
    ("seeding_scheme", "simple_9", "seeding_scheme must be one of lefthash, selfhash"),
    ("context_width", 0, "context_width must be"), ("key", 0, "key must be"),
])
def test_bad_settings_are_named(field, value, expected):
    with pytest.raises(ConfigError, match=expected):
        WatermarkConfig(**{field: value})


def test_z_is_unbiased_on_random_text():
    lists = GreenLists(WatermarkConfig(key=KEY, gamma=0.25), VOCAB)
    zs = [score_ids(text_with_repeats(s, 200), lists).z for s in range(30)]
    assert abs(np.mean(zs)) < 0.6 and 0.5 < np.std(zs) < 1.6


# ---- through the engine and the command line ------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, small_tokenizer, make_tiny_gpt):
    from chatforge.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("wm") / "model"
    save_checkpoint(path, make_tiny_gpt(context_length=256), small_tokenizer)
    return path


def generated(checkpoint, params):
    from chatforge.checkpoint import load_checkpoint
    from chatforge.generate.engine import Engine

    ckpt = load_checkpoint(checkpoint)
    prompt = ckpt.tokenizer.encode("The capital of Veloria is")
    return ckpt, prompt, Engine(ckpt.model.eval(), ckpt.tokenizer).generate([prompt], params)[0].outputs[0]


def test_the_engine_watermarks_what_it_samples_and_the_detector_finds_it(checkpoint):
    from chatforge.generate.params import SamplingParams

    config = WatermarkConfig(key=key_from_text("a teacher's key"), delta=4.0)
    params = SamplingParams(max_tokens=150, temperature=1.0, ignore_eos=True, seed=0, watermark=config)
    ckpt, prompt, marked = generated(checkpoint, params)
    _, _, plain = generated(checkpoint, SamplingParams(max_tokens=150, temperature=1.0, ignore_eos=True, seed=0))
    lists = GreenLists(config, ckpt.model.config.vocab_size)
    found = score_ids(marked.token_ids, lists, context=prompt[-1:], ignore_repeated_ngrams=False)
    unmarked = score_ids(plain.token_ids, lists, context=prompt[-1:], ignore_repeated_ngrams=False)
    assert found.verdict == "watermarked" and found.green_fraction > 0.6
    assert unmarked.verdict == "not watermarked" and abs(unmarked.z) < 4
    other_key = GreenLists(WatermarkConfig(key=key_from_text("another key")), ckpt.model.config.vocab_size)
    assert score_ids(marked.token_ids, other_key, context=prompt[-1:], ignore_repeated_ngrams=False).z < 4


def test_greedy_decoding_is_watermarked_too_and_beams_are_refused(checkpoint):
    from chatforge.errors import RequestError
    from chatforge.generate.params import SamplingParams

    config = WatermarkConfig(key=KEY, delta=100.0)  # a bias this large makes every greedy token green
    ckpt, prompt, out = generated(checkpoint, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                              watermark=config))
    lists = GreenLists(config, ckpt.model.config.vocab_size)
    flags = green_flags(out.token_ids, lists, context=prompt[-1:], ignore_repeated_ngrams=False)
    assert all(flags)
    with pytest.raises(RequestError, match="beam search cannot watermark"):
        SamplingParams(num_beams=2, watermark=config).validate(300, 256, 4)


def test_generate_and_detect_on_the_command_line(checkpoint, tmp_path, capsys):
    from chatforge.cli import main

    key = ["--watermark-key", "class 7b", "--watermark-delta", "4"]
    main(["generate", "--checkpoint", str(checkpoint), "--no-fused", "--prompt", "The capital", "--max-tokens", "150",
          "--ignore-eos", "--seed", "1", "--json", *key])
    text = json.loads(capsys.readouterr().out)[0]["outputs"][0]["text"]
    main(["generate", "--checkpoint", str(checkpoint), "--no-fused", "--prompt", "The capital", "--max-tokens", "150",
          "--ignore-eos", "--seed", "1", "--json"])
    plain = json.loads(capsys.readouterr().out)[0]["outputs"][0]["text"]
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": text, "prompt": "The capital"}) + "\n"
                     + json.dumps({"text": plain, "prompt": "The capital"}) + "\n" + json.dumps({"text": "Hi"}) + "\n")
    main(["detect", str(texts), "--checkpoint", str(checkpoint), "--context-field", "prompt", "--json", *key])
    marked, unmarked, short = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert marked["source"] == f"{texts}:1" and marked["verdict"] == "watermarked"
    assert unmarked["verdict"] == "not watermarked" and short["verdict"] == "too short"
    assert "class 7b" not in json.dumps(marked) and marked["watermark"]["gamma"] == 0.25
    main(["detect", str(texts), "--checkpoint", str(checkpoint), "--json", *key])  # no context: one token fewer
    assert json.loads(capsys.readouterr().out.splitlines()[0])["tokens_scored"] == marked["tokens_scored"] - 1
    main(["detect", str(texts), "--checkpoint", str(checkpoint), *key])  # prose: one line per text
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{texts}:1: watermarked (z = ") and "too short" in lines[2]


def test_detect_names_the_file_and_line_of_bad_input(checkpoint, tmp_path, capsys):
    from chatforge.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(SystemExit):
        main(["detect", str(bad), "--checkpoint", str(checkpoint), "--watermark-key", "k"])
    assert f"{bad}:2: expected an object with a string field 'text'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["detect", str(bad), "--checkpoint", str(checkpoint)])  # no key: a usage error


def test_threads_sharing_green_lists_get_the_right_lists():
    from concurrent.futures import ThreadPoolExecutor

    shared = GreenLists(WatermarkConfig(key=KEY), 50257, cache_size=8)  # a small cache: most lists are drawn again
    expected = {t: GreenLists(WatermarkConfig(key=KEY), 50257).ids((t,)) for t in range(40)}

    def check(t: int) -> bool:
        return bool(torch.equal(shared.mask((t,)).nonzero().flatten(), expected[t].sort().values))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(check, list(range(40)) * 3))
