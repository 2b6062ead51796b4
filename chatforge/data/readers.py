"""Readers for the text corpora users bring for pretraining.

Formats, chosen by file extension:

- plain text (``.txt``, ``.md``, ``.text`` and any explicitly named file with another extension):
  the whole file is one document. Files over about 1 MB are yielded in chunks of about 1 MB cut at
  line boundaries, so that a single big file still spreads over several tokenizer processes; each
  chunk then counts as a document (and is followed by an end-of-text token in the shards).
- JSON Lines (``.jsonl``, and ``.json`` unless it holds a JSON array): one document per line, taken
  from a string field (``"text"`` by default); blank lines are skipped.
- a ``.json`` file whose content is a JSON array of objects: one document per element.
- Parquet (``.parquet``): one document per row of a string column (``"text"`` by default).

Documents with no non-whitespace character are skipped. Every problem a user can cause raises
``DataError`` with one line naming the file (and line, item or column) and what was expected.

``iter_jsonl`` is the shared JSON Lines reader; the chat, preference and prompt readers build on it.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from chatforge.errors import DataError

T = TypeVar("T")

TEXT_SUFFIXES = frozenset({".txt", ".md", ".text"})
JSONL_SUFFIXES = frozenset({".jsonl", ".json"})
PARQUET_SUFFIXES = frozenset({".parquet"})
KNOWN_SUFFIXES = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES

#: Plain-text files are cut into documents of about this many bytes (at line boundaries).
TEXT_CHUNK_BYTES = 1 << 20
_PARQUET_BATCH_ROWS = 1024
_GLOB_CHARS = frozenset("*?[")

Sources = str | Path | Sequence[str | Path]


def expand_paths(sources: Sources) -> list[Path]:
    """Turn files, directories (searched recursively) and glob patterns into a list of files.

    Directories contribute their files with a known extension, sorted, skipping hidden names. Order
    follows ``sources``; a file reached twice is listed once.
    """
    items = [sources] if isinstance(sources, str | Path) else list(sources)
    if not items:
        raise DataError("no data sources given; expected files, directories or glob patterns")
    found: dict[Path, None] = {}  # an ordered set
    for item in items:
        for path in _expand_one(item):
            found.setdefault(path, None)
    return list(found)


def _expand_one(item: str | Path) -> list[Path]:
    path = Path(item).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = _files_in_dir(path)
        if not files:
            raise DataError(f"{path}: directory has no data files; expected {_known_suffixes_text()}")
        return files
    if _GLOB_CHARS & set(str(item)):
        matches = sorted(glob.glob(str(path), recursive=True))
        files = [f for m in matches for f in (_files_in_dir(Path(m)) if Path(m).is_dir() else [Path(m)])]
        if not files:
            raise DataError(f"{item}: pattern matched no data files; expected {_known_suffixes_text()}")
        return files
    raise DataError(f"{path}: no such file or directory; expected a data file, directory or glob pattern")


def _files_in_dir(directory: Path) -> list[Path]:
    # Hidden files and folders (.git, editor swap files, temporary output) are never data.
    return sorted(
        p
        for p in directory.rglob("*")
        if p.suffix.lower() in KNOWN_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def _known_suffixes_text() -> str:
    return "files ending in " + ", ".join(sorted(KNOWN_SUFFIXES))


def iter_documents(sources: Sources, text_field: str = "text") -> Iterator[str]:
    """Yield every non-empty document of ``sources`` in order; no document at all is a DataError."""
    paths = expand_paths(sources)
    empty = True
    for path in paths:
        for doc in iter_file_documents(path, text_field):
            empty = False
            yield doc
    if empty:
        raise DataError(empty_data_message(paths, text_field))


def empty_data_message(paths: Sequence[Path], text_field: str = "text") -> str:
    """The one-line error for sources that hold no non-empty document."""
    expected = f"text, or records with a non-empty string field {text_field!r}"
    return f"{describe_paths(paths)}: no non-empty documents found; expected {expected}"


def describe_paths(paths: Sequence[Path]) -> str:
    """Name a list of files in an error message: the file itself, or how many and the first."""
    return str(paths[0]) if len(paths) == 1 else f"{len(paths)} files ({paths[0]}, ...)"


def iter_file_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield the non-empty documents of one file, reading it by its extension (see module doc)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in PARQUET_SUFFIXES:
            docs = _iter_parquet(path, text_field)
        elif suffix in JSONL_SUFFIXES:
            docs = _iter_jsonl_texts(path, text_field)
        else:
            docs = iter_text_chunks(path)
        for doc in docs:
            if doc and not doc.isspace():
                yield doc
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from e


def iter_text_chunks(path: Path, chunk_bytes: int = TEXT_CHUNK_BYTES) -> Iterator[str]:
    """Yield a UTF-8 text file in pieces of about ``chunk_bytes``, each ending at a line end."""
    lines: list[bytes] = []
    size = 0
    first_line = 1  # line number where the current chunk starts, for decode errors
    with open(path, "rb") as f:
        for line in f:
            lines.append(line)
            size += len(line)
            if size >= chunk_bytes:
                yield _decode_chunk(path, b"".join(lines), first_line)
                first_line += len(lines)
                lines, size = [], 0
    if lines:
        yield _decode_chunk(path, b"".join(lines), first_line)


def _decode_chunk(path: Path, data: bytes, first_line: int) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        raise DataError(f"{path}:{line}: invalid UTF-8 byte; expected UTF-8 text") from e
    return text.removeprefix("\ufeff") if first_line == 1 else text


def iter_jsonl(path: str | Path, expected: str = "a JSON object") -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON Lines file.

    A ``.json`` file that holds a JSON array is read whole instead, yielding ``(item_number, object)``
    (1-based). A line or item that is not a JSON object raises DataError naming the file, the line
    (or item) and ``expected``, the description of a valid record that callers pass in.
    """
    path = Path(path)
    if path.suffix.lower() == ".json" and is_json_array_file(path):
        yield from _iter_json_array(path, expected)
        return
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno}); expected {expected}"
                ) from e
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: invalid UTF-8 byte; expected {expected}") from e
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{number}: got a JSON {json_type(obj)}; expected {expected}")
            yield number, obj


