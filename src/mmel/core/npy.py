""".npy files written as a stream and read as random-access memory maps.

Why not `np.lib.format.open_memmap` for writing: pages written through a mapping are resident
in the writer's address space (file-backed RSS, gigabytes for a million entities' reranker cache)
until the kernel writes them back. Plain positional writes go through the page cache without
being mapped, so a writer's memory stays at one chunk, and several processes can fill disjoint
rows of one file (the sharded index build).

Why madvise(MADV_RANDOM) for reading: a page fault in a plain file mapping reads the pages around
it too (read-around, 128 KiB and more), which suits scans. A reranker gathering 100 random rows of
a few KiB each per query then pulls in and keeps ~30x the bytes it needs; with MADV_RANDOM the
kernel reads only the faulted pages.

Shapes: N rows, trailing shape S.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from mmel.core.errors import DataError
from mmel.core.paths import open_regular_file

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def create_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype | type) -> None:
    """Create an .npy file of `shape` whose rows are filled in later by `NpyRowWriter`s (any order, any process).

    The file gets its full size at once (sparse: no data is written), so writers can put rows at
    their offsets independently.
    """
    dtype = np.dtype(dtype)
    with Path(path).open("wb") as handle:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
        np.lib.format.write_array_header_2_0(handle, header)
        handle.truncate(handle.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)


class NpyRowWriter:
    """Writes rows [n, *S] at a given row offset of an .npy file made by `create_npy` (plain writes, no mapping)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.shape, self.dtype, self._offset = _read_header(self.path)
        self._handle = self.path.open("r+b")

    def write(self, start: int, rows: np.ndarray) -> None:
        """Put `rows` (converted to the file's dtype) at rows [start, start + len(rows))."""
        rows = np.ascontiguousarray(np.asarray(rows), dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or not 0 <= start <= start + len(rows) <= self.shape[0]:
            raise ValueError(f"{self.path}: rows of shape {rows.shape} do not fit at row {start} of {self.shape}")
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._handle.seek(self._offset + start * row_bytes)
        self._handle.write(rows.tobytes())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> NpyRowWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_npy_random_access(path: Path) -> np.ndarray:
    """A read-only memory map of an .npy file advised for random access (see the module docstring).

    Object arrays are refused (no pickle). A zero-length array is returned as a plain empty array,
    since an empty file region cannot be mapped.
    """
    path = Path(path)
    shape, dtype, offset = _read_header(path)
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.empty(shape, dtype=dtype)
    with open_regular_file(path) as handle:
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    mapping.madvise(mmap.MADV_RANDOM)
    array = np.frombuffer(mapping, dtype=dtype, count=count, offset=offset).reshape(shape)
    return array


def _read_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of an .npy file; refuses object arrays, Fortran order and short files."""
    with open_regular_file(path) as handle:
        try:
            version = np.lib.format.read_magic(handle)
            read_header = _HEADER_READERS.get(version)
            if read_header is None:
                raise ValueError(f"format version {version} is not supported")
            shape, fortran_order, dtype = read_header(handle)
        except ValueError as error:
            raise DataError(f"not a valid .npy file: {error}", path=path) from None
        offset = handle.tell()
    if dtype.hasobject or fortran_order:
        raise DataError("object or Fortran-ordered arrays are not accepted", path=path)
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size < expected:
        raise DataError(f"truncated .npy file: {size} bytes, the header promises {expected}", path=path)
    return shape, dtype, offset


__all__ = ["NpyRowWriter", "create_npy", "open_npy_random_access"]
