"""Recall-targeted index builds, IVF 8-bit codes, and the FAISS file checksum."""

from __future__ import annotations

import numpy as np
import pytest

from mmel.core.errors import DataError, MismatchError, UsageError
from mmel.core.paths import atomic_write_json, read_json
from mmel.retrieval.index import IndexConfig, VectorIndex
from mmel.retrieval.index_tuning import (
    TuningQueries,
    exact_gold_in_top_k,
    geometric_ladder,
    noisy_copies,
)

DIM = 32


def clustered_vectors(count: int, seed: int) -> np.ndarray:
    """Unit vectors around 40 centres: neighbours spread over several IVF lists, so probes matter."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, DIM))
    vectors = centres[rng.integers(0, 40, count)] + 0.9 * rng.standard_normal((count, DIM))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def entities() -> np.ndarray:
    return clustered_vectors(4000, seed=0)


def qids(count: int) -> list[str]:
    return [f"Q{row}" for row in range(count)]


def recall_on_fresh_queries(index: VectorIndex, vectors: np.ndarray, k: int = 100) -> float:
    """Share of exactly-found golds the index finds, on queries the tuning never saw."""
    queries = noisy_copies(vectors, 400, cosine=0.8, seed=99)
    exact = exact_gold_in_top_k(vectors, queries, k)
    found = index.search(queries.vectors, k)
    hit = np.array([f"Q{row}" in hits for row, hits in zip(queries.gold_rows, found.qids, strict=True)])
    return float((hit & exact).sum() / exact.sum())


def test_a_higher_recall_target_forces_more_probes_and_holds_on_fresh_queries(entities):
    loose = VectorIndex.build(entities, qids(len(entities)), IndexConfig(kind="ivf", recall_target=0.6),
                              progress=False)
    strict = VectorIndex.build(entities, qids(len(entities)), IndexConfig(kind="ivf", recall_target=0.995),
                               progress=False)
    assert strict.search_setting > loose.search_setting >= 1
    assert strict.tuning["parameter"] == "nprobe" and strict.tuning["reached"]
    assert strict.tuning["recall"] >= 0.995 and strict.tuning["queries"] == 1000
    tried = [step["value"] for step in strict.tuning["ladder"]]
    assert tried == geometric_ladder(1, 10**6)[:len(tried)]
    assert geometric_ladder(1, 64) == [1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64]
    assert recall_on_fresh_queries(strict, entities) >= 0.98
    assert recall_on_fresh_queries(loose, entities) < recall_on_fresh_queries(strict, entities)


def test_hnsw_tunes_its_search_list_and_a_fixed_setting_skips_tuning(entities):
    tuned = VectorIndex.build(entities, qids(len(entities)), IndexConfig(kind="hnsw"), progress=False)
    assert tuned.tuning["parameter"] == "efSearch" and tuned.search_setting == tuned.tuning["value"] >= 16
    fixed = VectorIndex.build(entities, qids(len(entities)), IndexConfig(kind="ivf", ivf_num_probes=3),
                              progress=False)
    assert fixed.tuning is None and fixed.search_setting == 3
    assert VectorIndex.build(entities[:100], qids(100), IndexConfig(kind="flat"), progress=False).tuning is None


def test_real_queries_replace_the_noisy_copies(entities):
    rows = np.arange(0, 4000, 20)
    real = TuningQueries(vectors=entities[rows] + 0.01, gold_rows=rows, source="dev mentions")
    index = VectorIndex.build(entities, qids(len(entities)), IndexConfig(kind="ivf"), tuning_queries=real,
                              progress=False)
    assert index.tuning["query_source"] == "dev mentions" and index.tuning["queries"] == 200


def test_an_unreachable_target_says_so(entities):
    far = noisy_copies(entities, 300, cosine=0.05, seed=3)   # golds that exact search mostly misses too
    index = VectorIndex.build(entities, qids(len(entities)), IndexConfig(kind="ivf", recall_target=1.0),
                              tuning_queries=far, progress=False)
    assert index.tuning["ceiling"] < 0.5
    assert index.search_setting == index.tuning["ladder"][-1]["value"]


def test_tuning_survives_save_and_load(entities, tmp_path):
    index = VectorIndex.build(entities, qids(len(entities)), IndexConfig(kind="ivf"), progress=False)
    loaded = VectorIndex.load(index.save(tmp_path / "i"))
    assert loaded.search_setting == index.search_setting and loaded.tuning == index.tuning
    queries = entities[:5]
    assert loaded.search(queries, 10).qids == index.search(queries, 10).qids


@pytest.mark.parametrize("codes", ["flat", "fp16", "sq8"])
def test_each_ivf_code_round_trips_and_finds_the_indexed_vectors(entities, codes, tmp_path):
    config = IndexConfig(kind="ivf", ivf_codes=codes)
    index = VectorIndex.build(entities, qids(len(entities)), config, progress=False)
    assert recall_on_fresh_queries(index, entities) >= 0.98
    loaded = VectorIndex.load(index.save(tmp_path / codes))
    assert loaded.search(entities[:5], 3).qids == index.search(entities[:5], 3).qids
    assert [hits[0] for hits in loaded.search(entities[:5], 1).qids] == qids(5)


def test_a_changed_faiss_file_is_refused_before_faiss_reads_it(entities, tmp_path):
    directory = VectorIndex.build(entities[:200], qids(200), IndexConfig(kind="flat"), progress=False).save(
        tmp_path / "i")
    data = bytearray((directory / "faiss.index").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (directory / "faiss.index").write_bytes(bytes(data))
    with pytest.raises(MismatchError, match="SHA-256 differs"):
        VectorIndex.load(directory)
    manifest = read_json(directory / "manifest.json")
    del manifest["faiss_sha256"]
    atomic_write_json(directory / "manifest.json", manifest)
    with pytest.raises(DataError, match="no 'faiss_sha256' recorded"):
        VectorIndex.load(directory)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_a_read_only_index_is_memory_mapped_searches_alike_and_refuses_changes(entities, kind, tmp_path):
    index = VectorIndex.build(entities, qids(len(entities)), IndexConfig(kind=kind), progress=False)
    mapped = VectorIndex.load(index.save(tmp_path / kind), read_only=True)
    assert mapped.read_only and not index.read_only
    assert mapped.search(entities[:7], 10).qids == index.search(entities[:7], 10).qids
    for change in (lambda: mapped.add(entities[:1], ["NEW"]), lambda: mapped.remove(["Q1"]),
                   lambda: mapped.update(["Q1"], entities[:1]), mapped.compact):
        with pytest.raises(UsageError, match="read-only"):
            change()
    assert len(mapped) == len(entities)
