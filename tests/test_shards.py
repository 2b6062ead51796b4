"""Tests for chatforge.data.shards: preparing token shards and sampling batches from them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge.data import shards
from chatforge.data.shards import TokenDataset, prepare_shards, read_meta
from chatforge.errors import ConfigError, DataError
from chatforge.tokenizer import Tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
DOCS = [" ".join(WORDS[(i * j) % len(WORDS)] for j in range(3 + i % 7)) + f" #{i}" for i in range(60)]
DOCS[5] = "a document quoting <|endoftext|> literally stays one document"
DOCS[7] = "unicode: café 日本語 👍🏽"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(DOCS, vocab_size=300)


class BigVocabTokenizer:
    """The real tokenizer posing as one with 70000 ids, to exercise the uint32 path."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.vocab_size = 70_000
        self.eot_id = inner.eot_id
        self.hash = "f" * 64

    def to_json_str(self) -> str:
        return self.inner.to_json_str()


def write_jsonl(path: Path, texts: list[str], bad_line_at: int | None = None) -> Path:
    lines = [json.dumps({"text": t}) for t in texts]
    if bad_line_at is not None:
        lines.insert(bad_line_at, '{"text": "unterminated')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", DOCS)


def split_tokens(data_dir: Path, split: str) -> np.ndarray:
    meta = read_meta(data_dir)
    dtype = np.dtype("<u2" if meta["dtype"] == "uint16" else "<u4")
    parts = [np.fromfile(data_dir / name, dtype=dtype) for name in meta["splits"][split]["files"]]
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def decode_docs(tok: Tokenizer, tokens: np.ndarray) -> list[str]:
    """Cut a split's tokens at each end-of-text token and decode the pieces."""
    assert tokens.size == 0 or tokens[-1] == tok.eot_id
    ends = np.flatnonzero(tokens == tok.eot_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]


def is_subsequence(part: list[str], whole: list[str]) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


def dir_snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ---- preparing --------------------------------------------------------------------------------


