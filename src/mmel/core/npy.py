""".npy files written as a stream and read as random-access memory maps.

Why not `np.lib.format.open_memmap` for writing: pages written through a mapping are resident
in the writer's address space (file-backed RSS, gigabytes for a million entities' reranker cache)
until the kernel writes them back. Plain appends go through the page cache without being mapped,
so the writer's memory stays at one chunk.

Why madvise(MADV_RANDOM) for reading: a page fault in a plain file mapping reads the pages around
it too (read-around, 128 KiB and more), which suits scans. A reranker gathering 100 random rows of
a few KiB each per query then pulls in and keeps ~30x the bytes it needs; with MADV_RANDOM the
kernel reads only the faulted pages.

Shapes: N rows, trailing shape S.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from types import TracebackType

import numpy as np

from mmel.core.errors import DataError
from mmel.core.paths import open_regular_file

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class NpyWriter:
    """Write an .npy array of known shape [N, *S] by appending row chunks in order (no mapping)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype | type):
        self.path = Path(path)
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.rows_written = 0
        self._handle = self.path.open("wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_2_0(self._handle, header)

    def append(self, rows: np.ndarray) -> None:
        """Append rows [n, *S] (converted to the file's dtype)."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.rows_written + len(rows) > self.shape[0]:
            raise ValueError(f"{self.path}: rows of shape {rows.shape} do not fit after {self.rows_written} of "
                             f"{self.shape}")
        self._handle.write(rows.tobytes())
        self.rows_written += len(rows)

    def close(self) -> None:
        """Flush and close; every declared row must have been written."""
        self._handle.close()
        if self.rows_written != self.shape[0]:
            raise ValueError(f"{self.path}: {self.rows_written} rows written, {self.shape[0]} declared")

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self._handle.close()


def open_npy_random_access(path: Path) -> np.ndarray:
    """A read-only memory map of an .npy file advised for random access (see the module docstring).

    Object arrays are refused (no pickle). A zero-length array is returned as a plain empty array,
    since an empty file region cannot be mapped.
    """
    path = Path(path)
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
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            return np.empty(shape, dtype=dtype)
        expected = offset + count * dtype.itemsize
        size = Path(path).stat().st_size
        if size < expected:
            raise DataError(f"truncated .npy file: {size} bytes, the header promises {expected}", path=path)
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    mapping.madvise(mmap.MADV_RANDOM)
    array = np.frombuffer(mapping, dtype=dtype, count=count, offset=offset).reshape(shape)
    return array


__all__ = ["NpyWriter", "open_npy_random_access"]
