"""VectorIndex: exact search, approximate recall, add/remove/update, persistence and its guards."""

from __future__ import annotations

import threading
from pathlib import Path

import faiss
import numpy as np
import pytest

from mmel.core.config import ConfigError
from mmel.core.errors import MismatchError
from mmel.core.paths import atomic_write_json, read_json
from mmel.retrieval.index import ADD_CHUNK_SIZE, IndexConfig, VectorIndex

DIM = 32
ALL_KINDS = ("flat", "hnsw", "ivf")


def random_vectors(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)  # [N, D]


def qids_for(count: int, prefix: str = "Q") -> list[str]:
    return [f"{prefix}{row}" for row in range(count)]


def exact_top_k(entities: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and cosine scores of the k nearest entities, computed with plain numpy."""
    unit_entities = entities / np.linalg.norm(entities, axis=1, keepdims=True)
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = unit_queries @ unit_entities.T                                        # [Q, N]
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(scores, rows, axis=1)


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """FAISS's OpenMP threads spin-wait; beside pytest-xdist workers they oversubscribe the cores ~5x."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def entities() -> np.ndarray:
    return random_vectors(1000, seed=0)


def build(kind: str, vectors: np.ndarray, **settings) -> VectorIndex:
    return VectorIndex.build(vectors, qids_for(len(vectors)), IndexConfig(kind=kind, **settings), progress=False)


def test_flat_search_equals_numpy(entities):
    queries = random_vectors(20, seed=1)
    result = build("flat", entities).search(queries, k=10)
    rows, scores = exact_top_k(entities, queries, 10)
    assert result.qids == [[f"Q{row}" for row in query_rows] for query_rows in rows]
    np.testing.assert_allclose(result.scores, scores, atol=1e-5)
    assert result.scores.shape == (20, 10)


@pytest.mark.parametrize(("kind", "minimum_recall"), [("hnsw", 0.95), ("ivf", 0.75)])
def test_approximate_kinds_recall_the_exact_neighbours(entities, kind, minimum_recall):
    queries = random_vectors(50, seed=2)
    fixed = {"hnsw": {"hnsw_ef_search": 128}, "ivf": {"ivf_num_probes": 16}}[kind]   # tuning targets gold recall
    result = build(kind, entities, **fixed).search(queries, k=10)
    exact_rows, _ = exact_top_k(entities, queries, 10)
    hits = [len(set(found) & {f"Q{row}" for row in rows}) for found, rows in zip(result.qids, exact_rows, strict=True)]
    assert np.mean(hits) / 10 >= minimum_recall


def test_auto_picks_exact_up_to_the_configured_size(entities):
    assert build("auto", entities, exact_max_entities=1000).kind == "flat"
    assert build("auto", entities, exact_max_entities=999).kind == "ivf"


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_added_entities_are_found_at_once(entities, kind):
    index = build(kind, entities)
    new = random_vectors(3, seed=3)
    index.add(new, ["NEW0", "NEW1", "NEW2"])
    assert len(index) == 1003 and "NEW1" in index
    assert [hits[0] for hits in index.search(new, k=1).qids] == ["NEW0", "NEW1", "NEW2"]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_removed_entities_are_never_returned(entities, kind):
    index = build(kind, entities, ivf_num_probes=1000)  # IVF scans every list, so it can list the whole index
    removed = qids_for(1000)[::5]
    index.remove(removed)
    result = index.search(entities[::5], k=50)
    assert not {qid for hits in result.qids for qid in hits} & set(removed)
    assert len(index) == 800 and "Q0" not in index
    assert index.num_tombstones == (200 if kind == "hnsw" else 0)  # HNSW filters them out at search time
    everything = index.search(entities[:1], k=2000)
    assert sorted(everything.qids[0]) == sorted(set(qids_for(1000)) - set(removed))


def test_hnsw_keeps_tombstones_until_the_compaction_fraction(entities):
    index = build("hnsw", entities, hnsw_compact_fraction=0.3)
    index.remove(qids_for(1000)[:250])
    assert index.num_tombstones == 250
    index.remove(qids_for(1000)[250:350])  # 350 of 1000 stored > 30 %: the graph is rebuilt without them
    assert index.num_tombstones == 0 and len(index) == 650
    assert index.search(entities[500:505], k=1).qids == [["Q500"], ["Q501"], ["Q502"], ["Q503"], ["Q504"]]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_update_moves_an_entity_to_its_new_vector(entities, kind):
    index = build(kind, entities)
    index.update(["Q7"], entities[900:901] * -1.0)
    assert index.search(-entities[900:901], k=1).qids == [["Q7"]]
    assert "Q7" not in index.search(entities[7:8], k=5).qids[0]
    assert len(index) == 1000


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_save_load_round_trip_gives_identical_results(entities, kind, tmp_path):
    index = VectorIndex.build(entities, qids_for(1000), IndexConfig(kind=kind), metadata={"kb_checksum": "abc"},
                              progress=False)
    index.remove(["Q3", "Q4"])
    index.add(random_vectors(2, seed=4), ["NEW0", "NEW1"])
    queries = random_vectors(10, seed=5)
    before = index.search(queries, k=20)
    loaded = VectorIndex.load(index.save(tmp_path / "index"))
    after = loaded.search(queries, k=20)
    assert after.qids == before.qids
    np.testing.assert_array_equal(after.scores, before.scores)
    assert (loaded.kind, loaded.dim, len(loaded), loaded.metadata) == (kind, DIM, 1000, {"kb_checksum": "abc"})
    assert loaded.num_tombstones == index.num_tombstones


def test_load_refuses_mismatched_metadata(entities, tmp_path):
    metadata = {"model_fingerprint": "mimic-aaa", "kb_checksum": "123", "dims": (384, 1280)}
    directory = VectorIndex.build(entities, qids_for(1000), metadata=metadata, progress=False).save(tmp_path / "i")
    assert len(VectorIndex.load(directory, expect=metadata)) == 1000  # the tuple saved as a JSON list still matches
    with pytest.raises(MismatchError, match=r"model_fingerprint: index has 'mimic-aaa', expected 'mimic-bbb'"):
        VectorIndex.load(directory, expect={"model_fingerprint": "mimic-bbb"})
    with pytest.raises(MismatchError, match=r"backbone: index has '<absent>', expected 'clip'"):
        VectorIndex.load(directory, expect={"backbone": "clip"})


def test_load_refuses_files_that_disagree(entities, tmp_path):
    directory = build("flat", entities).save(tmp_path / "index")
    id_map = read_json(directory / "id_map.json")
    id_map["qids"][0] = None
    atomic_write_json(directory / "id_map.json", id_map)
    with pytest.raises(MismatchError, match="index files disagree"):
        VectorIndex.load(directory)


def test_load_refuses_a_directory_that_is_not_an_index(tmp_path):
    with pytest.raises(MismatchError, match=r"manifest\.json is missing"):
        VectorIndex.load(tmp_path)


def test_failed_save_keeps_the_previous_version_and_no_partial_files(entities, tmp_path):
    index = build("flat", entities)
    directory = index.save(tmp_path / "index")
    saved_files = sorted(path.name for path in directory.iterdir())
    index.add(random_vectors(1, seed=6), ["NEW"])
    index.metadata["not_json"] = object()  # makes the manifest write fail after faiss.index was written
    with pytest.raises(TypeError):
        index.save(directory)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index"]
    assert sorted(path.name for path in directory.iterdir()) == saved_files
    assert len(VectorIndex.load(directory)) == 1000


def test_search_handles_k_beyond_the_index_size_and_an_empty_index():
    index = build("flat", random_vectors(3, seed=7))
    result = index.search(random_vectors(2, seed=8), k=10)
    assert [len(hits) for hits in result.qids] == [3, 3] and result.scores.shape == (2, 3)
    index.remove(["Q0", "Q1", "Q2"])
    empty = index.search(random_vectors(2, seed=8), k=10)
    assert empty.qids == [[], []] and empty.scores.shape == (2, 0)


def test_bad_inputs_raise_clear_errors(entities):
    index = build("flat", entities[:10])
    with pytest.raises(ValueError, match="width 16 but the index holds 32-dim"):
        index.search(np.ones((1, 16), np.float32), k=1)
    with pytest.raises(ValueError, match="already indexed"):
        index.add(entities[:1], ["Q0"])
    with pytest.raises(ValueError, match="duplicates"):
        index.add(entities[:2], ["X", "X"])
    with pytest.raises(ValueError, match=r"rows \[1\] are all zeros"):
        index.add(np.vstack([entities[0], np.zeros(DIM)]).astype(np.float32), ["A", "B"])
    with pytest.raises(ValueError, match="got 2 vectors but 1 QIDs"):
        index.add(entities[:2], ["A"])
    with pytest.raises(KeyError, match="not in the index"):
        index.remove(["Q1", "nope"])
    assert "Q1" in index and len(index) == 10
    with pytest.raises(ValueError, match="k must be at least 1"):
        index.search(entities[:1], k=0)
    with pytest.raises(ValueError, match="at least 39 vectors"):
        build("ivf", entities[:10])
    with pytest.raises(ConfigError, match="available: auto, flat, hnsw, ivf"):
        IndexConfig(kind="lsh")


def test_a_bad_row_anywhere_in_a_batch_adds_nothing(entities):
    index = build("flat", entities[:10])
    batch = np.random.default_rng(10).standard_normal((ADD_CHUNK_SIZE + 1, DIM)).astype(np.float32)
    batch[-1] = np.nan  # in the second chunk: the first chunk must not have been inserted
    with pytest.raises(ValueError, match=rf"rows \[{ADD_CHUNK_SIZE}\] contain NaN"):
        index.add(batch, qids_for(len(batch), "B"))
    assert len(index) == 10 and index.search(batch[:1], k=1).qids[0][0].startswith("Q")
    with pytest.raises(ValueError, match="all zeros"):
        index.update(["Q1"], np.zeros((1, DIM), np.float32))
    assert "Q1" in index and index.search(entities[1:2], k=1).qids == [["Q1"]]


def test_caller_vectors_are_not_modified(entities):
    copy = entities.copy()
    build("flat", entities).search(entities[:3], k=1)
    np.testing.assert_array_equal(entities, copy)


def test_concurrent_searches_and_adds_stay_consistent(entities):
    index = build("hnsw", entities)
    extra = random_vectors(200, seed=9)
    failures: list[BaseException] = []

    def search_repeatedly() -> None:
        try:
            for _ in range(30):
                result = index.search(entities[:4], k=5)
                assert [hits[0] for hits in result.qids] == ["Q0", "Q1", "Q2", "Q3"]
        except BaseException as error:  # collected and re-raised in the main thread
            failures.append(error)

    readers = [threading.Thread(target=search_repeatedly) for _ in range(3)]
    for reader in readers:
        reader.start()
    for start in range(0, 200, 20):
        index.add(extra[start:start + 20], qids_for(200, "N")[start:start + 20])
    for reader in readers:
        reader.join()
    assert not failures
    assert len(index) == 1200


def test_saved_manifest_describes_the_index(entities, tmp_path: Path):
    manifest = read_json(build("ivf", entities).save(tmp_path / "i") / "manifest.json")
    assert manifest["kind"] == "ivf" and manifest["dim"] == DIM and manifest["count"] == 1000
    assert {"faiss_version", "mmel_version", "config", "metadata"} <= set(manifest)
