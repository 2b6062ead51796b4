"""Byte-level BPE tokenizer with reserved chat special tokens.

A thin wrapper around a Hugging Face `tokenizers` object, stored as one `tokenizer.json`.
Byte-level pre-tokenization and decoding with no normalizer make `decode(encode(s)) == s`
for every string. Special-token strings typed by a user are encoded as ordinary text unless
the caller opts in, so user text cannot inject control tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from chatforge.errors import CheckpointError, ConfigError, DataError
from chatforge.files import atomic_write_text

SPECIAL_TOKENS: dict[str, str] = {
    "eot": "<|endoftext|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end_turn": "<|end|>",
    "tool_call": "<|tool_call|>",
    "tool_result": "<|tool_result|>",
}

TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


_CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}


def _byte_level_backend(model: models.Model) -> tokenizers.Tokenizer:
    """A backend with GPT-2 byte-level pre-tokenizer and decoder and no normalizer (lossless)."""
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_level_problem(backend: tokenizers.Tokenizer) -> str | None:
    """Why `backend` cannot be wrapped (token_bytes and lossless decode need byte-level BPE), or None."""
    config = json.loads(backend.to_str())
    model_type = (config.get("model") or {}).get("type")
    decoder_type = (config.get("decoder") or {}).get("type")
    if model_type != "BPE" or decoder_type != "ByteLevel":
        return f"expected a byte-level BPE tokenizer, got model {model_type!r} with decoder {decoder_type!r}"
    return None


def _add_missing_specials(backend: tokenizers.Tokenizer) -> None:
    """Register every chat special token; one already in the vocab (GPT-2's eot) keeps its id."""
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in SPECIAL_TOKENS.values()])


def _check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size: got {vocab_size}, expected at least {MIN_VOCAB_SIZE} "
            f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)"
        )


