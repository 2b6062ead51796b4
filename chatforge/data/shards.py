"""Token shards: tokenize a corpus once into flat arrays on disk, then sample training batches by memmap.

A prepared directory holds ``train_000.bin``, ``train_001.bin``, ..., ``val_000.bin``, ... (flat
little-endian token ids, uint16 when the vocabulary fits, else uint32) and ``meta.json``::

    {"format": "chatforge-shards-v1", "tokenizer_hash": ..., "vocab_size": ..., "eot_id": ...,
     "dtype": "uint16", "splits": {"train": {"files": [...], "file_tokens": [...], "tokens": N,
     "documents": D}, "val": {...}}, ...}

Every document is followed by the tokenizer's end-of-text token. A document goes to the val split
when a hash of (seed, document index) falls below ``val_fraction``, so the split does not depend on
the number of worker processes. Documents may continue from one shard file into the next; batch
windows never cross files.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from itertools import chain, islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from tqdm import tqdm

from chatforge.data.readers import Sources, describe_paths, empty_data_message, expand_paths, iter_file_documents
from chatforge.errors import ConfigError, DataError
from chatforge.files import strict_json

if TYPE_CHECKING:  # torch is imported lazily: spawned tokenizer workers import this module and never need it
    import torch

FORMAT = "chatforge-shards-v1"
META_NAME = "meta.json"
SPLITS = ("train", "val")
DTYPES = ("auto", "uint16", "uint32")
UINT16_MAX_VOCAB = 1 << 16
_BATCH_CHARS = 1 << 20  # text characters per tokenizer task: big enough to amortize inter-process transfer
_PREPARE_HINT = "run `chatforge data prepare`"


class ShardTokenizer(Protocol):
    """What shard preparation needs from a tokenizer (chatforge.tokenizer.Tokenizer provides it)."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def eot_id(self) -> int: ...
    @property
    def hash(self) -> str: ...
    def to_json_str(self) -> str: ...


def resolve_dtype(dtype: str, vocab_size: int) -> np.dtype:
    """The little-endian shard dtype for ``dtype`` ("auto", "uint16" or "uint32") and a vocabulary size."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: got {dtype!r}; expected one of {', '.join(DTYPES)}")
    if dtype == "auto":
        dtype = "uint16" if vocab_size <= UINT16_MAX_VOCAB else "uint32"
    if dtype == "uint16" and vocab_size > UINT16_MAX_VOCAB:
        raise ConfigError(
            f"dtype: 'uint16' holds token ids of vocabularies up to {UINT16_MAX_VOCAB}, but the tokenizer has "
            f"{vocab_size}; expected dtype 'uint32' or 'auto'"
        )
    return np.dtype("<u2" if dtype == "uint16" else "<u4")


# ---------------------------------------------------------------------------------------------------------
# Tokenizing, in this process or in a pool of worker processes


EncoderSpec = tuple[Any, str]  # (tokenizer class with from_json_str, or None; tokenizer JSON)


def _encoder_spec(tokenizer: ShardTokenizer) -> EncoderSpec:
    """What a worker needs to rebuild the tokenizer: its JSON, since tokenizer objects may not pickle."""
    cls = type(tokenizer)
    return (cls if hasattr(cls, "from_json_str") else None, tokenizer.to_json_str())


def _build_encoder(spec: EncoderSpec) -> Callable[[list[str]], list[list[int]]]:
    """Rebuild a batch encoder from ``_encoder_spec``; the one place a tokenizer is rebuilt from JSON.

    The tokenizer's own class is used when it offers ``from_json_str``; otherwise the Hugging Face
    tokenizer, set up like ``Tokenizer.encode_batch(allow_special=False)``: a special-token string in
    a document is encoded as plain text, so corpus text cannot inject an end-of-text token.
    """
    cls, json_str = spec
    if cls is not None:
        return cls.from_json_str(json_str).encode_batch
    import tokenizers

    hf = tokenizers.Tokenizer.from_str(json_str)
    hf.encode_special_tokens = True
    batch = getattr(hf, "encode_batch_fast", hf.encode_batch)  # the fast one skips offsets; older versions lack it
    return lambda texts: [e.ids for e in batch(texts, add_special_tokens=False)]


def _encode_docs(
    encode: Callable[[list[str]], list[list[int]]], docs: list[str], eot_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Encode documents, each followed by ``eot_id``: (all token ids as int64, tokens per document)."""
    ids = encode(docs) if docs else []
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = chain.from_iterable(chain(x, (eot_id,)) for x in ids)
    return np.fromiter(flat, dtype=np.int64, count=int(lengths.sum())), lengths


