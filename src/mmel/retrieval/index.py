"""First-stage vector index over entity vectors: exact for small KBs, HNSW or IVF beyond.

Vectors are L2-normalised float32 and compared by inner product (= cosine). Each vector carries
a stable int64 *id* that never gets reused; the index owns the id -> QID map, so FAISS rows
always resolve to QIDs, also after adds, updates and deletes.

Deleting entities:
- 'flat' and 'ivf' remove vectors from FAISS for real (`remove_ids`).
- 'hnsw' cannot remove nodes from its graph. Removed ids become *tombstones*: every search
  passes FAISS an `IDSelectorNot(tombstones)`, so the graph walk may step through a removed
  node but never returns it (no over-fetch guesswork). When tombstones exceed
  `hnsw_compact_fraction` of the stored vectors, the graph is rebuilt from the live vectors,
  because a graph full of dead nodes slowly loses recall. The rebuild costs as much as a fresh
  build (minutes for 1M entities on 2 cores) and holds the write lock, so searches wait: raise
  the fraction, or call `compact()` at a quiet time, where that matters.
An update is a removal plus an add under one write lock: the entity gets a fresh id, and readers
never see it missing or twice.

On disk an index is a self-describing directory, written atomically (temporary sibling, then
rename):
    manifest.json   format, kind, config, dim, counts, FAISS and mmel versions, caller metadata, the
                    SHA-256 of faiss.index (checked before FAISS reads it), the search setting and
                    the recall measured when it was chosen (`retrieval/index_tuning.py`)
    faiss.index     faiss.write_index output (IndexIDMap2 for flat/HNSW, IndexIVFFlat or IndexIVFScalarQuantizer;
                    ids included)
    id_map.json     {"qids": [qid or null per id], "tombstones": [ids]}
`VectorIndex.load(dir, expect={...})` refuses a directory whose metadata (model fingerprint,
backbone, KB checksum...) differs from what the caller expects.

Shapes: N entities, Q queries, D vector width, K hits per query.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from mmel.core.config import ConfigBase, ConfigError
from mmel.core.errors import DataError, MismatchError, NotFoundError, UsageError
from mmel.core.manifest import read_manifest
from mmel.core.paths import atomic_directory, atomic_write_json, read_json, sha256_file
from mmel.retrieval.index_tuning import (
    TuningQueries,
    TuningResult,
    geometric_ladder,
    noisy_copies,
    tune_search_setting,
)

FORMAT_NAME = "mmel-vector-index"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
FAISS_FILE = "faiss.index"
ID_MAP_FILE = "id_map.json"
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")
IVF_CODES = ("flat", "fp16", "sq8")
# FAISS scalar quantizers of the non-flat IVF codes: fp16 halves the lists' memory with scores within
# ~1e-3 of float32; sq8 quarters it with a per-dimension 8-bit range.
_IVF_QUANTIZERS = {"fp16": faiss.ScalarQuantizer.QT_fp16, "sq8": faiss.ScalarQuantizer.QT_8bit}
HNSW_MAX_EF_SEARCH = 4096
ADD_CHUNK_SIZE = 50_000          # vectors normalised and added per step (bounds the extra memory)
_IVF_MIN_POINTS_PER_LIST = 39    # FAISS warns when k-means gets fewer training points per centroid
_ABSENT = object()


@dataclass
class IndexConfig(ConfigBase):
    """How a VectorIndex is built and searched. Defaults suit KBs of 10K-1M entities on a few CPU cores."""

    kind: str = "auto"                      # 'auto', 'flat' (exact), 'hnsw' or 'ivf'
    exact_max_entities: int = 200_000       # 'auto' builds an exact index up to this many entities, IVF above
    hnsw_links_per_node: int = 32           # HNSW's M
    hnsw_ef_construction: int = 80          # candidate list while inserting; higher = better graph, slower build
    hnsw_ef_search: int = 0                 # search candidate list (raised to K); 0 = tuned to the recall target
    hnsw_compact_fraction: float = 0.25     # rebuild the graph once this share of stored vectors is deleted
    ivf_num_lists: int = 0                  # 0 = about 4 * sqrt(N), capped by the training sample size
    ivf_num_probes: int = 0                 # lists scanned per query; 0 = tuned to the recall target at build time
    ivf_codes: str = "fp16"                 # IVF vector storage: 'fp16' (half of float32), 'flat' (float32), 'sq8'
    #                                         (a quarter); fp16 met the 1M serving-memory target, same recall (RESULTS)
    ivf_max_train_vectors: int = 100_000    # k-means sample size
    ivf_train_iterations: int = 10          # k-means iterations (FAISS's default 25 took ~3x longer at 1M for
                                            # centroids the recall tuning compensates with a few more probes)
    recall_target: float = 0.995            # tuned settings: share of exactly-found golds the index must find...
    recall_k: int = 100                     # ...in its top this many hits
    tuning_queries: int = 1000              # held-out queries measured (noisy copies unless the caller gives real ones)
    tuning_query_cosine: float = 0.8        # cosine of a noisy copy to its source vector
    seed: int = 0                           # for the IVF training sample and the tuning queries

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ConfigError(f"unknown index kind {self.kind!r}; available: {', '.join(INDEX_KINDS)}")
        positive = ("exact_max_entities", "hnsw_links_per_node", "hnsw_ef_construction", "ivf_max_train_vectors",
                    "recall_k", "tuning_queries", "ivf_train_iterations")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"IndexConfig.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("ivf_num_lists", "ivf_num_probes", "hnsw_ef_search"):
            if getattr(self, name) < 0:
                raise ConfigError(f"IndexConfig.{name} must be 0 (automatic) or positive, got {getattr(self, name)}")
        if self.ivf_codes not in IVF_CODES:
            raise ConfigError(f"unknown ivf_codes {self.ivf_codes!r}; available: {', '.join(IVF_CODES)}")
        for name in ("recall_target", "tuning_query_cosine"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"IndexConfig.{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0.0 < self.hnsw_compact_fraction <= 1.0:
            raise ConfigError(f"IndexConfig.hnsw_compact_fraction must be in (0, 1], got {self.hnsw_compact_fraction}")

    def resolve_kind(self, num_entities: int) -> str:
        """The concrete kind for a KB of `num_entities`: 'auto' becomes 'flat' or 'ivf'.

        IVF, not HNSW, above the exact limit: on 2 CPU cores it built a 1M-entity index 4x faster
        and found the query's source entity far more often (docs/RESULTS.md, bench/bench_index.py).
        """
        if self.kind != "auto":
            return self.kind
        return "flat" if num_entities <= self.exact_max_entities else "ivf"

    def fixed_search_setting(self, kind: str) -> int:
        """The search setting the config fixes for `kind` (IVF probes, HNSW efSearch); 0 = tune it."""
        return {"ivf": self.ivf_num_probes, "hnsw": self.hnsw_ef_search}.get(kind, 0)


@dataclass
class SearchResult:
    """Nearest entities of Q queries, best first.

    `qids[q]` holds up to K QIDs; it is shorter than K only when the index holds fewer than K live
    entities or an approximate index reached fewer. `scores` is [Q, K] float32 cosine similarity,
    padded with -inf where `qids[q]` is shorter.
    """

    qids: list[list[str]]
    scores: np.ndarray  # [Q, K]


class _ReadWriteLock:
    """Many concurrent searches, or one mutation: FAISS search is read-only, add/remove are not."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writing = False

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self._condition:
            while self._writing:
                self._condition.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self._condition:
            while self._writing or self._readers:
                self._condition.wait()
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()


