"""`mmel evaluate`: rank one split of a dataset with a baseline or a trained model, full-KB protocol.

Methods:
- `bm25` / `bm25-text`: lexical baseline over entity names / names plus text (no features needed);
- `dense`: zero-shot dual encoder, cosine of the backbone's global text vectors (feature store);
- `name-match`: how much of the surface form the entity name contains (`name_match.py`), ties
  broken by the dense cosine when features are given;
- a checkpoint directory: a trained model (e.g. MIMIC), exhaustive over the whole KB, or
  two-stage when `first_stage` is given (the first stage's top K reranked by the model); with
  `name_prior_weight` w > 0 the model's score becomes score + w * name_match (an mmel option).

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
from mmel.evaluation.metrics import ranking_metrics, ranks_from_counts
from mmel.evaluation.protocols import (
    FULL_KB,
    RankingResult,
    ScoreBlock,
    as_numpy_scores,
    gold_rows_for,
    rank_full_kb,
)
from mmel.evaluation.report import EvalReport, build_report
from mmel.features.name_match import NameMatchIndex
from mmel.features.store import DatasetFeatures
from mmel.models import load_model
from mmel.retrieval.bm25 import BM25Index, query_text
from mmel.retrieval.dense import DenseScorer
from mmel.retrieval.index_build import ModelSpec
from mmel.retrieval.linker import RRF_CONSTANT
from mmel.retrieval.ranking import ModelScorer, Reranker, rank_two_stage, rerank_first_stage

BASELINES = ("bm25", "bm25-text", "dense", "name-match")
# The dense cosine (in [-1, 1]) only breaks name-match ties: scaled so that it never outweighs the
# smallest step of the match (1 / number of surface tokens).
DENSE_TIE_BREAK = 1e-3
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
             sample: int = 0, seed: int = 0, name_prior_weight: float = 0.0, progress: bool = True) -> EvalReport:
    """Rank `split` (or a seeded `sample` of it) against the whole KB with `method` (a baseline or a checkpoint).

    `name_prior_weight` > 0 adds that multiple of the surface-name match to a trained model's scores.
    """
    if name_prior_weight < 0 or (name_prior_weight and method in BASELINES):
        raise ValueError("name_prior_weight must be >= 0 and applies to trained models only, "
                         f"got {name_prior_weight} for {method!r}")
    if features is not None:
        features.check_dataset(dataset)
    to_rank = SplitToRank.of(dataset, split, features, sample, seed)
    started = time.perf_counter()
    if method in BASELINES:
        result, model_name, backbone, extra = _rank_baseline(method, dataset, to_rank, features, progress)
    else:
        result, model_name, backbone, extra = _rank_model(Path(method), dataset, to_rank, features, first_stage,
                                                          num_candidates, mention_batch_size, name_prior_weight,
                                                          progress)
    return build_report(result, protocol=FULL_KB, kb_size=len(dataset.kb), dataset=dataset.name, split=to_rank.name,
                        model=model_name, backbone=backbone, wall_time_s=time.perf_counter() - started, extra=extra)


def _rank_baseline(method: str, dataset: Dataset, to_rank: SplitToRank, features: DatasetFeatures | None,
                   progress: bool) -> tuple[RankingResult, str, str, dict]:
    if method == "dense":
        stage = build_first_stage("dense", dataset, to_rank, features)
        result = rank_full_kb(stage.score_block, to_rank.gold_rows, len(dataset.kb),
                              entity_chunk_size=stage.entity_chunk_size, mention_batch_size=256, progress=progress)
        return result, "dense-zero-shot", features.backbone_fingerprint, {"template": features.template.name}
    if method == "name-match":
        return _rank_name_match(dataset, to_rank, features, progress)
    fields = "name" if method == "bm25" else "name+text"
    block = _bm25_block(dataset, to_rank, fields)
    result = rank_full_kb(block, to_rank.gold_rows, len(dataset.kb), entity_chunk_size=len(dataset.kb),
                          mention_batch_size=256, progress=progress)
    return result, f"bm25-{fields}", "none", {"query": "surface+sentence"}


def _rank_name_match(dataset: Dataset, to_rank: SplitToRank, features: DatasetFeatures | None,
                     progress: bool) -> tuple[RankingResult, str, str, dict]:
    names = NameMatchIndex.from_kb(dataset.kb).score_block([mention.surface for mention in to_rank.mentions])
    if features is None:
        block, name, backbone = names, "name-match", "none"
    else:
        dense = _dense_block(features, to_rank)

        def block(rows: np.ndarray, start: int, stop: int) -> np.ndarray:
            return names(rows, start, stop) + DENSE_TIE_BREAK * np.asarray(dense(rows, start, stop))

        name, backbone = "name-match+dense-ties", features.backbone_fingerprint
    result = rank_full_kb(block, to_rank.gold_rows, len(dataset.kb), entity_chunk_size=len(dataset.kb),
                          mention_batch_size=256, progress=progress)
    return result, name, backbone, {"query": "surface"}


def _rank_model(checkpoint: Path, dataset: Dataset, to_rank: SplitToRank, features: DatasetFeatures | None,
                first_stage: str | None, num_candidates: int, mention_batch_size: int, name_prior_weight: float,
                progress: bool) -> tuple[RankingResult, str, str, dict]:
    if features is None or to_rank.features is None:
        raise ValueError("a trained model reads features: pass --features (built by `mmel features build`)")
    _check_features_fit(checkpoint, features)
    model = load_model(checkpoint)
    scorer = ModelScorer(model, features.entities, to_rank.features, progress=progress)
    model_name = f"{model.config_class.model_type}:{checkpoint.name}"
    score_block, rerank, extra = scorer.score_block, scorer.rerank, {}
    if name_prior_weight > 0:
        score_block, rerank = _with_name_prior(scorer, NameMatchIndex.from_kb(dataset.kb), to_rank, name_prior_weight)
        model_name, extra = f"{model_name}+name-prior", {"name_prior_weight": name_prior_weight}
    gold = to_rank.gold_rows
    if first_stage is None:
        result = rank_full_kb(score_block, gold, len(dataset.kb), mention_batch_size=mention_batch_size,
                              entity_chunk_size=4096, progress=progress)
        return result, model_name, features.backbone_fingerprint, {"ranking": "exhaustive", **extra}
    stage = build_first_stage(first_stage, dataset, to_rank, features)
    result = rank_two_stage(stage.score_block, rerank, gold, len(dataset.kb), num_candidates=num_candidates,
                            mention_batch_size=mention_batch_size, entity_chunk_size=stage.entity_chunk_size,
                            progress=progress)
    extra = {"ranking": f"two-stage: {stage.name} top {num_candidates}, reranked by the model", **extra}
    return result, f"{model_name}+{stage.name}@{num_candidates}", features.backbone_fingerprint, extra


def _with_name_prior(scorer: ModelScorer, names: NameMatchIndex, to_rank: SplitToRank,
                     weight: float) -> tuple[ScoreBlock, Reranker]:
    """The model's full-KB block and reranker with `weight * name_match` added to every score."""
    surfaces = [mention.surface for mention in to_rank.mentions]
    name_block = names.score_block(surfaces)

    def score_block(rows: np.ndarray, start: int, stop: int) -> np.ndarray:
        return as_numpy_scores(scorer.score_block(rows, start, stop)) + weight * name_block(rows, start, stop)

    def rerank(rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return as_numpy_scores(scorer.rerank(rows, candidates)) + weight * names.candidate_scores(
            [surfaces[row] for row in rows], candidates)

    return score_block, rerank



@dataclass
class NamePriorTuning:
    """H@1 and MRR of `model + w * name_match` on a dev split for each weight w, two-stage, and the best w."""

    checkpoint: str
    split: str
    mentions: int
    first_stage: str
    candidates: int
    metrics: dict[float, dict[str, float]]   # weight -> ranking metrics
    best_weight: float                       # highest H@1, then MRR; ties go to the smaller weight

    def to_markdown(self) -> str:
        lines = [f"Name prior for {self.checkpoint} on {self.split} ({self.mentions} mentions, {self.first_stage} "
                 f"top {self.candidates} reranked, full KB, ties against the gold)", "",
                 "| weight | H@1 | H@3 | H@10 | MRR |", "|---:|---:|---:|---:|---:|"]
        for weight, values in self.metrics.items():
            mark = " (best)" if weight == self.best_weight else ""
            lines.append(f"| {weight:g}{mark} | {100 * values['hits@1']:.2f} | {100 * values['hits@3']:.2f} | "
                         f"{100 * values['hits@10']:.2f} | {100 * values['mrr']:.2f} |")
        return "\n".join(lines) + "\n"


def tune_name_prior(dataset: Dataset, split: str, checkpoint: Path, features: DatasetFeatures,
                    weights: Sequence[float], *, first_stage: str = "hybrid", num_candidates: int = 100,
                    progress: bool = True) -> NamePriorTuning:
    """Rank `split` once with the first stage and the model, then score every weight of the name prior.

    The model's scores of each mention's K candidates are computed once; each weight only adds
    `w * name_match` and reorders, so trying many weights costs one evaluation.
    """
    if not weights or min(weights) < 0:
        raise ValueError(f"give one or more weights >= 0, got {list(weights)}")
    features.check_dataset(dataset)
    _check_features_fit(checkpoint, features)
    to_rank = SplitToRank.of(dataset, split, features)
    scorer = ModelScorer(load_model(checkpoint), features.entities, to_rank.features, progress=progress)
    stage = build_first_stage(first_stage, dataset, to_rank, features)
    first = rank_full_kb(stage.score_block, to_rank.gold_rows, len(dataset.kb), top_k=num_candidates,
                         entity_chunk_size=stage.entity_chunk_size, progress=progress)
    by_model = rerank_first_stage(first, scorer.rerank, progress=progress)    # topk_scores: the model's [M, K]
    names = NameMatchIndex.from_kb(dataset.kb).candidate_scores([m.surface for m in to_rank.mentions],
                                                                by_model.topk_rows)                  # [M, K]
    metrics = {}
    for weight in sorted(set(map(float, weights))):
        fused = by_model.topk_scores + weight * names                                                # [M, K]
        result = rerank_first_stage(by_model, lambda rows, _, fused=fused: fused[rows], progress=False)
        metrics[weight] = ranking_metrics(ranks_from_counts(result.num_greater, result.num_tied))
    best = max(metrics, key=lambda w: (metrics[w]["hits@1"], metrics[w]["mrr"], -w))
    return NamePriorTuning(checkpoint=str(checkpoint), split=to_rank.name, mentions=len(to_rank.gold_rows),
                           first_stage=first_stage, candidates=num_candidates, metrics=metrics, best_weight=best)


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


__all__ = ["BASELINES", "FIRST_STAGES", "FirstStage", "NamePriorTuning", "RowSubset", "SplitToRank",
           "build_first_stage", "evaluate", "tune_name_prior"]
