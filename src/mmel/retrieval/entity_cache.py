"""The reranker's per-entity cache on disk: `MelModel.encode_entities` output, memory-mapped, appendable.

Why the model's cache and not the raw features: the cache is everything a model computes from an
entity alone, so reranking K candidates only gathers K rows and runs `match`. It is also far
smaller. With the default MiniLM + EfficientNet backbone the raw reranking inputs of one entity
are 40 x 384 text tokens plus 49 x 1280 image patches (about 155 KB in float16); MIMIC's cache is
40 x 96 token queries plus a few vectors (about 9.6 KB in float16, 19.2 KB in float32), because
the image patches collapse into per-entity vectors. A million entities fit in about 9.6 GB of
float16 on disk, or 5 GB as 'int8' (each vector of a float field stored as int8 with its own
absmax / 127 scale; the accuracy cost is measured in docs/RESULTS.md), read through the page
cache with random-access advice (`core/npy.py`), so serving touches only the rows it reranks.

Layout: `segments.json` lists segments (name + metadata) in write order; each segment directory holds `qids.json`
and one `<field>.npy` per cache field (rows aligned with the QIDs; with 'int8' storage also
`<field>.scale.npy`, one float32 scale per stored vector). Adding entities writes a new
segment; an updated entity's newest row wins; removed entities simply lose their location (the
caller passes the live QIDs), so adding and removing never rewrite a segment. Dead rows stay on
disk until `compact` copies the live rows into fresh segments (one per distinct segment
metadata) and deletes the old ones; the listing switches in one atomic write, so an interrupted
compaction leaves the old segments in use. The cache is the model's entity `RowCache`
(`mmel.models.base`), whose layout the model declares (`MelModel.entity_cache_layout`).

Shapes: N entities, K gathered rows; each field is [N, *trailing].
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmel.core.errors import DataError, MismatchError, NotFoundError, UsageError
from mmel.core.npy import NpyRowWriter, create_npy, open_npy_random_access
from mmel.core.paths import atomic_directory, atomic_write_json, read_json
from mmel.models.base import MelModel

SEGMENTS_FILE = "segments.json"
SEGMENT_NAME = re.compile(r"segment-(\d{6,})")
QIDS_FILE = "qids.json"
STORAGE_DTYPES = ("float32", "float16", "int8")
SCALE_SUFFIX = ".scale"


@dataclass(frozen=True)
class CacheLayout:
    """The class of a model's entity cache and, per field, its trailing shape and kind (float or bool)."""

    cache_class: type
    fields: dict[str, tuple[tuple[int, ...], str]]

    @classmethod
    def for_model(cls, model: MelModel, text_length: int, image_tokens: int) -> CacheLayout:
        """The layout `model` declares for features of `text_length` tokens and `image_tokens` image tokens."""
        return cls(model.entity_cache_class, model.entity_cache_layout(text_length, image_tokens))

    def describe(self) -> dict[str, Any]:
        """JSON description for the manifest (what `check` compares)."""
        return {"class": self.cache_class.__name__,
                "fields": {name: {"shape": list(shape), "kind": kind} for name, (shape, kind) in self.fields.items()}}

    def check(self, described: dict[str, Any], *, source: object) -> None:
        if described != self.describe():
            raise MismatchError(f"{source}: the stored entity cache ({described}) does not fit this model's cache "
                                f"({self.describe()}); rebuild the index with this model")


@dataclass(frozen=True)
class CompactionReport:
    rows_before: int       # rows on disk, dead ones included
    segments_before: int
    rows_after: int        # = live entities
    segments_after: int