class VectorIndex:
    """FAISS index of entity vectors with stable ids, QID lookup, deletes and a self-describing directory.

    Make one with `VectorIndex.build(vectors, qids, config)` or `VectorIndex.load(directory)`.
    All methods are safe to call from several threads: searches run concurrently, mutations alone.
    """

    def __init__(self, faiss_index: faiss.Index, *, kind: str, config: IndexConfig, dim: int,
                 qid_by_id: list[str | None], tombstones: set[int], metadata: dict[str, Any],
                 tuning: dict[str, Any] | None = None):
        self._faiss = faiss_index
        self.kind = kind
        self.config = config
        self.dim = dim
        self.metadata = dict(metadata)
        self.tuning = tuning   # TuningResult.to_dict() of a tuned search setting, else None
        self.read_only = False  # set by load(read_only=True): the vectors are a shared read-only mapping
        self.search_setting = config.fixed_search_setting(kind) or int((tuning or {}).get("value", 0))
        self._qid_by_id = qid_by_id
        self._id_by_qid = {qid: vector_id for vector_id, qid in enumerate(qid_by_id) if qid is not None}
        self._tombstones = tombstones
        self._search_filter: faiss.IDSelector | None = None
        self._filter_parts: tuple[Any, ...] = ()
        self._lock = _ReadWriteLock()
        self._refresh_search_filter()

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def build(cls, vectors: np.ndarray, qids: Sequence[str], config: IndexConfig | None = None, *,
              metadata: Mapping[str, Any] | None = None, progress: bool = True,
              tuning_queries: TuningQueries | None = None) -> VectorIndex:
        """Index `vectors` [N, D] under `qids` (N unique strings), choosing the kind from `config`.

        An approximate kind whose search setting the config leaves at 0 is tuned to
        `config.recall_target`, measured on `tuning_queries` (rows of `vectors` as golds) or on
        noisy copies of `vectors`.
        """
        config = config or IndexConfig()
        vectors = _as_matrix(vectors, "vectors")
        stored_metadata = _json_metadata(metadata or {})  # checked before any expensive work
        qids = _checked_batch(vectors, qids)
        kind = config.resolve_kind(len(vectors))
        dim = vectors.shape[1]
        faiss_index = _new_faiss_index(kind, dim, config, vectors)
        index = cls(faiss_index, kind=kind, config=config, dim=dim, qid_by_id=[], tombstones=set(),
                    metadata=stored_metadata)
        with index._lock.writing():
            index._insert_locked(vectors, qids, progress=progress)
            if kind != "flat" and not config.fixed_search_setting(kind):
                index._tune_locked(vectors, tuning_queries)
        return index

    # --- queries ----------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of live (not deleted) entities."""
        return len(self._id_by_qid)

    def __contains__(self, qid: object) -> bool:
        return qid in self._id_by_qid

    def qids(self) -> list[str]:
        """Live QIDs in insertion order."""
        with self._lock.reading():
            return [qid for qid in self._qid_by_id if qid is not None]

    @property
    def num_tombstones(self) -> int:
        """Deleted vectors still inside the HNSW graph (always 0 for 'flat' and 'ivf')."""
        return len(self._tombstones)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """The `k` most similar live entities for each query in `queries` [Q, D] (normalised here)."""
        if k < 1:
            raise UsageError(f"k must be at least 1, got {k}")
        queries = _normalised(_as_matrix(queries, "queries", expected_dim=self.dim), "queries")
        with self._lock.reading():
            k_reachable = min(k, len(self._id_by_qid))
            if k_reachable == 0:
                return SearchResult([[] for _ in range(len(queries))], np.full((len(queries), 0), -np.inf, np.float32))
            scores, ids = self._faiss.search(queries, k_reachable, params=self._search_parameters(k_reachable))
            return self._to_result(scores, ids)

    # --- mutations --------------------------------------------------------------------------
    def add(self, vectors: np.ndarray, qids: Sequence[str]) -> None:
        """Add new entities; they are searchable as soon as this returns. Existing QIDs raise: use update()."""
        self._check_writable()
        vectors = _as_matrix(vectors, "vectors", expected_dim=self.dim)
        with self._lock.writing():
            self._add_locked(vectors, qids, progress=False)

    def remove(self, qids: Sequence[str]) -> None:
        """Delete entities; no later search returns them. Unknown QIDs raise KeyError and nothing is removed."""
        self._check_writable()
        with self._lock.writing():
            self._remove_locked(_unique_qids(qids, "qids"))

    def update(self, qids: Sequence[str], vectors: np.ndarray) -> None:
        """Replace the vectors of existing entities (a remove plus an add, seen by readers as one step)."""
        self._check_writable()
        vectors = _as_matrix(vectors, "vectors", expected_dim=self.dim)
        qids = _checked_batch(vectors, qids)
        with self._lock.writing():
            self._remove_locked(qids)
            self._insert_locked(vectors, qids, progress=False)

    def compact(self) -> None:
        """Rebuild an HNSW graph without its tombstones (no-op for 'flat' and 'ivf', which delete for real)."""
        self._check_writable()
        with self._lock.writing():
            self._compact_locked()

    def _check_writable(self) -> None:
        if self.read_only:
            raise UsageError("this vector index was opened read-only (memory-mapped); open it without read_only "
                             "to change it")

    # --- tuning -----------------------------------------------------------------------------
    def _tune_locked(self, vectors: np.ndarray, queries: TuningQueries | None) -> None:
        """Pick the cheapest search setting that reaches the recall target (ids are still the build rows)."""
        config = self.config
        queries = queries or noisy_copies(vectors, config.tuning_queries, cosine=config.tuning_query_cosine,
                                          seed=config.seed)
        queries = TuningQueries(_normalised(queries.vectors, "tuning queries"), queries.gold_rows, queries.source)
        if self.kind == "ivf":
            parameter, ladder = "nprobe", geometric_ladder(1, int(faiss.extract_index_ivf(self._faiss).nlist))
        else:
            parameter, ladder = "efSearch", geometric_ladder(16, HNSW_MAX_EF_SEARCH)

        def search(query_vectors: np.ndarray, k: int, setting: int) -> np.ndarray:
            return self._faiss.search(query_vectors, k, params=self._parameters_for(setting, k))[1]

        result: TuningResult = tune_search_setting(search, ladder, parameter=parameter, vectors=vectors,
                                                   queries=queries, k=min(config.recall_k, len(vectors)),
                                                   target=config.recall_target)
        self.tuning, self.search_setting = result.to_dict(), result.value

    # --- persistence ------------------------------------------------------------------------
    def save(self, directory: Path) -> Path:
        """Write the index directory atomically (a crash leaves the previous version or nothing)."""
        from mmel import __version__

        directory = Path(directory)
        with self._lock.reading(), atomic_directory(directory) as tmp:
            faiss.write_index(self._faiss, str(tmp / FAISS_FILE))
            faiss_sha256 = sha256_file(tmp / FAISS_FILE)
            atomic_write_json(tmp / ID_MAP_FILE, {"qids": self._qid_by_id, "tombstones": sorted(self._tombstones)},
                              indent=None)
            atomic_write_json(tmp / MANIFEST_FILE, {
                "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": self.kind,
                "config": self.config.to_dict(), "dim": self.dim, "count": len(self._id_by_qid),
                "stored_vectors": int(self._faiss.ntotal), "faiss_version": faiss.__version__,
                "mmel_version": __version__, "metadata": self.metadata, "faiss_sha256": faiss_sha256,
                "search_setting": self.search_setting, "tuning": self.tuning,
            })
        return directory

    @classmethod
    def load(cls, directory: Path, *, expect: Mapping[str, Any] | None = None, read_only: bool = False,
             ) -> VectorIndex:
        """Open an index directory; each `expect` key must equal the saved metadata value, else MismatchError.

        `read_only`: FAISS memory-maps the stored vectors instead of reading them into this process
        (processes opening the same index share them through the page cache: batch-linking workers);
        add, remove, update and compact then refuse.
        """
        directory = Path(directory)
        manifest = read_index_manifest(directory)
        check_expected_metadata(manifest, expect or {}, source=directory / MANIFEST_FILE)
        id_map_path = directory / ID_MAP_FILE
        qid_by_id, tombstones = _parse_id_map(read_json(id_map_path), id_map_path)
        _check_faiss_checksum(directory / FAISS_FILE, manifest)
        faiss_index = faiss.read_index(str(directory / FAISS_FILE), faiss.IO_FLAG_MMAP_IFC if read_only else 0)
        _check_consistent(manifest, faiss_index, qid_by_id, tombstones, directory)
        index = cls(faiss_index, kind=manifest["kind"], config=IndexConfig.from_dict(manifest["config"]),
                    dim=manifest["dim"], qid_by_id=qid_by_id, tombstones=tombstones, metadata=manifest["metadata"],
                    tuning=manifest.get("tuning"))
        index.read_only = read_only
        return index

    # --- internals (callers hold the write lock) --------------------------------------------
    def _add_locked(self, vectors: np.ndarray, qids: Sequence[str], *, progress: bool) -> None:
        """Check everything first, then insert: a bad row must not leave half a batch in FAISS."""
        qids = _checked_batch(vectors, qids)
        present = [qid for qid in qids if qid in self._id_by_qid]
        if present:
            raise UsageError(f"{len(present)} QID(s) already indexed, e.g. {present[:5]}; use update() to replace")
        self._insert_locked(vectors, qids, progress=progress)

    def _insert_locked(self, vectors: np.ndarray, qids: list[str], *, progress: bool) -> None:
        first_id = len(self._qid_by_id)
        starts = range(0, len(vectors), ADD_CHUNK_SIZE)
        show = progress and len(starts) > 1
        for start in tqdm(starts, desc=f"indexing ({self.kind})", unit="chunk", disable=not show):
            chunk = _normalised(vectors[start:start + ADD_CHUNK_SIZE], "vectors", first_row=start)
            ids = np.arange(first_id + start, first_id + start + len(chunk), dtype=np.int64)
            self._faiss.add_with_ids(chunk, ids)
        self._qid_by_id.extend(qids)
        self._id_by_qid.update((qid, first_id + offset) for offset, qid in enumerate(qids))

    def _remove_locked(self, qids: list[str]) -> None:
        self._check_present(qids)
        ids = np.array([self._id_by_qid.pop(qid) for qid in qids], dtype=np.int64)
        for vector_id in ids:
            self._qid_by_id[vector_id] = None
        if self.kind == "hnsw":
            self._tombstones.update(int(vector_id) for vector_id in ids)
            if len(self._tombstones) > self.config.hnsw_compact_fraction * self._faiss.ntotal:
                self._compact_locked()
            self._refresh_search_filter()
        else:
            self._faiss.remove_ids(faiss.IDSelectorBatch(ids))

    def _check_present(self, qids: list[str]) -> None:
        missing = [qid for qid in qids if qid not in self._id_by_qid]
        if missing:
            raise NotFoundError(f"{len(missing)} QID(s) not in the index, e.g. {missing[:5]}")

    def _compact_locked(self) -> None:
        if self.kind != "hnsw" or not self._tombstones:
            return
        inner = faiss.downcast_index(self._faiss.index)
        stored_ids = faiss.vector_to_array(self._faiss.id_map)                    # [S]
        live_rows = np.flatnonzero(~np.isin(stored_ids, np.fromiter(self._tombstones, np.int64)))
        live_vectors = inner.storage.reconstruct_n(0, self._faiss.ntotal)[live_rows]  # [N, D], already unit
        rebuilt = _new_faiss_index("hnsw", self.dim, self.config, live_vectors)
        for start in range(0, len(live_rows), ADD_CHUNK_SIZE):
            rows = live_rows[start:start + ADD_CHUNK_SIZE]
            rebuilt.add_with_ids(np.ascontiguousarray(live_vectors[start:start + ADD_CHUNK_SIZE]), stored_ids[rows])
        self._faiss = rebuilt
        self._tombstones = set()
        self._refresh_search_filter()

    def _refresh_search_filter(self) -> None:
        """Cache the selector that hides tombstones (building it hashes every tombstone id)."""
        if not self._tombstones:
            self._search_filter, self._filter_parts = None, ()
            return
        removed = faiss.IDSelectorBatch(np.fromiter(self._tombstones, np.int64))
        self._search_filter = faiss.IDSelectorNot(removed)
        self._filter_parts = (removed,)  # keep the wrapped selector alive as long as the filter

    def _search_parameters(self, k: int) -> faiss.SearchParameters | None:
        return self._parameters_for(self.search_setting, k)

    def _parameters_for(self, setting: int, k: int) -> faiss.SearchParameters | None:
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=max(setting, k), sel=self._search_filter)
        if self.kind == "ivf":
            return faiss.SearchParametersIVF(nprobe=setting)
        return None

    def _to_result(self, scores: np.ndarray, ids: np.ndarray) -> SearchResult:
        qids = [[self._qid_by_id[vector_id] for vector_id in row if vector_id >= 0] for row in ids]
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)  # [Q, K]
        return SearchResult(qids=qids, scores=scores)  # type: ignore[arg-type]  # ids >= 0 are live


