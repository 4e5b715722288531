"""Root-confined paths, atomic writes and JSON/JSONL reading with errors that name the record."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from mmel.core.errors import DataError, PathEscapeError


def resolve_in_root(root: Path, relative: str | os.PathLike[str], *, source: object = None) -> Path:
    """`root / relative`, refusing absolute paths and `..` that leave `root` (symlinks resolved)."""
    root_resolved = Path(root).resolve()
    candidate = (root_resolved / relative).resolve()
    if candidate != root_resolved and root_resolved not in candidate.parents:
        raise PathEscapeError(f"path {str(relative)!r} escapes the data root {root_resolved}", path=source)
    return candidate


class NotRegularFileError(OSError):
    """A path names a FIFO, device, socket or directory where a data file was expected."""


def open_regular_file(path: Path) -> BinaryIO:
    """Open `path` for binary reading, refusing anything but a regular file.

    Opening a FIFO for reading blocks until a writer appears, so the open is non-blocking and the
    type is checked on the opened descriptor (no window between a check and the open).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(f"not a regular file ({_file_kind(mode)})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (weights, FAISS files: what manifests record and check)."""
    digest = hashlib.sha256()
    with open_regular_file(Path(path)) as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any, *, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    tmp.chmod(0o777 & ~_current_umask())  # mkdtemp makes 0700; give the usual directory mode
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@functools.cache
def _current_umask() -> int:
    """The process umask, read once (reading it means setting it, which is not thread-safe)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_BOM = b"\xef\xbb\xbf"


def read_json(path: Path) -> Any:
    """Parse a JSON file; a syntax error names the file, line and column. A UTF-8 BOM is accepted."""
    path = Path(path)
    data = _read_data_file(path)
    try:
        text = data.removeprefix(_BOM).decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise DataError(f"not UTF-8 text ({error.reason} at byte {error.start})", path=path,
                        record=f"line {line}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}",
                        path=path) from None


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; bad lines raise naming file and line.

    A UTF-8 BOM before the first line is skipped (Windows editors write one); invalid UTF-8 is
    reported on its line, not as a decoding error without a place.
    """
    path = Path(path)
    with _open_data_file(path) as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = _decode_line(raw.removeprefix(_BOM) if line_number == 1 else raw, path, line_number)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"malformed JSON: {error.msg}", path=path, record=f"line {line_number}") from None
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object, got {type(record).__name__}",
                                path=path, record=f"line {line_number}")
            yield line_number, record


def _decode_line(raw: bytes, path: Path, line_number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"not UTF-8 text ({error.reason} at byte {error.start} of the line)", path=path,
                        record=f"line {line_number}") from None


def _open_data_file(path: Path) -> BinaryIO:
    """`open_regular_file` with the failures a user can fix turned into `DataError` naming the file."""
    try:
        return open_regular_file(path)
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except OSError as error:
        raise DataError(f"cannot read: {error.strerror or error}", path=path) from None


def _read_data_file(path: Path) -> bytes:
    with _open_data_file(path) as handle:
        return handle.read()


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Write records as JSON lines, atomically."""
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    atomic_write_text(Path(path), "\n".join(lines) + ("\n" if lines else ""))


def link_or_copy(source: Path, target: Path) -> None:
    """Put `source`'s bytes at `target`: a hard link when both lie on one file system, else a copy."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
