"""`mmel evaluate --first-stage` ranks through the served linker: its top-k lists and numbers are the linker's.

The shipped checkpoint on the shipped example split, and the same checkpoint on a seeded sample of
a larger synthetic KB: the lists `Linker.rank_features` gives from stored features (what `mmel
evaluate` reads) equal those `Linker.link_mentions` gives when it encodes every query itself (what
a user of the index gets), and the evaluation report's metrics equal the metrics of the latter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmel.data import load_dataset
from mmel.data.synthetic import generate_dataset
from mmel.evaluation.protocols import gold_rows_for
from mmel.experiments.evaluate import SplitToRank, evaluate, ranking_from_links, served_linker
from mmel.features.store import build_features
from mmel.lexical.context_features import ContextPrior
from mmel.retrieval.index_build import ModelSpec

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "checkpoints" / "mimic-wikimel-minilm_effnet"
EXAMPLE = REPO / "examples" / "wikimel-mini"
TOP_K, CANDIDATES = 10, 100

pytestmark = pytest.mark.slow


def _lists(results) -> list[list[str]]:
    return [[candidate.qid for candidate in result.candidates] for result in results]


def _assert_evaluate_is_the_linker(dataset, features, split: str, sample: int = 0, prior=None) -> None:
    prior = prior if prior is not None else ModelSpec.read(SHIPPED).prior
    to_rank = SplitToRank.of(dataset, split, features, sample=sample, seed=7)
    with served_linker(dataset, SHIPPED, features, "hybrid", prior, progress=False) as linker:
        from_store = linker.rank_features(to_rank.mentions, to_rank.features, top_k=TOP_K, candidates_k=CANDIDATES)
        served = linker.link_mentions(to_rank.mentions, Path(dataset.root), top_k=CANDIDATES,
                                      candidates_k=CANDIDATES)
    assert _lists(from_store) == [lst[:TOP_K] for lst in _lists(served)]
    np.testing.assert_allclose([c.score for r in from_store for c in r.candidates],
                               [c.score for r in served for c in r.candidates[:TOP_K]], rtol=1e-4, atol=1e-4)
    report = evaluate(dataset, split, str(SHIPPED), features=features, first_stage="hybrid",
                      num_candidates=CANDIDATES, prior_weights=prior.to_dict(), sample=sample, seed=7, progress=False)
    expected = ranking_from_links(served, gold_rows_for(to_rank.mentions, dataset.kb), dataset.kb.qids).metrics()
    assert report.metrics == pytest.approx(expected)
    assert report.mention_count == len(to_rank.mentions)


@pytest.mark.parametrize("prior", [None, ContextPrior({"name_match": 32.0, "year_in_adult_life": 5.0,
                                                       "pronoun_conflicts": -1.0, "shared_words": 2.0})],
                         ids=["its-name-prior", "a-context-prior"])
def test_shipped_checkpoint_on_the_example_split(linker_backbone, tmp_path, prior):
    dataset = load_dataset(EXAMPLE)
    features = build_features(dataset, linker_backbone, tmp_path / "store", dtype="float32", progress=False,
                              num_threads=1)
    _assert_evaluate_is_the_linker(dataset, features, "test", prior=prior)


def test_shipped_checkpoint_on_a_sample_of_a_synthetic_kb(linker_backbone, tmp_path):
    dataset = generate_dataset(600, mentions_per_split={"test": 120}, seed=3, out_dir=tmp_path / "synth",
                               image_size=32)
    features = build_features(dataset, linker_backbone, tmp_path / "store", dtype="float32", progress=False,
                              num_threads=1)
    _assert_evaluate_is_the_linker(dataset, features, "test", sample=25)


def test_an_existing_index_must_hold_exactly_the_datasets_kb(tiny_index, linker_backbone, tmp_path):
    from mmel.core.errors import MismatchError
    from mmel.core.types import Dataset, KnowledgeBase
    from mmel.features.store import build_features

    smaller = Dataset(name="tiny", kb=KnowledgeBase(list(tiny_index.dataset.kb)[:-1]), root=tiny_index.root,
                      splits={"train": [m for m in tiny_index.dataset.split("train")
                                        if m.gold_qid != list(tiny_index.dataset.kb)[-1].qid]})
    features = build_features(smaller, linker_backbone, tmp_path / "store", progress=False, num_threads=1)
    with pytest.raises(MismatchError, match="not exactly the dataset's"):
        evaluate(smaller, "train", str(tiny_index.checkpoint), features=features, first_stage="hybrid",
                 index_dir=tiny_index.index_dir, progress=False)
    same = build_features(tiny_index.dataset, linker_backbone, tmp_path / "store", progress=False, num_threads=1)
    given = evaluate(tiny_index.dataset, "train", str(tiny_index.checkpoint), features=same, first_stage="hybrid",
                     num_candidates=8, index_dir=tiny_index.index_dir, progress=False)
    built = evaluate(tiny_index.dataset, "train", str(tiny_index.checkpoint), features=same, first_stage="hybrid",
                     num_candidates=8, progress=False)
    assert given.metrics == built.metrics