# --- manifest helpers (shared with the index directory's other readers) ---------------------------
def read_index_manifest(directory: Path) -> dict[str, Any]:
    """Read and check manifest.json of an index directory (format and version)."""
    manifest = read_manifest(directory, file_name=MANIFEST_FILE, format_name=FORMAT_NAME,
                             format_version=FORMAT_VERSION, what="mmel vector index")
    path = Path(directory) / MANIFEST_FILE
    for key, kind in (("kind", str), ("config", dict), ("dim", int), ("count", int), ("metadata", dict)):
        if not isinstance(manifest.get(key), kind):
            raise DataError(f"field {key!r} must be a {kind.__name__}", path=path)
    return manifest


def check_expected_metadata(manifest: Mapping[str, Any], expect: Mapping[str, Any], *, source: object) -> None:
    """Raise MismatchError naming every `expect` key whose saved value differs (or is absent).

    Expected values go through the same JSON round trip as the saved ones, so a tuple expected
    where the manifest holds a list still matches.
    """
    saved = manifest.get("metadata", {})
    problems = [f"{key}: index has {saved.get(key, '<absent>')!r}, expected {value!r}"
                for key, value in expect.items() if saved.get(key, _ABSENT) != json.loads(json.dumps(value))]
    if problems:
        raise MismatchError(f"{source}: the index was built for something else; {'; '.join(problems)}. "
                            "Rebuild the index for this model and KB, or load the matching model.")