_worker: dict[str, Any] = {}


def _init_worker(spec: EncoderSpec, eot_id: int, threads: int) -> None:
    # Share the cores between workers: each tokenizer's own thread pool would otherwise use all of them.
    # Set before the tokenizer first runs, since its thread pool reads this once.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    if threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker["encode"] = _build_encoder(spec)
    _worker["eot_id"] = eot_id


def _encode_in_worker(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode_docs(_worker["encode"], docs, _worker["eot_id"])


def _read_batches(paths: Sequence[Path], text_field: str) -> Iterator[tuple[list[str], int]]:
    """Group documents into tokenizer tasks; each comes with how many input bytes it finishes.

    Byte progress is estimated from text length and settled at each file's end, so the bar's total
    (the sum of file sizes) gives a real ETA.
    """
    docs: list[str] = []
    chars = progress = 0
    for path in paths:
        size, done = path.stat().st_size, 0
        for doc in iter_file_documents(path, text_field):
            step = min(len(doc), size - done)
            done, progress = done + step, progress + step
            docs.append(doc)
            chars += len(doc)
            if chars >= _BATCH_CHARS:
                yield docs, progress
                docs, chars, progress = [], 0, 0
        progress += size - done
    if docs or progress:
        yield docs, progress


def _tokenize(
    batches: Iterator[tuple[list[str], int]], spec: EncoderSpec, eot_id: int, num_workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Yield (tokens, lengths, progress bytes) per batch, in input order."""
    # Starting processes (each imports the main module again) costs seconds; worth it for big inputs only.
    head = list(islice(batches, 2 * num_workers)) if num_workers > 1 else []
    batches = chain(head, batches)
    if len(head) < 2 * num_workers:
        encode = _build_encoder(spec)
        for docs, progress in batches:
            yield (*_encode_docs(encode, docs, eot_id), progress)
        return
    # spawn, not fork: forking after the tokenizer (or torch) started threads can deadlock.
    threads = max(1, (os.cpu_count() or 1) // num_workers)
    with mp.get_context("spawn").Pool(num_workers, _init_worker, (spec, eot_id, threads)) as pool:
        pending: deque = deque()  # bounded, so a big corpus is never read into memory ahead of the workers
        for docs, progress in batches:
            pending.append((pool.apply_async(_encode_in_worker, (docs,)), progress))
            if len(pending) >= 2 * num_workers:
                result, done = pending.popleft()
                yield (*result.get(), done)
        while pending:
            result, done = pending.popleft()
            yield (*result.get(), done)


# ---------------------------------------------------------------------------------------------------------
# Writing


def _is_val(seed: int, doc_index: np.ndarray, val_fraction: float) -> np.ndarray:
    """Deterministic per-document coin flips: splitmix64 of (seed, index) mapped to [0, 1)."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps on purpose
        x = doc_index.astype(np.uint64) + np.uint64((seed + 1) % (1 << 64)) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53 < val_fraction


class _ShardWriter:
    """Appends one split's tokens to ``<split>_000.bin``, ``<split>_001.bin``, ... of at most shard_tokens."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.files: list[str] = []
        self.file_tokens: list[int] = []
        self.documents = 0
        self.last_doc = np.empty(0, dtype=np.int64)  # kept so it can be moved to the other split
        self._f = None

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if not self.files or self.file_tokens[-1] >= self.shard_tokens:
                self.close()
                self.files.append(f"{self.split}_{len(self.files):03d}.bin")
                self.file_tokens.append(0)
            if self._f is None:
                # stays open across write() calls; close() and drop_tail() close it
                self._f = open(self.directory / self.files[-1], "ab")  # noqa: SIM115
            piece = tokens[: self.shard_tokens - self.file_tokens[-1]]
            self._f.write(piece.astype(self.dtype).tobytes())
            self.file_tokens[-1] += piece.size
            tokens = tokens[piece.size :]

    def drop_tail(self, n: int) -> None:
        """Remove the last ``n`` tokens written, deleting files that become empty."""
        self.close()
        while n > 0:
            path, count = self.directory / self.files[-1], self.file_tokens[-1]
            if count <= n:
                path.unlink()
                self.files.pop()
                self.file_tokens.pop()
            else:
                with open(path, "r+b") as f:
                    f.truncate((count - n) * self.dtype.itemsize)
                self.file_tokens[-1] = count - n
            n -= min(n, count)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def summary(self) -> dict[str, Any]:
        tokens = sum(self.file_tokens)
        return {"files": self.files, "file_tokens": self.file_tokens, "tokens": tokens, "documents": self.documents}


def _write_split_tokens(
    writers: dict[str, _ShardWriter], tokens: np.ndarray, lengths: np.ndarray, is_val: np.ndarray
) -> None:
    """Route one tokenized batch to the train and val writers."""
    starts = np.cumsum(lengths) - lengths
    token_is_val = np.repeat(is_val, lengths)
    for split, doc_mask, token_mask in (("train", ~is_val, ~token_is_val), ("val", is_val, token_is_val)):
        chosen = np.flatnonzero(doc_mask)
        if chosen.size == 0:
            continue
        writer = writers[split]
        writer.write(tokens[token_mask])
        writer.documents += chosen.size
        last = chosen[-1]
        writer.last_doc = tokens[starts[last] : starts[last] + lengths[last]].copy()


def _balance_splits(writers: dict[str, _ShardWriter], where: str) -> None:
    """Make sure both splits have a document, moving the last one across when one split is empty."""
    train, val = writers["train"], writers["val"]
    total = train.documents + val.documents
    if min(train.documents, val.documents) > 0:
        return
    if total < 2:
        raise DataError(f"{where}: found only 1 document; expected at least 2 to make a train and a val split")
    src, dst = (train, val) if val.documents == 0 else (val, train)
    doc = src.last_doc
    src.drop_tail(doc.size)
    src.documents -= 1
    dst.write(doc)
    dst.documents += 1


def _check_ids(tokens: np.ndarray, vocab_size: int) -> None:
    # A tokenizer emitting ids outside its vocabulary would silently wrap around in the shard dtype.
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise DataError(
            f"tokenizer produced token id {int(tokens.max())} outside its vocabulary of {vocab_size}; "
            "expected ids below vocab_size"
        )


def _validate_options(val_fraction: float, shard_tokens: int) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction: got {val_fraction}; expected a number between 0 and 1 (exclusive)")
    if shard_tokens < 1:
        raise ConfigError(f"shard_tokens: got {shard_tokens}; expected a positive number of tokens per shard")


def _is_within(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


def prepare_shards(
    sources: Sources,
    tokenizer: ShardTokenizer,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.01,
    shard_tokens: int = 50_000_000,
    num_workers: int | None = None,
    seed: int = 0,
    text_field: str = "text",
    dtype: str = "auto",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``sources`` into train/val shards plus ``meta.json`` in ``out_dir``; return the meta.

    Everything is written to a temporary folder inside ``out_dir`` first and moved into place only
    when complete, so a failure (a malformed line late in the input, Ctrl-C) leaves a previously
    prepared ``out_dir`` as it was. ``num_workers`` defaults to min(4, CPU count); 1 tokenizes in this
    process. Workers are spawned, so they import the main module again: a script that calls this with
    several workers needs the usual ``if __name__ == "__main__":`` guard.
    """
    np_dtype = resolve_dtype(dtype, tokenizer.vocab_size)
    _validate_options(val_fraction, shard_tokens)
    out_dir = Path(out_dir)
    paths = [p for p in expand_paths(sources) if not _is_within(p, out_dir)]
    if not paths:
        raise DataError(f"{out_dir}: the only data files found are inside the output directory")
    workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir))
    try:
        writers = {split: _ShardWriter(tmp, split, np_dtype, shard_tokens) for split in SPLITS}
        _write_all(paths, tokenizer, writers, workers, seed, val_fraction, text_field, show_progress)
        for writer in writers.values():
            writer.close()
        meta = {
            "format": FORMAT,
            "tokenizer_hash": tokenizer.hash,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "dtype": "uint16" if np_dtype.itemsize == 2 else "uint32",
            "seed": seed,
            "val_fraction": val_fraction,
            "text_field": text_field,
            "sources": [str(p) for p in paths],
            "splits": {split: writer.summary() for split, writer in writers.items()},
        }
        (tmp / META_NAME).write_text(strict_json(meta, indent=2) + "\n")
        _commit(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()  # do not leave an empty folder behind after a failure
    return meta


def _write_all(
    paths: Sequence[Path],
    tokenizer: ShardTokenizer,
    writers: dict[str, _ShardWriter],
    num_workers: int,
    seed: int,
    val_fraction: float,
    text_field: str,
    show_progress: bool,
) -> None:
    """Read, tokenize and write every document, with a progress bar over input bytes."""
    total_bytes = sum(p.stat().st_size for p in paths)
    desc = f"tokenizing {len(paths)} file{'s' * (len(paths) != 1)}"
    doc_index = 0
    batches = _read_batches(paths, text_field)
    results = _tokenize(batches, _encoder_spec(tokenizer), tokenizer.eot_id, num_workers)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not show_progress)
    # closing() stops the worker pool at once when writing fails, instead of whenever the generator is collected
    with closing(results), bar:
        for tokens, lengths, progress in results:
            _check_ids(tokens, tokenizer.vocab_size)
            is_val = _is_val(seed, np.arange(doc_index, doc_index + lengths.size), val_fraction)
            _write_split_tokens(writers, tokens, lengths, is_val)
            doc_index += lengths.size
            bar.set_postfix(docs=doc_index, tokens=sum(sum(w.file_tokens) for w in writers.values()), refresh=False)
            bar.update(progress)
    if doc_index == 0:
        raise DataError(empty_data_message(paths, text_field))
    _balance_splits(writers, describe_paths(paths))


