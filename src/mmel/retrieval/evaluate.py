"""`mmel evaluate`: rank one split of a dataset with a baseline or a trained model, full-KB protocol.

Methods:
- `bm25` / `bm25-text`: lexical baseline over entity names / names plus text (no features needed);
- `dense`: zero-shot dual encoder, cosine of the backbone's global text vectors (feature store);
- a checkpoint directory: a trained model (e.g. MIMIC), exhaustive over the whole KB, or
  two-stage when `first_stage` is given (the first stage's top K reranked by the model).

Every report carries protocol, KB size, split, mention count, model and backbone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmel.core.errors import MismatchError
from mmel.core.features import FeatureTable
from mmel.core.types import Dataset, Mention
from mmel.evaluation.protocols import FULL_KB, RankingResult, ScoreBlock, gold_rows_for, rank_full_kb
from mmel.evaluation.report import EvalReport, build_report
from mmel.features.store import DatasetFeatures
from mmel.models import load_model
from mmel.retrieval.bm25 import BM25Index, query_text
from mmel.retrieval.dense import DenseScorer
from mmel.retrieval.index_build import ModelSpec
from mmel.retrieval.linker import RRF_CONSTANT
from mmel.retrieval.ranking import ModelScorer, rank_two_stage

BASELINES = ("bm25", "bm25-text", "dense")
FIRST_STAGES = ("dense", "bm25", "hybrid")


@dataclass
class FirstStage:
    """A cheap full-KB scorer and the entity chunk size it wants (BM25 scores the whole KB per call)."""

    name: str
    score_block: ScoreBlock
    entity_chunk_size: int


@dataclass
class SplitToRank:
    """The mentions to rank (a whole split, or a seeded sample of it) with their features and gold rows."""

    name: str
    mentions: list[Mention]
    gold_rows: np.ndarray                 # [M]
    features: FeatureTable | None         # the mentions' features, row i = mentions[i]

    @classmethod
    def of(cls, dataset: Dataset, split: str, features: DatasetFeatures | None, sample: int = 0,
           seed: int = 0) -> SplitToRank:
        """`split` of `dataset`; with `sample` > 0, that many evaluable mentions drawn with `seed`, in file order."""
        mentions = dataset.split(split)
        gold = gold_rows_for(mentions, dataset.kb)
        table = features.mentions[split] if features is not None else None
        if sample <= 0 or sample >= len(mentions):
            return cls(split, mentions, gold, table)
        rows = np.sort(np.random.default_rng(seed).choice(np.flatnonzero(gold >= 0), size=min(sample, int(
            (gold >= 0).sum())), replace=False))
        return cls(f"{split} (sample of {len(rows)}, seed {seed})", [mentions[i] for i in rows], gold[rows],
                   RowSubset(table, rows) if table is not None else None)


class RowSubset:
    """A FeatureTable over chosen rows of another one (row i = the parent's rows[i])."""

    def __init__(self, table: FeatureTable, rows: np.ndarray):
        self.table = table
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def gather(self, rows: Sequence[int] | np.ndarray):
        return self.table.gather(self.rows[np.asarray(rows, dtype=np.int64)])

    def text_global_matrix(self) -> np.ndarray:
        return np.asarray(self.table.text_global_matrix()[self.rows])


def build_first_stage(kind: str, dataset: Dataset, to_rank: SplitToRank,
                      features: DatasetFeatures | None) -> FirstStage:
    """The named first stage over `dataset`'s KB for the mentions of `to_rank`."""
    if kind not in FIRST_STAGES:
        raise ValueError(f"unknown first stage {kind!r}; available: {', '.join(FIRST_STAGES)}")
    if kind == "bm25":
        return FirstStage("bm25", _bm25_block(dataset, to_rank), len(dataset.kb))
    dense = _dense_block(features, to_rank)
    if kind == "dense":
        return FirstStage("dense", dense, 65_536)
    bm25 = _bm25_block(dataset, to_rank)

    def hybrid(rows: np.ndarray, start: int, stop: int) -> np.ndarray:
        """The linker's reciprocal-rank fusion, over the whole KB (one chunk: ranks need every entity)."""
        lexical = bm25(rows, start, stop)                                           # [b, N]
        fused = 1.0 / (RRF_CONSTANT + 1 + _ranks_desc(dense(rows, start, stop)))
        return fused + np.where(lexical > 0, 1.0 / (RRF_CONSTANT + 1 + _ranks_desc(lexical)), 0.0)

    return FirstStage("hybrid", hybrid, len(dataset.kb))


def _ranks_desc(scores: np.ndarray) -> np.ndarray:
    """0-based rank of every column per row, best first, ties broken by the lower column. [b, n] -> [b, n]"""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(scores.shape[1])[None, :].repeat(len(scores), axis=0), axis=1)
    return ranks


