"""Root-confined paths, atomic writes and JSON/JSONL reading with errors that name the record."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from mmel.core.crashpoints import crash_point
from mmel.core.errors import DataError, PathEscapeError


def resolve_in_root(root: Path, relative: str | os.PathLike[str], *, source: object = None) -> Path:
    """`root / relative`, refusing absolute paths and `..` that leave `root` (symlinks resolved).

    A path with a NUL character names no file at all (the OS refuses it): it is refused here too.
    """
    root_resolved = Path(root).resolve()
    if "\x00" in os.fspath(relative):
        raise PathEscapeError(f"path {os.fspath(relative)!r} holds a NUL character, so it names no file under "
                              f"the data root {root_resolved}", path=source)
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


def mmel_cache_dir() -> Path:
    """mmel's cache root: `$MMEL_CACHE_DIR`, else `$XDG_CACHE_HOME/mmel` (`~/.cache/mmel`)."""
    base = os.environ.get("MMEL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mmel")
    return Path(base)


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (weights, FAISS files: what manifests record and check)."""
    digest = hashlib.sha256()
    with open_regular_file(Path(path)) as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never half of it.

    One writer per `path` at a time: a kill before the rename leaves a `.<name>.<random>.tmp`
    sibling, which the next write of `path` removes (as does `remove_stale_temporaries`, called by
    the owner of a directory, e.g. an index's recovery).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        crash_point(f"atomic_write.before_rename@{path.name}")
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
    """Yield a temporary sibling directory; on success it replaces `path` in one step.

    The replacement exchanges the two directories with one `renameat2(RENAME_EXCHANGE)` where the
    file system supports it (Linux), so `path` is never missing, not even for a moment. Elsewhere
    the old directory is first moved aside to `.<name>.old`; a kill between that rename and the
    next leaves no `path`, and `restore_interrupted_swap` (run here before every write, and by an
    index's recovery) puts the old one back.

    One writer per `path` at a time: the leftovers of an earlier, killed write of the same path
    (temporary siblings, an old copy) are removed before this one starts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted_swap(path)
    remove_stale_siblings(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    tmp.chmod(0o777 & ~_current_umask())  # mkdtemp makes 0700; give the usual directory mode
    try:
        yield tmp
        crash_point(f"atomic_directory.before_swap@{path.name}")
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Put the finished directory `tmp` at `path`; whatever was at `path` is deleted."""
    if not path.exists():
        os.replace(tmp, path)
        return
    if _exchange(tmp, path):
        crash_point(f"atomic_directory.after_swap@{path.name}")
        shutil.rmtree(tmp, ignore_errors=True)     # it holds the old version now
        return
    old = _old_copy(path)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    crash_point(f"atomic_directory.old_moved_aside@{path.name}")
    os.replace(tmp, path)
    crash_point(f"atomic_directory.after_swap@{path.name}")
    shutil.rmtree(old, ignore_errors=True)


def restore_interrupted_swap(path: Path) -> bool:
    """Put back the old copy of a directory whose replacement was killed between its two renames.

    Only the fallback swap (no RENAME_EXCHANGE) has that window. The old copy is the last complete
    version; a temporary sibling may be complete too, but nothing on disk says so. Returns True if
    it restored something. Call it under the same one-writer rule as `atomic_directory`.
    """
    path = Path(path)
    old = _old_copy(path)
    if path.exists() or not old.is_dir():
        return False
    os.replace(old, path)
    return True


def remove_stale_siblings(path: Path) -> list[str]:
    """Delete what killed atomic writes of `path` left beside it (`.<name>.<random>.tmp`, `.<name>.old`).

    Returns the names removed. Only the writer of `path` may call this: another process's write in
    progress looks exactly like a leftover.
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:{_RANDOM_PART}\.tmp|old)")
    return _remove_entries(path.parent, pattern.fullmatch)


def remove_stale_temporaries(directory: Path) -> list[str]:
    """Delete every leftover of killed atomic writes directly inside `directory`; returns their names.

    For the owner of a directory that holds several atomically written files and folders (an
    index): call it while no write can be in progress, e.g. under the owner's lock.
    """
    pattern = re.compile(rf"\..+\.(?:{_RANDOM_PART}\.tmp|old)")
    return _remove_entries(Path(directory), pattern.fullmatch)


_RANDOM_PART = "[a-z0-9_]{8}"   # what tempfile puts between prefix and suffix


def _remove_entries(directory: Path, matches: Callable[[str], object]) -> list[str]:
    if not directory.is_dir():
        return []
    removed = []
    for entry in os.scandir(directory):
        if not matches(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
        removed.append(entry.name)
    return sorted(removed)


def _old_copy(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_EXCHANGE_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


@functools.cache
def _renameat2() -> Any:
    """libc's renameat2 (glibc 2.28+), or None where there is none (macOS, older musl, Windows)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system or file system cannot."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _EXCHANGE_UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(second))


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
    return _parse_json(text, path, line=None)


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; bad lines raise naming file and line.

    A UTF-8 BOM before the first line is skipped (Windows editors write one); invalid UTF-8 is
    reported on its line, not as a decoding error without a place.
    """
    path = Path(path)
    with open_data_file(path) as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = _decode_line(raw.removeprefix(_BOM) if line_number == 1 else raw, path, line_number)
            if not line.strip():
                continue
            record = _parse_json(line, path, line=line_number)
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object, got {type(record).__name__}",
                                path=path, record=f"line {line_number}")
            yield line_number, record


# A \\uD800-\\uDFFF escape that is not half of a high+low pair: json.loads turns it into a lone surrogate.
_LONE_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
                             r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def _parse_json(text: str, path: Path, line: int | None) -> Any:
    """`json.loads(text)`, where `text` is line `line` of `path` (None: the whole file); refusals are DataErrors.

    Besides syntax errors json.loads refuses integers of over 4,300 digits (ValueError) and deep
    nesting (RecursionError), and it accepts lone surrogate escapes, which no writer can encode
    again: all are named here with the file (and line) rather than failing somewhere later.
    """
    record = None if line is None else f"line {line}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        place = "" if line is not None else f" at line {error.lineno}, column {error.colno}"
        raise DataError(f"malformed JSON{place}: {error.msg}", path=path, record=record) from None
    except ValueError:   # the only other ValueError of json.loads: an integer too long to convert
        raise DataError("an integer of too many digits to convert", path=path, record=record) from None
    except RecursionError:
        raise DataError("JSON nested too deeply", path=path, record=record) from None
    lone = _LONE_SURROGATE.search(text)
    if lone is not None and not _valid_unicode(value):
        place = "" if line is not None else f" at line {text.count(chr(10), 0, lone.start()) + 1}"
        raise DataError(f"{lone.group()}{place} is half of a UTF-16 surrogate pair, not a character", path=path,
                        record=record if line is not None else _record_with_lone_surrogate(value))
    return value


def _record_with_lone_surrogate(value: Any) -> str | None:
    """The top-level entry of a whole JSON file holding the bad text: `#index` in a list, the key in an object."""
    if isinstance(value, list):
        return next(f"#{index}" for index, item in enumerate(value) if not _valid_unicode(item))
    if isinstance(value, dict):
        key = next(key for key, item in value.items() if not (_valid_unicode(key) and _valid_unicode(item)))
        return key.encode("utf-8", "backslashreplace").decode("utf-8")
    return None


def _valid_unicode(value: Any) -> bool:
    """Whether every string (key or value) in the parsed JSON `value` encodes as UTF-8; iterative: nesting is deep."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _decode_line(raw: bytes, path: Path, line_number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"not UTF-8 text ({error.reason} at byte {error.start} of the line)", path=path,
                        record=f"line {line_number}") from None


def open_data_file(path: Path) -> BinaryIO:
    """`open_regular_file` with the failures a user can fix turned into `DataError` naming the file."""
    try:
        return open_regular_file(path)
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except OSError as error:
        raise DataError(f"cannot read: {error.strerror or error}", path=path) from None


def _read_data_file(path: Path) -> bytes:
    with open_data_file(path) as handle:
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