@dataclass(frozen=True)
class SegmentFiles:
    """The .npy files of one segment being written: sized once, then filled by row offset.

    Plain data (a directory, the layout, the storage dtype), so a worker process can be handed it and
    write its rows itself (`mmel index build --engine ray`).
    """

    directory: Path
    layout: CacheLayout
    storage_dtype: str

    def allocate(self, num_rows: int) -> None:
        """Create every field's file (and int8 scale file) for `num_rows` rows."""
        for name, (shape, kind) in self.layout.fields.items():
            for suffix, file_shape, dtype in self._files(name, (num_rows, *shape), kind):
                create_npy(self.directory / f"{name}{suffix}.npy", file_shape, dtype)

    @contextlib.contextmanager
    def writer(self) -> Iterator[Callable[[int, Any], None]]:
        """`write(start, cache)`: the rows of one model cache at rows [start, start + len(cache)) (int8:
        quantized here), with every file held open while the block runs (opened once for many batches)."""
        with contextlib.ExitStack() as open_files:
            files = {(name, suffix): open_files.enter_context(NpyRowWriter(self.directory / f"{name}{suffix}.npy"))
                     for name, (shape, kind) in self.layout.fields.items()
                     for suffix, _, _ in self._files(name, (0, *shape), kind)}

            def write(start: int, cache: Any) -> None:
                for name, (shape, kind) in self.layout.fields.items():
                    values = _checked_rows(cache, name, shape)
                    parts = quantize_int8(values) if quantizes(self.storage_dtype, kind, shape) else (values,)
                    for part, (suffix, _, _) in zip(parts, self._files(name, values.shape, kind), strict=True):
                        files[name, suffix].write(start, part)

            yield write

    def _files(self, name: str, shape: tuple[int, ...], kind: str) -> list[tuple[str, tuple[int, ...], Any]]:
        """(file suffix, shape, dtype) of each file that stores field `name`."""
        if kind == "bool":
            return [("", shape, np.bool_)]
        if quantizes(self.storage_dtype, kind, shape[1:]):
            return [("", shape, np.int8), (SCALE_SUFFIX, shape[:-1], np.float32)]
        return [("", shape, np.float32 if self.storage_dtype == "int8" else self.storage_dtype)]


def quantizes(storage_dtype: str, kind: str, trailing_shape: tuple[int, ...]) -> bool:
    """int8 storage quantizes float fields made of vectors; a scalar per entity stays float32."""
    return storage_dtype == "int8" and kind == "float" and len(trailing_shape) >= 1