def test_prepare_writes_meta_and_reproduces_documents(tok: Tokenizer, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    meta = prepare_shards(corpus, tok, out, val_fraction=0.2, num_workers=1, show_progress=False)
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["format"] == "chatforge-shards-v1"
    assert (meta["tokenizer_hash"], meta["vocab_size"], meta["eot_id"]) == (tok.hash, 300, tok.eot_id)
    assert meta["dtype"] == "uint16"
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert train["files"] == ["train_000.bin"] and val["files"] == ["val_000.bin"]
    assert train["documents"] + val["documents"] == len(DOCS) and val["documents"] > 0
    assert train["tokens"] + val["tokens"] == sum(len(tok.encode(d)) + 1 for d in DOCS)
    decoded = {split: decode_docs(tok, split_tokens(out, split)) for split in ("train", "val")}
    assert sorted(decoded["train"] + decoded["val"]) == sorted(DOCS)
    assert all(is_subsequence(decoded[split], DOCS) for split in decoded)  # document order kept
    assert len(decoded["train"]) == train["documents"] and split_tokens(out, "val").size == val["tokens"]
    expected = [t for doc in decoded["train"] for t in [*tok.encode(doc), tok.eot_id]]
    assert split_tokens(out, "train").tolist() == expected  # same ids as Tokenizer.encode
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train_000.bin", "val_000.bin"]


def test_split_is_deterministic_and_depends_on_seed(tok: Tokenizer, corpus: Path, tmp_path: Path) -> None:
    runs = [
        prepare_shards(corpus, tok, tmp_path / name, val_fraction=0.3, seed=seed, num_workers=1, show_progress=False)
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    assert runs[0]["splits"] == runs[1]["splits"]
    assert dir_snapshot(tmp_path / "a") == dir_snapshot(tmp_path / "b")
    assert split_tokens(tmp_path / "a", "val").tolist() != split_tokens(tmp_path / "c", "val").tolist()


def test_small_shard_tokens_make_several_full_shards(tok: Tokenizer, corpus: Path, tmp_path: Path) -> None:
    meta = prepare_shards(corpus, tok, tmp_path / "s", shard_tokens=64, num_workers=1, show_progress=False)
    train = meta["splits"]["train"]
    assert len(train["files"]) > 3
    assert train["files"][:2] == ["train_000.bin", "train_001.bin"]
    assert all(n == 64 for n in train["file_tokens"][:-1]) and 0 < train["file_tokens"][-1] <= 64
    assert sum(train["file_tokens"]) == train["tokens"]


def test_multi_worker_output_equals_single_worker(
    tok: Tokenizer, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards, "_BATCH_CHARS", 300)  # many small tasks, so the pool really shares them
    contexts: list[str] = []
    get_context = shards.mp.get_context
    monkeypatch.setattr(shards.mp, "get_context", lambda method: contexts.append(method) or get_context(method))
    kwargs = {"val_fraction": 0.1, "shard_tokens": 100, "show_progress": False}
    one = prepare_shards(corpus, tok, tmp_path / "one", num_workers=1, **kwargs)
    assert contexts == []
    two = prepare_shards(corpus, tok, tmp_path / "two", num_workers=2, **kwargs)
    assert contexts == ["spawn"]  # a worker pool did the tokenizing
    assert one == two
    assert dir_snapshot(tmp_path / "one") == dir_snapshot(tmp_path / "two")


def test_uint32_when_vocab_does_not_fit_uint16(tok: Tokenizer, corpus: Path, tmp_path: Path) -> None:
    big = BigVocabTokenizer(tok)
    meta = prepare_shards(corpus, big, tmp_path / "big", num_workers=1, show_progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    total = meta["splits"]["train"]["tokens"]
    assert (tmp_path / "big" / "train_000.bin").stat().st_size == 4 * total
    prepare_shards(corpus, tok, tmp_path / "small", num_workers=1, show_progress=False)
    assert split_tokens(tmp_path / "big", "train").tolist() == split_tokens(tmp_path / "small", "train").tolist()
    assert TokenDataset(tmp_path / "big").dtype == np.dtype("<u4")


def test_uint16_with_big_vocab_is_a_config_error(tok: Tokenizer, corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        prepare_shards(corpus, BigVocabTokenizer(tok), tmp_path / "x", dtype="uint16", show_progress=False)
    message = str(excinfo.value)
    assert "dtype" in message and "70000" in message and "\n" not in message
    assert not (tmp_path / "x").exists()


def test_explicit_uint32_with_small_vocab(tok: Tokenizer, corpus: Path, tmp_path: Path) -> None:
    meta = prepare_shards(corpus, tok, tmp_path / "x", dtype="uint32", num_workers=1, show_progress=False)
    assert meta["dtype"] == "uint32"


@pytest.mark.parametrize(
    ("option", "field"),
    [({"dtype": "int8"}, "dtype"), ({"val_fraction": 0.0}, "val_fraction"), ({"shard_tokens": 0}, "shard_tokens")],
)
def test_bad_options(tok: Tokenizer, corpus: Path, tmp_path: Path, option: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}: "):
        prepare_shards(corpus, tok, tmp_path / "x", show_progress=False, **option)


def test_two_documents_always_give_a_val_document(tok: Tokenizer, tmp_path: Path) -> None:
    for seed in range(4):
        meta = prepare_shards(
            write_jsonl(tmp_path / "two.jsonl", ["first doc", "second doc"]),
            tok,
            tmp_path / f"out{seed}",
            val_fraction=0.01 if seed % 2 else 0.99,  # empty val, then empty train
            seed=seed,
            num_workers=1,
            show_progress=False,
        )
        assert meta["splits"]["train"]["documents"] == meta["splits"]["val"]["documents"] == 1
        docs = decode_docs(tok, split_tokens(tmp_path / f"out{seed}", "train"))
        docs += decode_docs(tok, split_tokens(tmp_path / f"out{seed}", "val"))
        assert sorted(docs) == ["first doc", "second doc"]


def test_moving_a_document_across_shard_files(tok: Tokenizer, tmp_path: Path) -> None:
    texts = ["short", "a much longer final document " * 5]
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    meta = prepare_shards(path, tok, tmp_path / "o", shard_tokens=4, num_workers=1, show_progress=False)
    val_docs = decode_docs(tok, split_tokens(tmp_path / "o", "val"))
    assert val_docs == [texts[1]]
    train = meta["splits"]["train"]
    assert train["file_tokens"] == [4, len(tok.encode("short")) + 1 - 4]  # the long document spanned many files
    assert sorted(p.name for p in (tmp_path / "o").glob("train_*.bin")) == train["files"]  # emptied ones removed


def test_single_document_is_a_data_error(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_text("just one document", encoding="utf-8")
    with pytest.raises(DataError, match="only 1 document; expected at least 2"):
        prepare_shards(path, tok, tmp_path / "o", show_progress=False)
    assert not (tmp_path / "o").exists()


def test_empty_data_is_a_data_error(tok: Tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "e.jsonl", ["", "   "])
    with pytest.raises(DataError, match=f"^{path}: no non-empty documents"):
        prepare_shards(path, tok, tmp_path / "o", show_progress=False)


def test_failure_keeps_the_previous_preparation(
    tok: Tokenizer, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "shards"
    prepare_shards(corpus, tok, out, shard_tokens=200, num_workers=1, show_progress=False)
    before = dir_snapshot(out)
    monkeypatch.setattr(shards, "_BATCH_CHARS", 200)  # shards are being written when the bad line comes
    bad = write_jsonl(tmp_path / "bad.jsonl", DOCS * 3, bad_line_at=170)
    for workers in (1, 2):
        with pytest.raises(DataError) as excinfo:
            prepare_shards(bad, tok, out, shard_tokens=50, num_workers=workers, show_progress=False)
        assert str(excinfo.value).startswith(f"{bad}:171: invalid JSON")
        assert dir_snapshot(out) == before  # no temporary folder left, old files untouched
    TokenDataset(out, expected_tokenizer_hash=tok.hash)


def test_replacing_a_preparation_removes_its_stale_shards(tok: Tokenizer, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    out.mkdir()
    (out / "README.txt").write_text("user file", encoding="utf-8")
    prepare_shards(corpus, tok, out, shard_tokens=50, num_workers=1, show_progress=False)
    assert len(list(out.glob("train_*.bin"))) > 3
    meta = prepare_shards(corpus, tok, out, num_workers=1, show_progress=False)
    expected = {"README.txt", "meta.json", *meta["splits"]["train"]["files"], *meta["splits"]["val"]["files"]}
    assert {p.name for p in out.iterdir()} == expected


def test_output_inside_the_source_directory_is_not_read(tok: Tokenizer, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "docs.jsonl", DOCS[:10])
    first = prepare_shards(data, tok, data / "shards", num_workers=1, show_progress=False)
    again = prepare_shards(data, tok, data / "shards", num_workers=1, show_progress=False)  # meta.json skipped
    assert first == again


def test_progress_bar_reports_bytes(tok: Tokenizer, corpus: Path, tmp_path: Path, capsys) -> None:
    prepare_shards(corpus, tok, tmp_path / "o", num_workers=1, show_progress=True)
    err = capsys.readouterr().err
    assert "tokenizing 1 file" in err and "100%" in err


# ---- reading ----------------------------------------------------------------------------------


def write_handmade(directory: Path, arrays: list[np.ndarray], dtype: str = "uint16", hash_: str = "h" * 64) -> None:
    """A shard directory with known token values, to check windows exactly."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for i, arr in enumerate(arrays):
        files.append(f"train_{i:03d}.bin")
        arr.astype("<u2" if dtype == "uint16" else "<u4").tofile(directory / files[-1])
    split = {"files": files, "file_tokens": [len(a) for a in arrays], "tokens": sum(map(len, arrays)), "documents": 1}
    meta = {
        "format": "chatforge-shards-v1",
        "tokenizer_hash": hash_,
        "vocab_size": 5000,
        "eot_id": 0,
        "dtype": dtype,
        "splits": {"train": split},
    }
    (directory / "meta.json").write_text(json.dumps(meta))


@pytest.fixture
def handmade(tmp_path: Path) -> TokenDataset:
    write_handmade(tmp_path / "h", [np.arange(0, 40), np.arange(1000, 1030)])
    return TokenDataset(tmp_path / "h")


def test_dataset_properties(handmade: TokenDataset) -> None:
    assert handmade.num_tokens == 70
    assert handmade.dtype == np.dtype("<u2") and handmade.vocab_size == 5000 and handmade.eot_id == 0


def test_sample_batch_shapes_shift_and_determinism(handmade: TokenDataset) -> None:
    x, y = handmade.sample_batch(np.random.default_rng([3, 7]), 16, 8)
    assert x.shape == y.shape == (16, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    again = handmade.sample_batch(np.random.default_rng([3, 7]), 16, 8)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    other, _ = handmade.sample_batch(np.random.default_rng([3, 8]), 16, 8)
    assert not torch.equal(x, other)


def test_windows_never_straddle_shards_and_follow_usable_length(handmade: TokenDataset) -> None:
    x, y = handmade.sample_batch(np.random.default_rng(0), 4000, 8)
    windows = torch.cat([x, y[:, -1:]], dim=1)
    steps = windows[:, 1:] - windows[:, :-1]
    assert bool((steps == 1).all())  # consecutive ids: one contiguous piece of one shard
    first_shard = windows[:, 0] < 1000
    assert bool((windows[first_shard] < 40).all()) and bool((windows[~first_shard] >= 1000).all())
    assert int(windows[~first_shard].max()) == 1029  # the last token of a shard can be reached
    assert abs(first_shard.float().mean().item() - 32 / 54) < 0.03  # 32 vs 22 window starts


def test_too_short_for_a_window(handmade: TokenDataset) -> None:
    with pytest.raises(DataError) as excinfo:
        handmade.sample_batch(np.random.default_rng(0), 2, 40)
    message = str(excinfo.value)
    assert "70 tokens (longest shard 40)" in message and "seq_len + 1 = 41" in message


def test_eval_batches_are_sequential_and_deterministic(handmade: TokenDataset) -> None:
    batches = list(handmade.iter_eval_batches(batch_size=3, seq_len=8))
    xs = torch.cat([x for x, _ in batches])
    # shard 0 (40 tokens) has 4 windows of 8 + 1, shard 1 (30 tokens) has 3; the last batch is partial
    assert [len(x) for x, _ in batches] == [3, 3, 1]
    assert xs[:, 0].tolist() == [0, 8, 16, 24, 1000, 1008, 1016]
    assert all(torch.equal(x[:, 1:], y[:, :-1]) for x, y in batches)
    assert torch.equal(batches[1][1][0], torch.arange(25, 33))
    limited = list(handmade.iter_eval_batches(batch_size=3, seq_len=8, max_batches=2))
    assert len(limited) == 2 and torch.equal(limited[1][0], batches[1][0])


def test_dataset_from_prepared_shards(tok: Tokenizer, corpus: Path, tmp_path: Path) -> None:
    prepare_shards(corpus, tok, tmp_path / "o", shard_tokens=80, num_workers=1, show_progress=False)
    ds = TokenDataset(tmp_path / "o", "val", expected_tokenizer_hash=tok.hash)
    assert ds.num_tokens == read_meta(tmp_path / "o")["splits"]["val"]["tokens"]
    x, y = TokenDataset(tmp_path / "o").sample_batch(np.random.default_rng(0), 4, 16)
    assert x.shape == (4, 16) and int(x.max()) < tok.vocab_size


def test_other_tokenizer_hash_is_a_data_error(tmp_path: Path) -> None:
    write_handmade(tmp_path / "h", [np.arange(20)], hash_="abc" * 20)
    with pytest.raises(DataError) as excinfo:
        TokenDataset(tmp_path / "h", expected_tokenizer_hash="def" * 20)
    message = str(excinfo.value)
    assert message.startswith(f"{tmp_path / 'h' / 'meta.json'}: shards were made by a different tokenizer")
    assert "abcabcabcabc" in message and "defdefdefdef" in message and "chatforge data prepare" in message


def test_missing_meta_says_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no meta.json here.*run `chatforge data prepare`"):
        TokenDataset(tmp_path)


def test_truncated_shard_and_unknown_split(tmp_path: Path) -> None:
    write_handmade(tmp_path / "h", [np.arange(20)])
    with pytest.raises(DataError, match="no split 'val'; expected one of train"):
        TokenDataset(tmp_path / "h", "val")
    with open(tmp_path / "h" / "train_000.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="train_000.bin: 10 bytes; expected 40 bytes"):
        TokenDataset(tmp_path / "h")
