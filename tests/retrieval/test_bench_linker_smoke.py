"""bench/bench_linker.py at toy size: synthetic entity features are reproducible row by row, and the
build / serve / exhaustive steps run in-process on a 600-entity KB and report consistent numbers."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmel.core.features import FeatureBatch

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "mimic-wikimel-minilm_effnet"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    return importlib.import_module("bench_linker")


def planted_batch() -> FeatureBatch:
    """Two planted rows for a table of text width 8, 3 tokens, image width 5, 2 patches of width 4."""
    generator = torch.Generator().manual_seed(1)
    shapes = {"text_global": (8,), "text_tokens": (3, 8), "image_global": (5,), "image_patches": (2, 4)}
    values = {name: torch.randn(2, *shape, generator=generator) for name, shape in shapes.items()}
    return FeatureBatch(**values, text_mask=torch.ones(2, 3, dtype=torch.bool), has_image=torch.tensor([True, False]))


def test_synthetic_rows_do_not_depend_on_how_they_are_gathered(bench):
    dims = {"text_dim": 8, "image_global_dim": 5, "image_patch_dim": 4, "num_patches": 2}
    planted = bench.planted_copies(planted_batch(), seed=3)
    table = bench.SyntheticEntityFeatures(500, text_length=3, spec_dims=dims, seed=3,
                                          planted_rows=np.array([7, 400]), planted=planted)
    whole = table.gather(np.arange(500))
    parts = table.gather(np.array([400, 7, 123]))
    for name in ("text_global", "text_tokens", "image_global", "image_patches", "has_image"):
        torch.testing.assert_close(getattr(parts, name), getattr(whole, name)[[400, 7, 123]])
    torch.testing.assert_close(whole.text_global.norm(dim=-1), torch.ones(500))
    torch.testing.assert_close(whole.text_tokens[7], planted.text_tokens[0])
    torch.testing.assert_close(whole.image_patches[7], planted.image_patches[0])
    torch.testing.assert_close(whole.text_global[400], planted.text_global[1])
    assert not torch.equal(whole.image_global[400], planted.image_global[1])   # no image: the random one stays
    assert 0.5 < whole.has_image.float().mean() < 0.9
    assert table.text_global_matrix().shape == (500, 8) and table.generation_seconds > 0


def test_prepare_build_serve_and_reference_at_toy_size(bench, linker_backbone, tmp_path):
    variants = (bench.Variant.parse("before:ivf_num_probes=16,cache_dtype=float16"), bench.Variant.parse("after:"))
    settings = bench.Settings(checkpoint=CHECKPOINT, ks=(10, 20), latency_queries=2, batch_queries=4,
                              exhaustive_pairs=10_000, exhaustive_max_entities=1_000, threads=1, seed=0,
                              variants=variants)
    assert settings.index_config(variants[0]).ivf_num_probes == 16
    assert bench.run_prepare(600, settings, tmp_path, backbone=linker_backbone)["queries"] == 4
    entries = []
    for variant in variants:
        build = bench.run_build(600, settings, tmp_path, variant)
        assert build["vector_index"] == "flat" and build["recall_tuning"] is None
        assert {"entity_cache", "vectors", "entity_store"} <= set(build["stages_s"]) and build["disk_mib"] > 0
        serve = bench.run_serve(600, settings, tmp_path, variant, backbone=linker_backbone)
        assert [search["k"] for search in serve["searches"]] == [10, 20]
        for search in serve["searches"]:
            assert search["batch_mentions_per_s"] > 0 and search["p95_ms"] >= search["p50_ms"] > 0
            assert search["gold_in_top_10"] == 1.0 and len(search["top1_qids"]) == 4
        assert serve["first_stage_recall"] == {"10": 1.0, "20": 1.0}
        entries.append({"name": variant.name, "build": build, "serve": serve})
    assert entries[0]["build"]["cache_dtype"] == "float16" and entries[1]["build"]["cache_dtype"] == "float32"

    reference = bench.run_reference(600, settings, tmp_path, variants[0])
    assert reference["mentions"] == 4 and reference["gold_at_1"] == 1.0 and reference["cache_of"] == "before"
    for entry in entries:
        entry["comparison"] = bench.compare(entry["serve"], reference)
        assert entry["comparison"]["gold_at_1_where_reference_finds_it"] == 1.0
    results = {"settings": {"ks": [10, 20]}, "cases": [{"size": 600, "variants": entries, "reference": reference}]}
    table = bench.markdown(results).splitlines()
    model = CHECKPOINT.name
    assert table[2].startswith(f"| 600 | before | {model} | flat (exact) | float16 |")
    assert table[3].startswith(f"| 600 | after | {model} |")


def test_a_variant_links_with_its_own_checkpoint(bench, linker_backbone, tmp_path):
    """DIM's own index (no reranker) timed in the same run as MIMIC two-stage, each on its own query features."""
    dim = CHECKPOINT.parent / "dim-wikimel-minilm_effnet"
    variants = (bench.Variant.parse("mimic:"),
                bench.Variant.parse(f"dim:checkpoint={dim},vectors=model,reranker=none"))
    assert variants[1].checkpoint == str(dim) and dict(variants[1].index_options) == {"vectors": "model",
                                                                                  "reranker": "none"}
    settings = bench.Settings(checkpoint=CHECKPOINT, ks=(10,), latency_queries=2, batch_queries=4,
                              exhaustive_pairs=10_000, exhaustive_max_entities=1_000, threads=1, seed=0,
                              variants=variants)
    assert settings.checkpoints == [CHECKPOINT, dim]
    assert json.loads(json.dumps(settings.record()))["variants"][1]["checkpoint"] == str(dim)   # the results file
    prepared = [bench.run_prepare(600, settings, tmp_path, number, backbone=linker_backbone) for number in (0, 1)]
    assert [entry["checkpoint"] for entry in prepared] == [str(CHECKPOINT), str(dim)]
    mimic_queries, _ = bench.load_queries(settings.queries_dir(tmp_path, variants[0]))
    dim_queries, _ = bench.load_queries(settings.queries_dir(tmp_path, variants[1]))
    assert [q.record() for q in mimic_queries] == [q.record() for q in dim_queries]   # one sample, two encodings

    build = bench.run_build(600, settings, tmp_path, variants[1])
    assert build["checkpoint"] == str(dim) and build["index_config"]["reranker"] == "none"
    serve = bench.run_serve(600, settings, tmp_path, variants[1], backbone=linker_backbone)
    assert serve["first_stage_recall"] is None and serve["searches"][0]["p50_ms"] > 0
    assert len(serve["searches"][0]["top1_qids"]) == 4
