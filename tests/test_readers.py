"""Tests for chatforge.data.readers: text, JSONL, JSON arrays, Parquet, directories, globs, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatforge.data.readers import (
    expand_paths,
    iter_documents,
    iter_file_documents,
    iter_jsonl,
    iter_text_chunks,
)
from chatforge.errors import DataError


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    """Write rows as JSON Lines; raw_lines maps a 0-based position to a literal line to insert."""
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    for pos, raw in sorted((raw_lines or {}).items()):
        lines.insert(pos, raw)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=2)  # several row groups and batches
    return path


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---- formats ----------------------------------------------------------------------------------


def test_plain_text_file_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("\ufeffChapter 1\n\nIt was a dark night.\r\nThe end.\n", encoding="utf-8")
    assert list(iter_documents(path)) == ["Chapter 1\n\nIt was a dark night.\r\nThe end.\n"]


def test_explicit_file_with_other_extension_is_plain_text(tmp_path: Path) -> None:
    path = tmp_path / "corpus.log"
    path.write_text("some text", encoding="utf-8")
    assert list(iter_documents(path)) == ["some text"]


def test_large_text_is_chunked_at_line_boundaries(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    text = "".join(f"line {i} with some words\n" for i in range(100)) + "no newline at the end"
    path.write_text(text, encoding="utf-8")
    chunks = list(iter_text_chunks(path, chunk_bytes=200))
    assert len(chunks) > 5
    assert "".join(chunks) == text
    assert all(c.endswith("\n") for c in chunks[:-1])
    assert all(len(c.encode()) < 200 + 30 for c in chunks)


def test_jsonl_documents_skip_blank_lines_and_empty_texts(tmp_path: Path) -> None:
    rows = [{"text": "first", "id": 1}, {"text": ""}, {"text": "  \n"}, {"text": "ü"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    path.write_text(path.read_text(encoding="utf-8") + "\n   \n", encoding="utf-8")
    assert list(iter_documents(path)) == ["first", "ü"]


def test_jsonl_custom_text_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "a"}, {"content": "b"}])
    assert list(iter_documents(path, text_field="content")) == ["a", "b"]


def test_iter_jsonl_yields_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (3, {"a": 2})]


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "x"}, {"text": "y"}], indent=2), encoding="utf-8")
    assert list(iter_documents(path)) == ["x", "y"]
    assert [n for n, _ in iter_jsonl(path)] == [1, 2]


def test_json_array_item_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "x"}, 5]), encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        list(iter_documents(path))
    message = one_line_error(excinfo)
    assert str(path) in message and "item 2" in message and "'text'" in message


def test_parquet_reads_text_column_in_batches(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", {"text": ["a", None, "b", "c", "d"], "n": [1, 2, 3, 4, 5]})
    assert list(iter_documents(path)) == ["a", "b", "c", "d"]


def test_parquet_custom_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", {"body": ["p", "q"]})
    assert list(iter_file_documents(path, text_field="body")) == ["p", "q"]


# ---- directories, globs, several sources ------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "b.txt").write_text("B", encoding="utf-8")
    (root / "a.md").write_text("A", encoding="utf-8")
    write_jsonl(root / "sub" / "c.jsonl", [{"text": "C1"}, {"text": "C2"}])
    write_parquet(root / "sub" / "deeper" / "d.parquet", {"text": ["D"]})
    (root / "notes.csv").write_text("ignored", encoding="utf-8")
    (root / ".secret.txt").write_text("ignored", encoding="utf-8")
    (root / ".hidden" / "e.txt").write_text("ignored", encoding="utf-8")
    return root


def test_directory_is_searched_recursively_sorted_known_extensions(tree: Path) -> None:
    names = [p.relative_to(tree).as_posix() for p in expand_paths(tree)]
    assert names == ["a.md", "b.txt", "sub/c.jsonl", "sub/deeper/d.parquet"]
    assert list(iter_documents(tree)) == ["A", "B", "C1", "C2", "D"]


def test_glob_patterns(tree: Path) -> None:
    assert list(iter_documents(str(tree / "*.txt"))) == ["B"]
    assert list(iter_documents(str(tree / "**" / "*.jsonl"))) == ["C1", "C2"]


def test_several_sources_keep_order_and_drop_duplicates(tree: Path) -> None:
    sources = [tree / "sub" / "c.jsonl", str(tree / "*.md"), tree]
    names = [p.relative_to(tree).as_posix() for p in expand_paths(sources)]
    assert names == ["sub/c.jsonl", "a.md", "b.txt", "sub/deeper/d.parquet"]


# ---- errors -----------------------------------------------------------------------------------


def test_malformed_jsonl_line_reports_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}] * 4, raw_lines={3: '{"text": "broken'})
    docs = iter_documents(path)
    assert [next(docs) for _ in range(3)] == ["ok"] * 3  # the good lines before it are read
    with pytest.raises(DataError) as excinfo:
        next(docs)
    message = one_line_error(excinfo)
    assert f"{path}:4:" in message
    assert "invalid JSON" in message and "expected a JSON object with a string field 'text'" in message


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('["text"]', "got a JSON array"),
        ('{"body": "x", "id": 3}', "field 'text' is missing (keys: body, id)"),
        ('{"text": 5}', "field 'text' is a JSON number"),
        ('{"text": null}', "field 'text' is a JSON null"),
    ],
)
def test_bad_jsonl_records(tmp_path: Path, line: str, needle: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}], raw_lines={1: line})
    with pytest.raises(DataError) as excinfo:
        list(iter_documents(path))
    message = one_line_error(excinfo)
    assert message.startswith(f"{path}:2: ")
    assert needle in message and "expected a JSON object with a string field 'text'" in message


def test_invalid_utf8_text_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    with pytest.raises(DataError) as excinfo:
        list(iter_documents(path))
    assert one_line_error(excinfo).startswith(f"{path}:3: ")


def test_parquet_missing_column_lists_columns(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", {"body": ["x"], "lang": ["en"]})
    with pytest.raises(DataError) as excinfo:
        list(iter_documents(path))
    message = one_line_error(excinfo)
    assert str(path) in message and "'text'" in message and "columns: body, lang" in message


def test_parquet_non_string_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", {"text": [1, 2]})
    with pytest.raises(DataError, match="column 'text' has type int64; expected a string column"):
        list(iter_documents(path))


def test_not_a_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_text("this is not parquet", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        list(iter_documents(path))
    assert one_line_error(excinfo).startswith(f"{path}: not a readable Parquet file")


def test_glob_matching_nothing_names_the_pattern(tmp_path: Path) -> None:
    pattern = str(tmp_path / "*.jsonl")
    with pytest.raises(DataError) as excinfo:
        expand_paths(pattern)
    message = one_line_error(excinfo)
    assert pattern in message and "matched no data files" in message


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or directory"):
        expand_paths(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="directory has no data files"):
        expand_paths(tmp_path / "empty")
    with pytest.raises(DataError, match="no data sources given"):
        expand_paths([])


def test_empty_data_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "blank.txt").write_text(" \n\n", encoding="utf-8")
    write_jsonl(tmp_path / "rows.jsonl", [{"text": ""}])
    with pytest.raises(DataError) as excinfo:
        list(iter_documents(tmp_path))
    message = one_line_error(excinfo)
    assert "3 files" in message and "no non-empty documents" in message