def _check_faiss_checksum(path: Path, manifest: Mapping[str, Any]) -> None:
    """Refuse a FAISS file whose bytes differ from what the manifest recorded (before FAISS parses them)."""
    expected = manifest.get("faiss_sha256")
    if not isinstance(expected, str):
        raise DataError("no 'faiss_sha256' recorded (an index written before checksums): rebuild it",
                        path=path.parent / MANIFEST_FILE)
    if not path.is_file():
        raise DataError("FAISS file missing; the directory was copied partially: rebuild it", path=path)
    if sha256_file(path) != expected:
        raise MismatchError(f"{path}: SHA-256 differs from the manifest's; the file was changed or damaged after "
                            "it was written: rebuild the index")


def _parse_id_map(raw: Any, path: Path) -> tuple[list[str | None], set[int]]:
    if not (isinstance(raw, dict) and isinstance(raw.get("qids"), list) and isinstance(raw.get("tombstones"), list)):
        raise DataError("expected an object with lists 'qids' and 'tombstones'", path=path)
    qid_by_id: list[str | None] = raw["qids"]
    seen: set[str] = set()
    for vector_id, qid in enumerate(qid_by_id):
        if qid is None:
            continue
        if not isinstance(qid, str) or qid in seen:
            raise DataError(f"invalid or duplicate QID {qid!r}", path=path, record=f"id {vector_id}")
        seen.add(qid)
    tombstones = set(raw["tombstones"])
    if any(not isinstance(t, int) or not 0 <= t < len(qid_by_id) or qid_by_id[t] is not None for t in tombstones):
        raise DataError("tombstones must be ids of deleted entities", path=path)
    return qid_by_id, tombstones


