"""Tests for chatforge.tokenizer: training, persistence, lossless round trip, specials, GPT-2 files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from chatforge.errors import CheckpointError, ConfigError, DataError
from chatforge.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A user asks a question and the assistant answers it politely.",
    "Tokenizers split text into pieces; byte-level BPE never meets an unknown character.",
    "日本語のテキストも少し混ぜておきます。中文也可以。",
    "Emoji 😀👍🏽 and accents: café, naïve, Ångström.",
    "def add(a, b):\n    return a + b\n",
    "Numbers 12345 and 3.14159 appear in the text 2024 times.",
] * 20

EXPLICIT_CASES = [
    "",
    " ",
    "hello world",
    "  leading and trailing spaces  ",
    "\t\ttabs\tand\nnewlines\n\n",
    "windows\r\nline endings\r\n",
    "\x00\x1b\x7f control chars \x01\x02\x1f",
    "e\u0301 combining acute, lone mark \u0301 and \u20dd",
    "👨\u200d👩\u200d👧\u200d👦 family ZWJ, 🏳️\u200d🌈 flag, 👍🏽 skin tone",
    "日本語 中文 한국어 ไทย العربية עברית",
    "\ufeffBOM \u200b zero width \u2028 line sep \U0010ffff max code point",
    "<|endoftext|><|user|>hi<|end|>",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=320)


# ---- training ---------------------------------------------------------------------------------


def test_train_from_iterator_fixed_special_ids_and_vocab_size(tok: Tokenizer) -> None:
    assert tok.special_ids == {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    assert tok.eot_id == 0
    assert tok.vocab_size == 320  # the corpus has enough pairs to reach the requested size
    assert tok.backend.get_vocab_size(with_added_tokens=True) == 320


def test_every_byte_is_a_single_token(tok: Tokenizer) -> None:
    single = {tok.token_bytes(i) for i in range(tok.vocab_size)}
    assert all(bytes([b]) in single for b in range(256))


def test_tiny_corpus_gives_smaller_vocab() -> None:
    t = Tokenizer.train(["ab ab ab"], vocab_size=4096)
    assert MIN_VOCAB_SIZE <= t.vocab_size < 4096
    assert t.decode(t.encode("ab ab")) == "ab ab"


def test_train_from_files_matches_iterator_over_same_lines(tmp_path: Path) -> None:
    half = len(CORPUS) // 2
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text("\n".join(CORPUS[:half]) + "\n", encoding="utf-8")
    files[1].write_text("\n".join(CORPUS[half:]) + "\n", encoding="utf-8")
    from_files = Tokenizer.train(files=files, vocab_size=300)
    lines = [line for f in files for line in f.read_text(encoding="utf-8").splitlines(keepends=True)]
    from_iter = Tokenizer.train(iter(lines), vocab_size=300)
    assert from_files.special_ids == from_iter.special_ids == {n: i for i, n in enumerate(SPECIAL_TOKENS)}
    assert from_files.vocab_size == 300
    assert from_files.hash == from_iter.hash


def test_training_is_deterministic(tok: Tokenizer) -> None:
    assert Tokenizer.train(CORPUS, vocab_size=320).hash == tok.hash


def test_hash_differs_for_different_vocab_size(tok: Tokenizer) -> None:
    other = Tokenizer.train(CORPUS, vocab_size=300)
    assert other.hash != tok.hash
    assert len(tok.hash) == 64 and int(tok.hash, 16) >= 0


# ---- persistence ------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["dir", "dir/nested", "file.json"])
def test_save_load_roundtrip(tok: Tokenizer, tmp_path: Path, target: str) -> None:
    written = tok.save(tmp_path / target)
    assert written.name in ("tokenizer.json", "file.json") and written.is_file()
    assert [p.name for p in written.parent.iterdir()] == [written.name]  # no temp file left behind
    loaded = Tokenizer.from_file(tmp_path / target)
    assert loaded.hash == tok.hash
    assert loaded.special_ids == tok.special_ids and loaded.vocab_size == tok.vocab_size
    for s in EXPLICIT_CASES:
        assert loaded.encode(s) == tok.encode(s)
        assert loaded.encode(s, allow_special=True) == tok.encode(s, allow_special=True)


def test_saved_file_is_plain_tokenizers_json(tok: Tokenizer, tmp_path: Path) -> None:
    raw = tokenizers.Tokenizer.from_file(str(tok.save(tmp_path)))
    assert raw.encode("hello world").ids == tok.encode("hello world")
    assert json.loads(tok.to_json_str())["model"]["type"] == "BPE"


def test_hash_ignores_json_formatting(tok: Tokenizer) -> None:
    compact = tokenizers.Tokenizer.from_str(json.dumps(json.loads(tok.to_json_str())))
    assert Tokenizer(compact).hash == tok.hash


def test_init_does_not_mutate_callers_backend() -> None:
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    Tokenizer(backend)
    assert backend.get_vocab_size(with_added_tokens=True) == 0


# ---- lossless round trip ----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_arbitrary_text(tok: Tokenizer, s: str) -> None:
    assert tok.decode(tok.encode(s)) == s
    assert tok.decode(tok.encode(s, allow_special=True)) == s
    assert b"".join(tok.token_bytes(i) for i in tok.encode(s)) == s.encode("utf-8")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(), max_size=8))
def test_encode_batch_equals_encode(tok: Tokenizer, texts: list[str]) -> None:
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, allow_special=True) == [tok.encode(t, allow_special=True) for t in texts]


@pytest.mark.parametrize("s", EXPLICIT_CASES)
def test_roundtrip_explicit_cases(tok: Tokenizer, s: str) -> None:
    for allow in (False, True):
        ids = tok.encode(s, allow_special=allow)
        assert tok.decode(ids) == s
        assert b"".join(tok.token_bytes(i) for i in ids) == s.encode("utf-8")


def test_decode_accepts_numpy_ids(tok: Tokenizer) -> None:
    ids = tok.encode("numpy ids")
    assert tok.decode(np.array(ids, dtype=np.int64)) == "numpy ids"


# ---- special tokens ---------------------------------------------------------------------------


def test_special_strings_in_user_text_are_plain_text_by_default(tok: Tokenizer) -> None:
    specials = set(tok.special_ids.values())
    for name, text in SPECIAL_TOKENS.items():
        s = f"say {text} now"
        plain = tok.encode(s)
        assert not specials & set(plain)
        assert tok.decode(plain) == s and tok.decode(plain, skip_special=True) == s
        marked = tok.encode(s, allow_special=True)
        assert marked.count(tok.special_ids[name]) == 1
        assert tok.decode(marked) == s
        assert tok.decode(marked, skip_special=True) == s.replace(text, "")


def test_special_token_bytes_are_their_strings(tok: Tokenizer) -> None:
    for name, text in SPECIAL_TOKENS.items():
        assert tok.token_bytes(tok.special_ids[name]) == text.encode("utf-8")
        assert tok.encode(text, allow_special=True) == [tok.special_ids[name]]


def test_token_bytes_agree_with_decode_for_every_id(tok: Tokenizer) -> None:
    for i in range(tok.vocab_size):
        raw = tok.token_bytes(i)
        try:
            expected = raw.decode("utf-8")
        except UnicodeDecodeError:  # a token holding part of a character: decode shows U+FFFD
            continue
        assert tok.decode([i]) == expected


def test_token_bytes_rejects_out_of_range(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="out of range"):
        tok.token_bytes(tok.vocab_size)
    with pytest.raises(ValueError, match="out of range"):
        tok.token_bytes(-1)


# ---- GPT-2 vocab.json + merges.txt -------------------------------------------------------------

# Merges whose order matters ("l l" before "e l"; "hell o" builds on "he ll") so rank bugs show up.
FAKE_MERGES = [
    "Ġ t",
    "h e",
    "l l",
    "e l",
    "Ġt he",
    "he ll",
    "hell o",
    "o r",
    "Ġ w",
    "Ġw or",
    "l d",
    "Ġwor ld",
    "1 2",
    "12 3",
    "Ġ Ġ",
    "ĠĠ ĠĠ",
    "' s",
]
GPT2_CASES = [
    "hello world",
    "the  hello   world",
    "belly yellow",
    " the the",
    "123123 12 3",
    "it's the world's",
    "tabs\tand\nnewlines\n",
    "日本語 👍🏽",
    "hello<|endoftext|>world",
]


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's GPT-2 byte encoder, written out independently of chatforge."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def reference_gpt2_encode(text: str, vocab: dict[str, int], merges: list[str]) -> list[int]:
    """OpenAI's original GPT-2 encoder.py algorithm in pure Python (no specials)."""
    regex = pytest.importorskip("regex")
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    ranks = {tuple(m.split()): r for r, m in enumerate(merges)}
    enc = bytes_to_unicode()
    ids: list[int] = []
    for piece in regex.findall(pattern, text):
        word = [enc[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            best = min(zip(word, word[1:], strict=False), key=lambda p: ranks.get(p, math.inf))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids += [vocab[t] for t in word]
    return ids


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("gpt2")
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for m in FAKE_MERGES:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|endoftext|>"] = len(vocab)  # last, as in GPT-2 (50256)
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(FAKE_MERGES) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_dir: Path) -> Tokenizer:
    return Tokenizer.from_gpt2_files(gpt2_dir / "vocab.json", gpt2_dir / "merges.txt")


def gpt2_vocab(gpt2_dir: Path) -> dict[str, int]:
    return json.loads((gpt2_dir / "vocab.json").read_text(encoding="utf-8"))


def test_gpt2_files_reuse_eot_and_append_specials(gpt2_tok: Tokenizer, gpt2_dir: Path) -> None:
    vocab = gpt2_vocab(gpt2_dir)
    eot = vocab["<|endoftext|>"]
    assert gpt2_tok.eot_id == eot
    others = [gpt2_tok.special_ids[n] for n in SPECIAL_TOKENS if n != "eot"]
    assert others == list(range(eot + 1, eot + len(SPECIAL_TOKENS)))
    assert gpt2_tok.vocab_size == len(vocab) + len(SPECIAL_TOKENS) - 1


@pytest.mark.parametrize("s", GPT2_CASES + EXPLICIT_CASES)
def test_gpt2_roundtrip(gpt2_tok: Tokenizer, s: str) -> None:
    assert gpt2_tok.decode(gpt2_tok.encode(s)) == s
    assert b"".join(gpt2_tok.token_bytes(i) for i in gpt2_tok.encode(s)) == s.encode("utf-8")


def test_gpt2_matches_reference_encoder(gpt2_tok: Tokenizer, gpt2_dir: Path) -> None:
    vocab = gpt2_vocab(gpt2_dir)
    for s in GPT2_CASES:
        assert gpt2_tok.encode(s) == reference_gpt2_encode(s, vocab, FAKE_MERGES), s
    assert gpt2_tok.encode("hello") == [vocab["hello"]]  # the merges were really applied


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(alphabet="helowrdty 123's\n\t\u3000\x85"), st.text()))
def test_gpt2_matches_reference_encoder_on_random_text(gpt2_tok: Tokenizer, gpt2_dir: Path, s: str) -> None:
    assert gpt2_tok.encode(s) == reference_gpt2_encode(s, gpt2_vocab(gpt2_dir), FAKE_MERGES)