def _commit(tmp: Path, out_dir: Path) -> None:
    """Move a finished preparation from ``tmp`` into ``out_dir``, replacing an earlier one.

    The old meta.json goes first: while shard files are swapped a reader sees "no meta.json" (a clear
    error) rather than a meta.json that does not describe the files next to it. Files of the old
    preparation that the new one does not reuse are deleted last; nothing else in out_dir is touched.
    """
    meta_path = out_dir / META_NAME
    old_files = _listed_files(meta_path)
    meta_path.unlink(missing_ok=True)
    new_meta = json.loads((tmp / META_NAME).read_text())
    new_files = {name for split in new_meta["splits"].values() for name in split["files"]}
    for name in sorted(new_files):
        os.replace(tmp / name, out_dir / name)
    os.replace(tmp / META_NAME, meta_path)
    for name in old_files - new_files:
        (out_dir / name).unlink(missing_ok=True)


def _listed_files(meta_path: Path) -> set[str]:
    """Shard file names an existing meta.json lists (none when it is missing or unreadable)."""
    try:
        splits = json.loads(meta_path.read_text())["splits"]
        return {Path(name).name for split in splits.values() for name in split["files"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


# ---------------------------------------------------------------------------------------------------------
# Reading


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """Load and check ``meta.json`` of a prepared shard directory."""
    path = Path(data_dir) / META_NAME
    if not path.is_file():
        raise DataError(f"{data_dir}: no {META_NAME} here; expected prepared token shards ({_PREPARE_HINT} first)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read ({e}); expected the JSON written by `chatforge data prepare`") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise DataError(f"{path}: format is {found!r}; expected {FORMAT!r} ({_PREPARE_HINT} again)")
    return meta


class TokenDataset:
    """One split of a prepared shard directory, memory-mapped read-only, for sampling token windows."""

    def __init__(self, data_dir: str | Path, split: str = "train", expected_tokenizer_hash: str | None = None):
        self.data_dir = Path(data_dir)
        self.split = split
        self.meta = read_meta(self.data_dir)
        meta_path = self.data_dir / META_NAME
        found = self.meta.get("tokenizer_hash", "")
        if expected_tokenizer_hash is not None and found != expected_tokenizer_hash:
            raise DataError(
                f"{meta_path}: shards were made by a different tokenizer (hash {found[:12]}…, expected "
                f"{expected_tokenizer_hash[:12]}…); re-run `chatforge data prepare` with this tokenizer"
            )
        if split not in self.meta["splits"]:
            raise DataError(f"{meta_path}: no split {split!r}; expected one of {', '.join(self.meta['splits'])}")
        self._dtype = np.dtype("<u2" if self.meta["dtype"] == "uint16" else "<u4")
        info = self.meta["splits"][split]
        self.shards = [self._open(name, count) for name, count in zip(info["files"], info["file_tokens"], strict=True)]

    def _open(self, name: str, count: int) -> np.memmap:
        path = self.data_dir / name
        expected = count * self._dtype.itemsize
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            found = "missing" if size is None else f"{size} bytes"
            raise DataError(f"{path}: {found}; expected {expected} bytes as meta.json says ({_PREPARE_HINT} again)")
        return np.memmap(path, dtype=self._dtype, mode="r")

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.shards)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.meta["eot_id"])

    def _check_window(self, batch_size: int, seq_len: int) -> np.ndarray:
        """Number of window starts per shard; DataError when no shard holds one window."""
        if batch_size < 1 or seq_len < 1:
            raise ConfigError(f"batch_size and seq_len: got {batch_size} and {seq_len}; expected positive numbers")
        usable = np.array([max(len(s) - seq_len, 0) for s in self.shards], dtype=np.int64)
        if usable.sum() == 0:
            longest = max((len(s) for s in self.shards), default=0)
            raise DataError(
                f"{self.data_dir}: the {self.split} split has {self.num_tokens} tokens (longest shard {longest}); "
                f"expected at least seq_len + 1 = {seq_len + 1} in one shard"
            )
        return usable

    def sample_batch(
        self, rng: np.random.Generator, batch_size: int, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows of seq_len + 1 tokens as int64 (x, y) of shape (batch_size, seq_len), y = x shifted.

        Depends only on ``rng``: every window start is equally likely, so a shard is chosen in
        proportion to its usable length, and a window never crosses from one file into the next.
        """
        import torch

        usable = self._check_window(batch_size, seq_len)
        ends = np.cumsum(usable)
        pos = rng.integers(0, ends[-1], size=batch_size)
        shard = np.searchsorted(ends, pos, side="right")
        offset = pos - (ends[shard] - usable[shard])
        buf = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        for row, (s, o) in enumerate(zip(shard, offset, strict=True)):
            buf[row] = self.shards[s][o : o + seq_len + 1]
        return torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())

    def iter_eval_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows from the start of each shard, in order; the last batch may be smaller."""
        import torch

        self._check_window(batch_size, seq_len)
        rows: list[np.ndarray] = []
        produced = 0
        for shard in self.shards:
            for start in range(0, len(shard) - seq_len, seq_len):
                if max_batches is not None and produced >= max_batches:
                    return
                rows.append(np.asarray(shard[start : start + seq_len + 1], dtype=np.int64))
                if len(rows) == batch_size:
                    buf = np.stack(rows)
                    rows, produced = [], produced + 1
                    yield torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())
        if rows and (max_batches is None or produced < max_batches):
            buf = np.stack(rows)
            yield torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())