def hold_out(items: list[T], fraction: float, seed: list[int], what: str) -> tuple[list[T], list[T]]:
    """Split items into (kept, held out): a seeded `fraction` (at least 1, never all) held out.

    `what` names the records in the error, e.g. "sft: conversations".
    """
    stage, _, records = what.partition(": ")
    if len(items) < 2:
        raise DataError(f"{stage}: need at least 2 {records} to hold some out for validation (or pass --val)")
    n_val = min(len(items) - 1, max(1, round(len(items) * fraction)))
    held = set(np.random.default_rng(seed).permutation(len(items))[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def is_json_array_file(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def read_json_array(path: Path, expected: str) -> Any:
    """The parsed content of a .json file that holds an array; DataError naming the file if it does not parse."""
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "invalid UTF-8"
        raise DataError(f"{path}: invalid JSON ({where}); expected a JSON array of {expected}") from e


def _iter_json_array(path: Path, expected: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, obj in enumerate(read_json_array(path, expected), start=1):
        if not isinstance(obj, dict):
            raise DataError(f"{path}: item {number}: got a JSON {json_type(obj)}; expected {expected}")
        yield number, obj


def json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _iter_jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    expected = f"a JSON object with a string field {text_field!r}"
    for number, obj in iter_jsonl(path, expected):
        if text_field not in obj:
            keys = ", ".join(list(obj)[:8]) or "none"
            raise DataError(f"{path}:{number}: field {text_field!r} is missing (keys: {keys}); expected {expected}")
        value = obj[text_field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{number}: field {text_field!r} is a JSON {json_type(value)}; expected {expected}")
        yield value


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa  # imported here: pyarrow is slow to import and only Parquet needs it
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, ValueError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: not a readable Parquet file ({first_line})") from e
    schema = pf.schema_arrow
    if text_field not in schema.names:
        columns = ", ".join(schema.names) or "none"
        raise DataError(
            f"{path}: no column {text_field!r} (columns: {columns}); expected a string column {text_field!r}"
        )
    column_type = schema.field(text_field).type
    string_checks = (pa.types.is_string, pa.types.is_large_string, getattr(pa.types, "is_string_view", None))
    if not any(check(column_type) for check in string_checks if check is not None):
        raise DataError(f"{path}: column {text_field!r} has type {column_type}; expected a string column")
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield value