class EntityCacheStore:
    """Append-only segments of per-entity cache rows, with QID -> (segment, row) lookup and row gathering."""

    def __init__(self, directory: Path, layout: CacheLayout, storage_dtype: str):
        if storage_dtype not in STORAGE_DTYPES:
            raise UsageError(f"unknown cache storage dtype {storage_dtype!r}; available: {', '.join(STORAGE_DTYPES)}")
        self.directory = Path(directory)
        self.layout = layout
        self.storage_dtype = storage_dtype
        self._segments: list[dict[str, np.ndarray]] = []
        self._segment_info: list[dict[str, Any]] = []   # {"name", "metadata"} per segment
        self._location: dict[str, tuple[int, int]] = {}

    # --- opening ----------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: Path, layout: CacheLayout, live_qids: Collection[str]) -> EntityCacheStore:
        """Open the segments (memory-mapped); every QID in `live_qids` must have a row."""
        directory = Path(directory)
        listing = read_json(directory / SEGMENTS_FILE)
        if not isinstance(listing, dict) or not isinstance(listing.get("segments"), list):
            raise DataError("expected an object with a 'segments' list", path=directory / SEGMENTS_FILE)
        layout.check(listing.get("layout", {}), source=directory / SEGMENTS_FILE)
        store = cls(directory, layout, listing.get("storage_dtype", ""))
        for info in listing["segments"]:
            if not isinstance(info, dict) or not isinstance(info.get("name"), str):
                raise DataError(f"malformed segment entry {info!r}", path=directory / SEGMENTS_FILE)
            store._map_segment(info)
        missing = [qid for qid in live_qids if qid not in store._location]
        if missing:
            raise MismatchError(f"{directory}: {len(missing)} indexed entities have no cached rows, e.g. "
                                f"{missing[:5]}; the index was copied partially: rebuild it")
        live = set(live_qids)
        store._location = {qid: place for qid, place in store._location.items() if qid in live}
        return store

    @classmethod
    def create(cls, directory: Path, layout: CacheLayout, storage_dtype: str) -> EntityCacheStore:
        """An empty store at `directory` (segments are added with `write_segment`)."""
        store = cls(directory, layout, storage_dtype)
        Path(directory).mkdir(parents=True, exist_ok=True)
        store._save_listing()
        return store

    # --- reading ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._location)

    def __contains__(self, qid: object) -> bool:
        return qid in self._location

    @property
    def num_segments(self) -> int:
        return len(self._segments)

    def gather(self, qids: Sequence[str]) -> Any:
        """The cache rows of `qids` [K], in that order, as float32 / bool tensors of the model's cache class."""
        try:
            places = [self._location[qid] for qid in qids]
        except KeyError as error:
            raise NotFoundError(f"QID {error.args[0]!r} has no cached rows in {self.directory}") from None
        segments = np.array([segment for segment, _ in places], dtype=np.int64)     # [K]
        rows = np.array([row for _, row in places], dtype=np.int64)                 # [K]
        columns = {}
        for name, (shape, kind) in self.layout.fields.items():
            values = np.empty((len(places), *shape), dtype=np.bool_ if kind == "bool" else np.float32)
            for segment in np.unique(segments):
                selected = np.flatnonzero(segments == segment)
                values[selected] = self._read_rows(self._segments[segment], name, rows[selected])
            columns[name] = torch.from_numpy(values)
        return self.layout.cache_class(**columns)

    def _read_rows(self, arrays: dict[str, np.ndarray], name: str, rows: np.ndarray) -> np.ndarray:
        """Rows of one field of one segment, dequantized where the field is stored as int8."""
        scale = arrays.get(name + SCALE_SUFFIX)
        if scale is None:
            return arrays[name][rows]
        return dequantize_int8(arrays[name][rows], scale[rows])

    # --- writing ----------------------------------------------------------------------------
    def write_segment(self, qids: Sequence[str], caches: Iterable[Any], *, metadata: dict[str, Any] | None = None,
                      ) -> None:
        """Store the rows of `caches` (model caches, in order, read one at a time) for `qids` as one new segment.

        `metadata` (JSON) is kept with the segment, e.g. the directory its entities' image paths start from.
        """
        with self.new_segment(qids, metadata=metadata) as files, files.writer() as write:
            start = 0
            for cache in caches:
                write(start, cache)
                start += len(cache)
            if start != len(qids):
                raise UsageError(f"{len(qids)} QIDs but {start} cached rows")

    @contextlib.contextmanager
    def new_segment(self, qids: Sequence[str], *, metadata: dict[str, Any] | None = None) -> Iterator[SegmentFiles]:
        """A new segment's files, sized for `qids`, to fill by row offset (from this or other processes).

        The segment becomes visible when the block ends without an error; the caller must have
        written every row by then.
        """
        name = self._next_segment_name()
        with self._segment_files(name, qids) as files:
            yield files
        self._map_segment({"name": name, "metadata": dict(metadata or {})})
        self._save_listing()

    @contextlib.contextmanager
    def _segment_files(self, name: str, qids: Sequence[str]) -> Iterator[SegmentFiles]:
        """Segment `name`'s files sized for `qids`, written atomically (with its QID list) when the block ends."""
        with atomic_directory(self.directory / name) as tmp:
            files = SegmentFiles(tmp, self.layout, self.storage_dtype)
            files.allocate(len(qids))
            yield files
            atomic_write_json(tmp / QIDS_FILE, list(qids), indent=None)

    def compact(self, *, chunk_rows: int = 8192) -> CompactionReport:
        """Rewrite the live rows into fresh segments and delete the old ones (reclaims removed/updated rows)."""
        before = CompactionReport(rows_before=self.stored_rows(), segments_before=self.num_segments,
                                  rows_after=0, segments_after=0)
        groups: dict[str, list[str]] = {}          # segment metadata (as JSON) -> live QIDs, in storage order
        for qid, (segment, _) in sorted(self._location.items(), key=lambda item: item[1]):
            groups.setdefault(json.dumps(self._segment_info[segment]["metadata"], sort_keys=True), []).append(qid)
        old_names = [info["name"] for info in self._segment_info]
        new_infos = []
        for metadata, qids in groups.items():
            name = self._next_segment_name()
            with self._segment_files(name, qids) as files, files.writer() as write:
                for start in range(0, len(qids), chunk_rows):
                    write(start, self.gather(qids[start:start + chunk_rows]))
            new_infos.append({"name": name, "metadata": json.loads(metadata)})
        self._segments, self._segment_info, self._location = [], [], {}
        for info in new_infos:
            self._map_segment(info)
        self._save_listing()
        for name in old_names:
            shutil.rmtree(self.directory / name, ignore_errors=True)
        return dataclasses.replace(before, rows_after=self.stored_rows(), segments_after=self.num_segments)

    def _next_segment_name(self) -> str:
        """One past the highest segment number listed or on disk (so a leftover of a crash is never reused)."""
        names = [info["name"] for info in self._segment_info] + [path.name for path in self.directory.iterdir()]
        numbers = [int(match.group(1)) for name in names if (match := SEGMENT_NAME.fullmatch(name))]
        return f"segment-{max(numbers, default=-1) + 1:06d}"

    def segment_metadata(self, qid: str) -> dict[str, Any]:
        """The metadata of the segment holding `qid`'s current row (KeyError if it has none)."""
        return self._segment_info[self._location[qid][0]]["metadata"]

    def forget(self, qids: Collection[str]) -> None:
        """Drop the locations of removed entities (their rows stay on disk until the index is rebuilt)."""
        for qid in qids:
            self._location.pop(qid, None)

    def stored_rows(self) -> int:
        """Rows on disk, dead ones included (compare with len() to see the space removed entities still use)."""
        return sum(len(next(iter(segment.values()))) for segment in self._segments)

    # --- internals --------------------------------------------------------------------------
    def _map_segment(self, info: dict[str, Any]) -> None:
        path = self.directory / info["name"]
        qids = read_json(path / QIDS_FILE)
        if not isinstance(qids, list):
            raise DataError("expected a JSON list of QIDs", path=path / QIDS_FILE)
        arrays = {}
        for field_name, (shape, kind) in self.layout.fields.items():
            arrays[field_name] = _mapped(path / f"{field_name}.npy", (len(qids), *shape))
            if quantizes(self.storage_dtype, kind, shape):
                arrays[field_name + SCALE_SUFFIX] = _mapped(path / f"{field_name}{SCALE_SUFFIX}.npy",
                                                            (len(qids), *shape[:-1]))
        segment = len(self._segments)
        self._segments.append(arrays)
        self._segment_info.append(info)
        self._location.update((qid, (segment, row)) for row, qid in enumerate(qids))

    def _save_listing(self) -> None:
        atomic_write_json(self.directory / SEGMENTS_FILE, {
            "segments": self._segment_info, "storage_dtype": self.storage_dtype, "layout": self.layout.describe()})