def _check_consistent(manifest: dict[str, Any], faiss_index: faiss.Index, qid_by_id: list[str | None],
                      tombstones: set[int], directory: Path) -> None:
    live = sum(qid is not None for qid in qid_by_id)
    counts = {"manifest count": manifest["count"], "live QIDs in the id map": live,
              "FAISS vectors minus tombstones": int(faiss_index.ntotal) - len(tombstones)}
    if len(set(counts.values())) != 1 or faiss_index.d != manifest["dim"]:
        raise MismatchError(f"{directory}: index files disagree ({counts}, FAISS dim {faiss_index.d} vs manifest "
                            f"{manifest['dim']}); the directory was modified by hand or copied partially: rebuild it")


def _new_faiss_index(kind: str, dim: int, config: IndexConfig, training_vectors: np.ndarray) -> faiss.Index:
    """An empty FAISS index of `kind` that stores caller-given int64 ids.

    Flat and HNSW get an IndexIDMap2 wrapper. IVF keeps ids in its inverted lists itself and must
    not be wrapped: IndexIDMap's remove_ids assumes the inner index shifts rows down like a flat
    index, which IVF does not, so a wrapped IVF returns wrong ids after a delete.
    """
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "hnsw":
        graph = faiss.IndexHNSWFlat(dim, config.hnsw_links_per_node, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = config.hnsw_ef_construction
        return faiss.IndexIDMap2(graph)
    return _trained_ivf_index(dim, config, training_vectors)


def _trained_ivf_index(dim: int, config: IndexConfig, vectors: np.ndarray) -> faiss.Index:
    if len(vectors) < _IVF_MIN_POINTS_PER_LIST:
        raise UsageError(f"an 'ivf' index needs at least {_IVF_MIN_POINTS_PER_LIST} vectors to train, got "
                         f"{len(vectors)}; use kind 'flat' for a KB this small")
    rng = np.random.default_rng(config.seed)
    sample_size = min(len(vectors), config.ivf_max_train_vectors)
    sample_rows = np.sort(rng.choice(len(vectors), size=sample_size, replace=False))
    sample = _normalised(vectors[sample_rows], "vectors")
    wanted_lists = config.ivf_num_lists or int(4 * np.sqrt(len(vectors)))
    num_lists = max(1, min(wanted_lists, sample_size // _IVF_MIN_POINTS_PER_LIST))
    if config.ivf_codes in _IVF_QUANTIZERS:
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, num_lists,
                                              _IVF_QUANTIZERS[config.ivf_codes], faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, num_lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = config.seed
    index.cp.niter = config.ivf_train_iterations
    index.train(sample)
    return index


# --- input checks ---------------------------------------------------------------------------------
def _as_matrix(array: np.ndarray, name: str, *, expected_dim: int | None = None) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise UsageError(f"{name} must be a 2-D array [rows, dim], got shape {array.shape}")
    if expected_dim is not None and array.shape[1] != expected_dim:
        raise UsageError(f"{name} have width {array.shape[1]} but the index holds {expected_dim}-dim vectors")
    if not np.issubdtype(array.dtype, np.floating):
        raise UsageError(f"{name} must be floating point, got {array.dtype}")
    return array


def _checked_batch(vectors: np.ndarray, qids: Sequence[str]) -> list[str]:
    """Validate a batch to insert (QIDs, counts, every row usable) without copying the vectors."""
    qids = _unique_qids(qids, "qids")
    if len(qids) != len(vectors):
        raise UsageError(f"got {len(vectors)} vectors but {len(qids)} QIDs")
    for start in range(0, len(vectors), ADD_CHUNK_SIZE):
        _normalised(vectors[start:start + ADD_CHUNK_SIZE], "vectors", first_row=start)
    return qids


def _normalised(vectors: np.ndarray, name: str, *, first_row: int = 0) -> np.ndarray:
    """A float32 copy of `vectors` with unit rows; zero or non-finite rows raise, naming the rows."""
    matrix = np.array(vectors, dtype=np.float32, order="C")  # copy: never change the caller's array
    bad = ~np.isfinite(matrix).all(axis=1)
    if bad.any():
        raise UsageError(f"{name} rows {(np.flatnonzero(bad)[:5] + first_row).tolist()} contain NaN or inf")
    norms = np.linalg.norm(matrix, axis=1)
    zero = norms == 0
    if zero.any():
        raise UsageError(f"{name} rows {(np.flatnonzero(zero)[:5] + first_row).tolist()} are all zeros "
                         "and have no direction to compare")
    matrix /= norms[:, None]
    return matrix


def _unique_qids(qids: Sequence[str], name: str) -> list[str]:
    qids = list(qids)
    bad = [qid for qid in qids if not isinstance(qid, str) or not qid]
    if bad:
        raise UsageError(f"{name} must be non-empty strings, got {bad[:5]}")
    duplicates = [qid for qid, count in Counter(qids).items() if count > 1]
    if duplicates:
        raise UsageError(f"{name} contain duplicates, e.g. {duplicates[:5]}")
    return qids


def _json_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata as manifest.json will hold it (tuples become lists); anything not plain JSON raises."""
    try:
        return json.loads(json.dumps(dict(metadata)))
    except TypeError as error:
        raise UsageError(f"index metadata must be JSON-serialisable: {error}") from None


__all__ = ["INDEX_KINDS", "IndexConfig", "SearchResult", "VectorIndex", "check_expected_metadata",
           "read_index_manifest"]