def _file_lines(path: Path) -> Iterator[str]:
    """Lines of a UTF-8 text file, newlines kept; undecodable bytes become a DataError."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            yield from f
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start})") from e


class _CountingCorpus:
    """Chains texts and file lines while counting characters, to detect an empty corpus."""

    def __init__(self, texts: Iterable[str] | None, files: Sequence[Path]) -> None:
        self.texts = [texts] if isinstance(texts, str) else texts  # a lone str is one document
        self.files = files
        self.chars = 0

    def __iter__(self) -> Iterator[str]:
        for text in self._all():
            self.chars += len(text)
            yield text

    def _all(self) -> Iterator[str]:
        if self.texts is not None:
            yield from self.texts
        for path in self.files:
            yield from _file_lines(path)


def _check_files(files: Sequence[str | Path]) -> list[Path]:
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: training file not found; expected a UTF-8 text file")
    return paths


class Tokenizer:
    """Byte-level BPE tokenizer with the chat special tokens of SPECIAL_TOKENS."""

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        problem = _byte_level_problem(backend)
        if problem:
            raise ValueError(problem)
        # Work on a copy: we add specials and must not change the caller's object.
        self._backend = tokenizers.Tokenizer.from_str(backend.to_str())
        _add_missing_specials(self._backend)
        # A second backend that splits special strings as text, instead of toggling
        # `encode_special_tokens` per call, which would race between threads.
        self._literal = tokenizers.Tokenizer.from_str(self._backend.to_str())
        self._literal.encode_special_tokens = True
        self._special_ids = {name: self._backend.token_to_id(tok) for name, tok in SPECIAL_TOKENS.items()}
        self._check_special_ids()
        self._vocab_size = max(self._backend.get_vocab(with_added_tokens=True).values()) + 1
        self._added_ids = set(self._backend.get_added_tokens_decoder())
        self._bytes_table: list[bytes] | None = None
        self._hash: str | None = None

    def _check_special_ids(self) -> None:
        # A vocab with id gaps can make a new added token reuse an existing id; refuse that.
        for name, tid in self._special_ids.items():
            if tid is None or self._backend.id_to_token(tid) != SPECIAL_TOKENS[name]:
                raise ValueError(f"special token {SPECIAL_TOKENS[name]!r} has no unique id")

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Iterable[str] | None = None,
        files: Sequence[str | Path] | None = None,
        vocab_size: int = 4096,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> Tokenizer:
        """Train byte-level BPE on texts and/or UTF-8 files; specials get ids 0..6."""
        _check_vocab_size(vocab_size)
        if texts is None and not files:
            raise DataError("tokenizer training: no text given; pass texts or files")
        corpus = _CountingCorpus(texts, _check_files(files or []))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
            show_progress=show_progress,
        )
        backend = _byte_level_backend(models.BPE())
        backend.train_from_iterator(corpus, trainer=trainer)
        if corpus.chars == 0:
            raise DataError("tokenizer training: the corpus is empty; expected at least one non-empty text")
        return cls(backend)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json file, or the tokenizer.json inside a directory."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"{file}: not found; expected a {TOKENIZER_FILE} file or a directory with one")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise CheckpointError(f"{file}: not a valid {TOKENIZER_FILE} ({e})") from e
        return cls._wrap(backend, str(file))

    @classmethod
    def from_gpt2_files(cls, vocab_json: str | Path, merges_txt: str | Path) -> Tokenizer:
        """Load GPT-2 style vocab.json + merges.txt; its <|endoftext|> is reused as eot."""
        for file in (Path(vocab_json), Path(merges_txt)):
            if not file.is_file():
                raise CheckpointError(f"{file}: not found; expected GPT-2 vocab.json and merges.txt files")
        try:
            model = models.BPE.from_file(str(vocab_json), str(merges_txt))
        except Exception as e:
            raise CheckpointError(
                f"{vocab_json}, {merges_txt}: not a valid GPT-2 vocab.json + merges.txt pair ({e})"
            ) from e
        return cls._wrap(_byte_level_backend(model), f"{vocab_json}, {merges_txt}")

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> Tokenizer:
        """Load from a Hugging Face model directory: tokenizer.json, else vocab.json + merges.txt."""
        path = Path(path)
        if (path / TOKENIZER_FILE).is_file():
            return cls.from_file(path / TOKENIZER_FILE)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return cls.from_gpt2_files(path / "vocab.json", path / "merges.txt")
        raise CheckpointError(f"{path}: expected a directory with {TOKENIZER_FILE} or vocab.json + merges.txt")

    @classmethod
    def _wrap(cls, backend: tokenizers.Tokenizer, source: str) -> Tokenizer:
        try:
            return cls(backend)
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from e

    # ---- persistence --------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json atomically to a .json path or into a directory; return the file."""
        path = Path(path)
        file = path if path.suffix == ".json" and not path.is_dir() else path / TOKENIZER_FILE
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(file, self.to_json_str())
        return file

    def to_json_str(self) -> str:
        """The tokenizer.json content (loadable by `tokenizers` and transformers)."""
        return self._backend.to_str(pretty=True)

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON: equal for identical tokenizers, different otherwise."""
        if self._hash is None:
            canonical = json.dumps(
                json.loads(self._backend.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False
            )
            self._hash = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        return self._hash

    # ---- encoding -----------------------------------------------------------------------

    def _encoder(self, allow_special: bool) -> tokenizers.Tokenizer:
        return self._backend if allow_special else self._literal

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of text; special strings become special ids only with allow_special=True."""
        return self._encoder(allow_special).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        """encode() for many texts at once, in parallel on the Rust side."""
        backend = self._encoder(allow_special)
        # encode_batch_fast skips offset tracking; older `tokenizers` lack it.
        batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ids; incomplete UTF-8 at the ends becomes U+FFFD (use token_bytes to stream)."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for; a special token gives its UTF-8 string."""
        if self._bytes_table is None:
            self._bytes_table = [self._bytes_of(i) for i in range(self._vocab_size)]
        if not 0 <= token_id < self._vocab_size:
            raise ValueError(f"token id {token_id} out of range [0, {self._vocab_size})")
        return self._bytes_table[token_id]

    def _bytes_of(self, token_id: int) -> bytes:
        token = self._backend.id_to_token(token_id)
        if token is None:  # an id gap in a foreign vocab: stands for nothing
            return b""
        if token_id in self._added_ids:
            return token.encode("utf-8")
        if all(c in _CHAR_TO_BYTE for c in token):
            return bytes(_CHAR_TO_BYTE[c] for c in token)
        return token.encode("utf-8")  # same fallback as the ByteLevel decoder

    # ---- vocabulary ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids (max id + 1), special tokens included."""
        return self._vocab_size

    @property
    def special_ids(self) -> dict[str, int]:
        """Special token name (key of SPECIAL_TOKENS) -> id."""
        return dict(self._special_ids)

    @property
    def eot_id(self) -> int:
        return self._special_ids["eot"]

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers` object (treat as read-only)."""
        return self._backend

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self._vocab_size}, hash={self.hash[:12]})"
