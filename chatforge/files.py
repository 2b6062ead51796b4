"""Writing files so that a crash never leaves half of one under the real name."""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from chatforge.errors import CheckpointError


def temp_file_beside(path: Path) -> tuple[int, str]:
    """A new empty file next to `path` (same directory, so a rename is atomic), open for writing: (fd, name).
    Its mode is what `open` would give (0666 less the umask), not mkstemp's owner-only 0600: the files
    chatforge writes (exports, checkpoints, data) are meant to be read by others too."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: could not create a temporary file beside {path.name}")


def atomic_write(path: str | Path, write: Callable[[TextIO], object]) -> Path:
    """Write text through ``write(file)`` into a temporary file beside ``path``, flush it to disk, then
    rename it into place (the old file, if any, stays whole until that instant)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def ordinary_permissions(directory: Path) -> None:
    """Give the files directly in `directory` the mode `open` gives a new file (0666 less the umask):
    some writers (safetensors) make owner-only files. The mode is read off a probe file, since the
    umask cannot be read without setting it, which would race with other threads."""
    fd, probe = temp_file_beside(directory / "mode-probe")
    os.close(fd)
    mode = os.stat(probe).st_mode & 0o777
    os.unlink(probe)
    for entry in directory.iterdir():
        if entry.is_file() and not entry.is_symlink():
            entry.chmod(mode)


def finite_or_none(obj: Any) -> Any:
    """`obj` with every NaN or infinity (a rate over no prompts, a diverged loss) replaced by None, in
    nested dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def strict_json(obj: Any, **kwargs: Any) -> str:
    """JSON that every strict reader accepts: NaN and infinities are written as null (Python's json would
    write the non-standard NaN and Infinity); other values exactly as json.dumps writes them."""
    default = kwargs.pop("default", None)
    if default is not None:  # apply it first, so a converted value (a numpy float) is checked too
        obj = json.loads(json.dumps(obj, default=default))
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def write_json(path: Path, obj: Any) -> None:
    """Write strict JSON atomically (temp file + rename) so readers never see half a file."""
    atomic_write_text(path, strict_json(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`; CheckpointError naming the file and `what` was expected otherwise."""
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; expected the {what}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); expected the {what}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object holding the {what}")
    return obj


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` as a whole.

    The old directory is renamed aside before the new one takes its name and removed only
    after, so at every instant one complete copy exists (`checkpoint.resolve_checkpoint_dir` falls
    back to the aside copy if a crash hits between the two renames).
    """
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ordinary_permissions(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