def quantize_int8(values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """[n, *S, D] floats -> int8 codes [n, *S, D] and one scale per vector [n, *S] (absmax / 127).

    A per-vector scale keeps a vector's direction to within 1/254 of its largest component, so dot
    products move by well under a percent; a zero vector gets scale 0 and decodes to zeros.
    (torch, not numpy: its kernels use every intra-op thread, and this runs over every cached row.)
    """
    values = torch.as_tensor(values, dtype=torch.float32)
    scales = values.abs().amax(dim=-1) / 127.0                                           # [n, *S]
    codes = torch.round(values / torch.where(scales == 0, 1.0, scales).unsqueeze(-1)).clamp_(-127, 127)
    return codes.to(torch.int8).numpy(), scales.numpy()


def dequantize_int8(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Inverse of `quantize_int8`: float32 [n, *S, D]."""
    return codes.astype(np.float32) * scales[..., None]


def _checked_rows(cache: Any, field_name: str, trailing_shape: tuple[int, ...]) -> torch.Tensor:
    values = getattr(cache, field_name)
    if tuple(values.shape[1:]) != trailing_shape:
        raise MismatchError(f"{type(cache).__name__}.{field_name} rows have shape {tuple(values.shape[1:])}, the "
                            f"layout says {trailing_shape}: the features' text length or image token count differs "
                            "from the model's checkpoint (preprocess.max_text_length, backbone.num_patches)")
    return values.detach().cpu()


def _mapped(file: Path, shape: tuple[int, ...]) -> np.ndarray:
    try:
        array = open_npy_random_access(file)
    except FileNotFoundError:
        raise DataError("cache array missing", path=file) from None
    if array.shape != shape:
        raise MismatchError(f"{file}: shape {array.shape}, expected {shape}; rebuild the index")
    return array


__all__ = ["STORAGE_DTYPES", "CacheLayout", "CompactionReport", "EntityCacheStore", "SegmentFiles"]