def test_gpt2_matches_transformers(gpt2_tok: Tokenizer, gpt2_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    # In transformers 5.x GPT2Tokenizer is GPT2TokenizerFast (the slow class is gone), and the
    # vocab_file=/merges_file= constructor arguments are ignored, so load the directory instead.
    for cls_name in ("GPT2TokenizerFast", "GPT2Tokenizer"):
        ref = getattr(transformers, cls_name, None)
        if ref is None:
            continue
        hf = ref.from_pretrained(str(gpt2_dir))
        assert hf.convert_tokens_to_ids("<|endoftext|>") == gpt2_tok.eot_id
        for s in GPT2_CASES:
            # transformers maps special strings in text to their ids, like our allow_special=True.
            assert gpt2_tok.encode(s, allow_special=True) == hf.encode(s), (cls_name, s)
            assert gpt2_tok.decode(hf.encode(s)) == s


def test_from_pretrained_dir_gpt2_files_and_tokenizer_json(gpt2_tok: Tokenizer, gpt2_dir: Path, tmp_path: Path) -> None:
    assert Tokenizer.from_pretrained_dir(gpt2_dir).hash == gpt2_tok.hash
    gpt2_tok.save(tmp_path)
    (tmp_path / "vocab.json").write_text("not used when tokenizer.json exists", encoding="utf-8")
    assert Tokenizer.from_pretrained_dir(tmp_path).hash == gpt2_tok.hash


def test_foreign_tokenizer_json_gets_chat_specials(gpt2_tok: Tokenizer, gpt2_dir: Path, tmp_path: Path) -> None:
    # A plain GPT-2 tokenizer.json (only <|endoftext|> special) as Hugging Face ships it.
    raw = tokenizers.Tokenizer(
        tokenizers.models.BPE.from_file(str(gpt2_dir / "vocab.json"), str(gpt2_dir / "merges.txt"))
    )
    raw.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = tokenizers.decoders.ByteLevel()
    raw.add_special_tokens(["<|endoftext|>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_file(tmp_path)
    assert loaded.special_ids == gpt2_tok.special_ids
    assert all(loaded.encode(s) == gpt2_tok.encode(s) for s in GPT2_CASES)


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"texts": []}, {"texts": iter([])}, {"texts": ["", ""]}, {"files": []}])
def test_train_without_text_is_data_error(kwargs: dict) -> None:
    with pytest.raises(DataError, match="no text|empty"):
        Tokenizer.train(**kwargs)