def _bm25_block(dataset: Dataset, to_rank: SplitToRank, fields: str = "name") -> ScoreBlock:
    index = BM25Index.build(dataset.kb, fields)  # type: ignore[arg-type]
    return index.score_block([query_text(mention) for mention in to_rank.mentions])


def _dense_block(features: DatasetFeatures | None, to_rank: SplitToRank) -> ScoreBlock:
    if features is None or to_rank.features is None:
        raise ValueError("dense retrieval needs the feature store: pass --features (built by `mmel features build`)")
    return DenseScorer(features.entities).rows_scorer(to_rank.features)


def evaluate(dataset: Dataset, split: str, method: str, *, features: DatasetFeatures | None = None,
             first_stage: str | None = None, num_candidates: int = 100, mention_batch_size: int = 64,
             sample: int = 0, seed: int = 0, progress: bool = True) -> EvalReport:
    """Rank `split` (or a seeded `sample` of it) against the whole KB with `method` (a baseline or a checkpoint)."""
    if features is not None:
        features.check_dataset(dataset)
    to_rank = SplitToRank.of(dataset, split, features, sample, seed)
    started = time.perf_counter()
    if method in BASELINES:
        result, model_name, backbone, extra = _rank_baseline(method, dataset, to_rank, features, progress)
    else:
        result, model_name, backbone, extra = _rank_model(Path(method), dataset, to_rank, features, first_stage,
                                                          num_candidates, mention_batch_size, progress)
    return build_report(result, protocol=FULL_KB, kb_size=len(dataset.kb), dataset=dataset.name, split=to_rank.name,
                        model=model_name, backbone=backbone, wall_time_s=time.perf_counter() - started, extra=extra)


def _rank_baseline(method: str, dataset: Dataset, to_rank: SplitToRank, features: DatasetFeatures | None,
                   progress: bool) -> tuple[RankingResult, str, str, dict]:
    if method == "dense":
        stage = build_first_stage("dense", dataset, to_rank, features)
        result = rank_full_kb(stage.score_block, to_rank.gold_rows, len(dataset.kb),
                              entity_chunk_size=stage.entity_chunk_size, mention_batch_size=256, progress=progress)
        return result, "dense-zero-shot", features.backbone_fingerprint, {"template": features.template.name}
    fields = "name" if method == "bm25" else "name+text"
    block = _bm25_block(dataset, to_rank, fields)
    result = rank_full_kb(block, to_rank.gold_rows, len(dataset.kb), entity_chunk_size=len(dataset.kb),
                          mention_batch_size=256, progress=progress)
    return result, f"bm25-{fields}", "none", {"query": "surface+sentence"}


def _rank_model(checkpoint: Path, dataset: Dataset, to_rank: SplitToRank, features: DatasetFeatures | None,
                first_stage: str | None, num_candidates: int, mention_batch_size: int,
                progress: bool) -> tuple[RankingResult, str, str, dict]:
    if features is None or to_rank.features is None:
        raise ValueError("a trained model reads features: pass --features (built by `mmel features build`)")
    _check_features_fit(checkpoint, features)
    model = load_model(checkpoint)
    scorer = ModelScorer(model, features.entities, to_rank.features, progress=progress)
    model_name = f"{model.config_class.model_type}:{checkpoint.name}"
    gold = to_rank.gold_rows
    if first_stage is None:
        result = rank_full_kb(scorer.score_block, gold, len(dataset.kb), mention_batch_size=mention_batch_size,
                              entity_chunk_size=4096, progress=progress)
        return result, model_name, features.backbone_fingerprint, {"ranking": "exhaustive"}
    stage = build_first_stage(first_stage, dataset, to_rank, features)
    result = rank_two_stage(stage.score_block, scorer.rerank, gold, len(dataset.kb), num_candidates=num_candidates,
                            mention_batch_size=mention_batch_size, entity_chunk_size=stage.entity_chunk_size,
                            progress=progress)
    extra = {"ranking": f"two-stage: {stage.name} top {num_candidates}, reranked by the model"}
    return result, f"{model_name}+{stage.name}@{num_candidates}", features.backbone_fingerprint, extra


def _check_features_fit(checkpoint: Path, features: DatasetFeatures) -> None:
    """Refuse features made with another backbone, text template or max length than the model was trained on."""
    spec = ModelSpec.read(checkpoint)
    expected = {"backbone": spec.backbone_fingerprint or features.backbone_fingerprint,
                "template": spec.template, "max text length": spec.max_text_length}
    found = {"backbone": features.backbone_fingerprint, "template": features.template,
             "max text length": features.max_text_length}
    problems = [f"{name} {found[name]} (model: {expected[name]})" for name in expected if found[name] != expected[name]]
    if problems:
        raise MismatchError(f"{features.view_dir} does not fit {checkpoint}: {'; '.join(problems)}; "
                            "rebuild the features with the model's backbone and preprocessing")


__all__ = ["BASELINES", "FIRST_STAGES", "FirstStage", "RowSubset", "SplitToRank", "build_first_stage", "evaluate"]
