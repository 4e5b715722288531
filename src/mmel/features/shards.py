"""Content-addressed shards: immutable directories of equal-length arrays with a key -> (shard, row) index.

The feature store keeps every encoded text and image here (`store.py`); a shard is written
atomically and named after its keys, so an interrupted write leaves no partial shard and a rewrite
is idempotent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmel.core.errors import MismatchError
from mmel.core.paths import atomic_directory


def content_key(data: bytes) -> str:
    """32 hex characters identifying `data` (BLAKE2b-128)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


# --- content-addressed shards ----------------------------------------------------------------

class ShardCache:
    """A directory of immutable shards of equal-length arrays, with a key -> (shard, row) index."""

    def __init__(self, directory: Path, fields: tuple[str, ...]):
        self.directory = Path(directory)
        self.fields = fields
        self._arrays: dict[str, dict[str, np.ndarray]] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read the keys of every finished shard (temporary directories start with '.' and are skipped)."""
        names = sorted(p.name for p in self.directory.glob("shard-*")) if self.directory.is_dir() else []
        keys = [np.load(self.directory / name / "keys.npy") for name in names]
        self.shard_names = names
        all_keys = np.concatenate(keys) if keys else np.zeros(0, dtype="S32")
        shard_ids = np.concatenate([np.full(len(k), i, dtype=np.int32) for i, k in enumerate(keys)]) if keys \
            else np.zeros(0, dtype=np.int32)
        rows = np.concatenate([np.arange(len(k), dtype=np.int32) for k in keys]) if keys \
            else np.zeros(0, dtype=np.int32)
        order = np.argsort(all_keys, kind="stable")
        self._sorted_keys = all_keys[order]
        self._sorted_refs = np.stack([shard_ids[order], rows[order]], axis=1)  # [K, 2]

    def __len__(self) -> int:
        return len(self._sorted_keys)

    def lookup(self, keys: Sequence[str]) -> np.ndarray:
        """[len(keys), 2] (shard index into `shard_names`, row); (-1, -1) where a key is absent."""
        query = np.asarray(keys, dtype="S32")
        refs = np.full((len(query), 2), -1, dtype=np.int32)
        if len(self._sorted_keys) == 0 or len(query) == 0:
            return refs
        position = np.searchsorted(self._sorted_keys, query).clip(max=len(self._sorted_keys) - 1)
        found = self._sorted_keys[position] == query
        refs[found] = self._sorted_refs[position[found]]
        return refs

    def write_shard(self, keys: list[str], arrays: dict[str, np.ndarray]) -> str:
        """Write one shard atomically; its name is derived from its keys, so a rewrite is idempotent."""
        name = "shard-" + content_key("\n".join(keys).encode("ascii"))[:16]
        target = self.directory / name
        if not target.exists():
            with atomic_directory(target) as tmp:
                np.save(tmp / "keys.npy", np.asarray(keys, dtype="S32"))
                for field_name in self.fields:
                    np.save(tmp / f"{field_name}.npy", arrays[field_name])
        return name

    def arrays(self, shard_name: str) -> dict[str, np.ndarray]:
        """The shard's arrays, memory-mapped read-only (opened once)."""
        if shard_name not in self._arrays:
            shard_dir = self.directory / shard_name
            if not shard_dir.is_dir():
                raise MismatchError(f"{shard_dir}: shard is missing from the feature store; rebuild the features")
            self._arrays[shard_name] = {f: np.load(shard_dir / f"{f}.npy", mmap_mode="r") for f in self.fields}
        return self._arrays[shard_name]

    def gather(self, shard_names: Sequence[str], refs: np.ndarray, field_name: str, out: np.ndarray) -> None:
        """Fill out[i] with `field_name` at refs[i] = (index into shard_names, row); rows with shard -1 untouched."""
        for shard_index in np.unique(refs[:, 0]):
            if shard_index < 0:
                continue
            selected = np.nonzero(refs[:, 0] == shard_index)[0]
            source = self.arrays(shard_names[shard_index])[field_name]
            rows = refs[selected, 1]
            order = np.argsort(rows, kind="stable")   # ascending reads are kinder to the page cache
            out[selected[order]] = source[rows[order]]


__all__ = ["ShardCache", "content_key"]