def test_train_empty_file_is_data_error(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        Tokenizer.train(files=[tmp_path / "empty.txt"])


def test_train_vocab_too_small_is_config_error() -> None:
    with pytest.raises(ConfigError, match=rf"vocab_size.*{MIN_VOCAB_SIZE}"):
        Tokenizer.train(CORPUS, vocab_size=MIN_VOCAB_SIZE - 1)
    assert Tokenizer.train(CORPUS, vocab_size=MIN_VOCAB_SIZE).vocab_size == MIN_VOCAB_SIZE


def test_train_missing_or_binary_file_is_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.txt.*not found"):
        Tokenizer.train(files=[tmp_path / "nope.txt"])
    (tmp_path / "bin.txt").write_bytes(b"ok\n\xff\xfe\x00bad")
    with pytest.raises(DataError, match="bin.txt.*UTF-8"):
        Tokenizer.train(files=[tmp_path / "bin.txt"])


def test_from_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing.json.*not found"):
        Tokenizer.from_file(tmp_path / "missing.json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json.*not found"):
        Tokenizer.from_file(tmp_path)  # a directory without tokenizer.json
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="bad.json.*not a valid tokenizer.json"):
        Tokenizer.from_file(bad)


def test_from_file_rejects_non_byte_level_tokenizer(tmp_path: Path) -> None:
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    word_level.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="tokenizer.json.*byte-level BPE"):
        Tokenizer.from_file(tmp_path)


def test_gpt2_and_pretrained_dir_errors_name_the_file(gpt2_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="merges.txt.*not found"):
        Tokenizer.from_gpt2_files(gpt2_dir / "vocab.json", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text("[1, 2]", encoding="utf-8")
    (tmp_path / "merges.txt").write_text("a b\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="vocab.json.*not a valid GPT-2"):
        Tokenizer.from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    with pytest.raises(CheckpointError, match="empty_dir.*expected a directory with tokenizer.json"):
        Tokenizer.from_pretrained_dir(tmp_path / "empty_dir")
