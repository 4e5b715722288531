"""`mmel evaluate`: rank one split of a dataset with a baseline or a trained model, full-KB protocol.

Methods:
- `bm25` / `bm25-text`: lexical baseline over entity names / names plus text (no features needed);
- `dense`: zero-shot dual encoder, cosine of the backbone's global text vectors (feature store);
- `name-match`: how much of the surface form the entity name contains (`name_match.py`), ties
  broken by the dense cosine when features are given;
- a checkpoint directory: a trained model (e.g. MIMIC), exhaustive over the whole KB, or
  two-stage when `first_stage` is given; with `name_prior_weight` w > 0 the model's score
  becomes score + w * name_match, with `prior_weights` score + sum_f w_f * f(mention, entity) over
  the context features of `mmel.lexical.context_features` (mmel options; the latter two-stage only).

Two-stage evaluation *is* the served linker: an index of the dataset's KB is built for the
checkpoint (in a temporary directory, or an existing one is opened with `index_dir`) and every
mention is ranked by `Linker.rank_features`, the linker's own path after query encoding, with the
mention features read from the feature store. A gold entity the first stage does not retrieve has
no score: it counts as tied with every other unretrieved entity (rank N under the `against-gold`
tie policy, K + 1 + (N - K - 1) / 2 under `expected`).

Every report carries protocol, KB size, split, mention count, model and backbone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmel.core.errors import MismatchError, UsageError
from mmel.core.features import FeatureTable
from mmel.core.types import Dataset, LinkResult, Mention
from mmel.evaluation.candidate_protocol import rank_dim_candidates
from mmel.evaluation.protocols import FULL_KB, RankingResult, ScoreBlock, as_numpy_scores, gold_rows_for, rank_full_kb
from mmel.evaluation.report import EvalReport, build_report
from mmel.experiments import BASELINES, DIM_CANDIDATES, PROTOCOLS
from mmel.experiments.errors import error_types
from mmel.experiments.ranking import ModelScorer
from mmel.features.views import DatasetFeatures, list_views, open_features
from mmel.lexical.bm25 import BM25Index, query_text
from mmel.lexical.context_features import NO_PRIOR, ContextPrior, candidate_features
from mmel.lexical.fuzzy import FuzzyNameIndex
from mmel.lexical.name_match import NameMatchIndex
from mmel.models import load_model
from mmel.retrieval import FIRST_STAGES
from mmel.retrieval.dense import DenseScorer
from mmel.retrieval.index_build import IndexBuildConfig, ModelSpec, build_index
from mmel.retrieval.kb_store import kb_checksum
from mmel.retrieval.linker import Linker
from mmel.retrieval.reranking import order_by_score

# The dense cosine (in [-1, 1]) only breaks name-match ties: scaled so that it never outweighs the
# smallest step of the match (1 / number of surface tokens).
DENSE_TIE_BREAK = 1e-3


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


def _bm25_block(dataset: Dataset, to_rank: SplitToRank, fields: str = "name") -> ScoreBlock:
    index = BM25Index.build(dataset.kb, fields)  # type: ignore[arg-type]
    return index.score_block([query_text(mention) for mention in to_rank.mentions])


def _dense_block(features: DatasetFeatures | None, to_rank: SplitToRank) -> ScoreBlock:
    if features is None or to_rank.features is None:
        raise UsageError("dense retrieval needs the feature store: pass --features (built by `mmel features build`)")
    return DenseScorer(features.entities).rows_scorer(to_rank.features)


def evaluate(dataset: Dataset, split: str, method: str, *, features: DatasetFeatures | None = None,
             first_stage: str | None = None, num_candidates: int = 100, mention_batch_size: int = 64,
             sample: int = 0, seed: int = 0, name_prior_weight: float = 0.0,
             prior_weights: Mapping[str, float] | None = None, index_dir: Path | None = None,
             protocol: str = FULL_KB, progress: bool = True) -> EvalReport:
    """Rank `split` (or a seeded `sample` of it) against the whole KB with `method` (a baseline or a checkpoint).

    `name_prior_weight` > 0 adds that multiple of the surface-name match to a trained model's scores;
    `prior_weights` (feature -> weight, e.g. a checkpoint's fitted prior) adds the context features.
    With `first_stage`, the ranking is the served linker's (see the module doc); `index_dir` names an
    existing index of this dataset's KB for the checkpoint instead of building a temporary one.
    `protocol` 'dim-candidates' ranks each gold among itself and its mention's `num_candidates`
    fuzzy name candidates with DIM's rule instead (models.md §4.7; not comparable with full-KB numbers).
    """
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol {protocol!r}; available: {', '.join(PROTOCOLS)}")
    if protocol == DIM_CANDIDATES:
        return _evaluate_dim_protocol(dataset, split, method, features, num_candidates, sample, seed, progress)
    prior = _prior_to_evaluate(method, name_prior_weight, prior_weights, first_stage)
    if first_stage is not None and first_stage not in FIRST_STAGES:
        raise UsageError(f"unknown first stage {first_stage!r}; available: {', '.join(FIRST_STAGES)}")
    if features is not None:
        features.check_dataset(dataset)
    to_rank = SplitToRank.of(dataset, split, features, sample, seed)
    started = time.perf_counter()
    if method in BASELINES:
        result, model_name, backbone, extra = _rank_baseline(method, dataset, to_rank, features, progress)
    elif first_stage is None:
        result, model_name, backbone, extra = _rank_exhaustive(Path(method), dataset, to_rank, features,
                                                               mention_batch_size, prior.name_weight, progress)
    else:
        result, model_name, backbone, extra = _rank_served(Path(method), dataset, to_rank, features, first_stage,
                                                           num_candidates, prior, index_dir, progress)
    errors = error_types(result, to_rank.mentions, dataset.kb)
    if errors is not None:
        extra = {**extra, "errors": errors}
    return build_report(result, protocol=FULL_KB, kb_size=len(dataset.kb), dataset=dataset.name, split=to_rank.name,
                        model=model_name, backbone=backbone, wall_time_s=time.perf_counter() - started, extra=extra)


def _prior_to_evaluate(method: str, name_prior_weight: float, prior_weights: Mapping[str, float] | None,
                       first_stage: str | None) -> ContextPrior:
    """The prior added to a trained model's scores: the name prior of `name_prior_weight`, or `prior_weights`."""
    if name_prior_weight < 0 or (name_prior_weight and prior_weights is not None):
        raise UsageError(f"give a name prior weight >= 0 or prior weights, not both (got {name_prior_weight}, "
                         f"{prior_weights})")
    try:
        prior = ContextPrior(dict(prior_weights)) if prior_weights is not None else ContextPrior.name_only(
            name_prior_weight)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if prior and method in BASELINES:
        raise UsageError(f"a prior applies to trained models only, got one for {method!r}")
    if prior.beyond_name and first_stage is None:
        raise UsageError("a context prior reranks a first stage's shortlist: give a first stage")
    return prior


def _evaluate_dim_protocol(dataset: Dataset, split: str, method: str, features: DatasetFeatures | None,
                           num_candidates: int, sample: int, seed: int, progress: bool) -> EvalReport:
    """DIM's candidate-limited protocol for a checkpoint (module doc of `mmel.evaluation.candidate_protocol`)."""
    if method in BASELINES:
        raise UsageError("the DIM candidate protocol scores trained models; baselines are ranked over the full KB")
    checkpoint = Path(method)
    to_rank = SplitToRank.of(dataset, split, features, sample, seed)
    _require_features(features, to_rank)
    _check_features_fit(checkpoint, features)
    started = time.perf_counter()
    candidates = FuzzyNameIndex([entity.name for entity in dataset.kb]).top_k(
        [mention.surface for mention in to_rank.mentions], k=num_candidates)                     # [M, K]
    model = load_model(checkpoint)
    scorer = ModelScorer(model, features.entities, to_rank.features, progress=progress)

    def score_pairs(mention_rows: np.ndarray, entity_rows: np.ndarray) -> torch.Tensor:
        """Scores [P] of (mention, entity) pairs; each distinct mention is encoded once."""
        distinct, position = np.unique(mention_rows, return_inverse=True)
        with torch.inference_mode():
            mentions = model.encode_mentions(to_rank.features.gather(distinct)).select(torch.as_tensor(position))
            return model.match_candidates(mentions, scorer.entity_cache,
                                          torch.as_tensor(entity_rows)[:, None]).scores[:, 0]   # [P]

    result = rank_dim_candidates(score_pairs, list(candidates), to_rank.gold_rows, num_candidates=num_candidates,
                                 num_entities=len(dataset.kb), progress=progress)
    extra = {"protocol_label": result.label, "dim_top_k": result.metrics(),
             "dim_denominator": len(to_rank.gold_rows), "gold_added_to_candidates": result.ranking.gold_added}
    return build_report(result.ranking, protocol=f"{DIM_CANDIDATES}-{num_candidates}", kb_size=len(dataset.kb),
                        dataset=dataset.name, split=to_rank.name, model=_model_label(model.config_class.model_type,
                                                                                   checkpoint),
                        backbone=features.backbone_fingerprint, wall_time_s=time.perf_counter() - started,
                        tie_policy="gold-wins", extra=extra)


def _rank_baseline(method: str, dataset: Dataset, to_rank: SplitToRank, features: DatasetFeatures | None,
                   progress: bool) -> tuple[RankingResult, str, str, dict]:
    if method == "dense":
        result = rank_full_kb(_dense_block(features, to_rank), to_rank.gold_rows, len(dataset.kb),
                              entity_chunk_size=65_536, mention_batch_size=256, progress=progress)
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


def _rank_exhaustive(checkpoint: Path, dataset: Dataset, to_rank: SplitToRank, features: DatasetFeatures | None,
                     mention_batch_size: int, name_prior_weight: float,
                     progress: bool) -> tuple[RankingResult, str, str, dict]:
    """The papers' protocol: the model scores every (mention, entity) pair of the KB."""
    _require_features(features, to_rank)
    _check_features_fit(checkpoint, features)
    model = load_model(checkpoint)
    scorer = ModelScorer(model, features.entities, to_rank.features, progress=progress)
    model_name, score_block, extra = _model_label(model.config_class.model_type, checkpoint), scorer.score_block, {}
    if name_prior_weight > 0:
        name_block = NameMatchIndex.from_kb(dataset.kb).score_block([m.surface for m in to_rank.mentions])

        def score_block(rows: np.ndarray, start: int, stop: int) -> np.ndarray:
            return as_numpy_scores(scorer.score_block(rows, start, stop)) + name_prior_weight * name_block(
                rows, start, stop)

        model_name, extra = f"{model_name}+name-prior-{name_prior_weight:g}", {"name_prior_weight": name_prior_weight}
    result = rank_full_kb(score_block, to_rank.gold_rows, len(dataset.kb), mention_batch_size=mention_batch_size,
                          entity_chunk_size=4096, progress=progress)
    return result, model_name, features.backbone_fingerprint, {"ranking": "exhaustive", **extra}


def _rank_served(checkpoint: Path, dataset: Dataset, to_rank: SplitToRank, features: DatasetFeatures | None,
                 first_stage: str, num_candidates: int, prior: ContextPrior, index_dir: Path | None,
                 progress: bool) -> tuple[RankingResult, str, str, dict]:
    """Two-stage ranking through the served linker (module doc)."""
    _require_features(features, to_rank)
    _check_features_fit(checkpoint, features)
    with served_linker(dataset, checkpoint, features, first_stage, prior, index_dir, progress) as linker:
        linked = linker.rank_features(to_rank.mentions, to_rank.features, top_k=num_candidates,
                                      candidates_k=num_candidates, progress=progress)
        model_type = linker.manifest["model"]["model_type"]
        vectors, reranker = linker.manifest.get("vectors", "backbone"), linker.manifest["reranker"]
    result = ranking_from_links(linked, to_rank.gold_rows, dataset.kb.qids)
    model_name = _model_label(model_type, checkpoint)
    stage = f"{first_stage} top {num_candidates} over the {vectors}'s vectors"
    scored = "reranked by the model" if reranker == "model" else "not reranked (the first stage's scores)"
    extra: dict = {"ranking": f"two-stage through the served linker: {stage}, {scored}; unretrieved golds tie "
                              "with every unretrieved entity", "vectors": vectors, "reranker": reranker}
    if prior.beyond_name:
        model_name, extra = f"{model_name}+context-prior-{prior.fingerprint()}", {**extra, "prior": prior.to_dict()}
    elif prior:
        model_name = f"{model_name}+name-prior-{prior.name_weight:g}"
        extra = {**extra, "name_prior_weight": prior.name_weight}
    return result, f"{model_name}+{first_stage}@{num_candidates}", features.backbone_fingerprint, extra


@contextlib.contextmanager
def served_linker(dataset: Dataset, checkpoint: Path, features: DatasetFeatures, first_stage: str,
                  prior: ContextPrior, index_dir: Path | None = None,
                  progress: bool = True) -> Iterator[Linker]:
    """A Linker over `dataset`'s KB for `checkpoint`: the index at `index_dir`, or one built in a temporary directory.

    An existing index must hold exactly this KB, this model, this first stage and this prior.
    """
    if index_dir is not None:
        with Linker.load(index_dir, expect_model=checkpoint) as linker:
            _check_index_fits(linker, dataset, first_stage, prior)
            yield linker
        return
    config = IndexBuildConfig(first_stage=first_stage, prior_weights=prior.to_dict())
    with tempfile.TemporaryDirectory(prefix="mmel-eval-index-") as scratch:
        build_index(dataset, checkpoint, Path(scratch) / "index", config=config, entity_features=features.entities,
                    progress=progress)
        with Linker.load(Path(scratch) / "index", expect_model=checkpoint) as linker:
            yield linker


def _check_index_fits(linker: Linker, dataset: Dataset, first_stage: str, prior: ContextPrior) -> None:
    problems = []
    if linker.manifest["first_stage"] != first_stage:
        problems.append(f"first stage {linker.manifest['first_stage']} (asked: {first_stage})")
    if linker.prior.to_dict() != prior.to_dict():
        problems.append(f"prior {linker.prior.to_dict()} (asked: {prior.to_dict()})")
    kb = linker.manifest["kb"]
    if kb["checksum_at_build"] != kb_checksum(dataset.kb) or linker.manifest.get("revision", 0):
        problems.append(f"its KB ({len(linker)} entities, revision {linker.manifest.get('revision', 0)}) is not "
                        f"exactly the dataset's ({len(dataset.kb)} entities)")
    if problems:
        raise MismatchError(f"{linker.directory} does not fit this evaluation: {'; '.join(problems)}")


def ranking_from_links(linked: Sequence[LinkResult], gold_rows: np.ndarray, kb_qids: Sequence[str]) -> RankingResult:
    """Gold ranks and top-k rows from the linker's ranked candidates (KB rows via `kb_qids`).

    A gold among the candidates is counted against the candidates' scores; one outside them ties
    with the N - K entities the first stage did not retrieve.
    """
    row_of = {qid: row for row, qid in enumerate(kb_qids)}
    width = max((len(result.candidates) for result in linked), default=0)
    count = len(linked)
    result = RankingResult(gold_rows=np.asarray(gold_rows, dtype=np.int64).copy(),
                           gold_scores=np.full(count, np.nan), num_greater=np.full(count, -1, dtype=np.int64),
                           num_tied=np.full(count, -1, dtype=np.int64),
                           topk_rows=np.full((count, width), -1, dtype=np.int64),
                           topk_scores=np.full((count, width), -np.inf))
    for index, (linked_one, gold) in enumerate(zip(linked, result.gold_rows, strict=True)):
        scores = np.array([candidate.score for candidate in linked_one.candidates], dtype=np.float64)
        rows = np.array([row_of[candidate.qid] for candidate in linked_one.candidates], dtype=np.int64)
        result.topk_rows[index, :len(rows)] = rows
        result.topk_scores[index, :len(rows)] = scores
        if gold < 0:
            continue
        found = np.flatnonzero(rows == gold)
        if len(found):
            gold_score = scores[found[0]]
            result.gold_scores[index] = gold_score
            result.num_greater[index] = int((scores > gold_score).sum())
            result.num_tied[index] = int((scores == gold_score).sum()) - 1
        else:
            result.num_greater[index] = len(rows)
            result.num_tied[index] = len(kb_qids) - len(rows) - 1
    return result


def _model_label(model_type: str, checkpoint: Path) -> str:
    """`type:name` of a checkpoint; a run's `best/` export is named by its run directory (`mimic:run-c/best`)."""
    checkpoint = Path(checkpoint).resolve()
    name = f"{checkpoint.parent.name}/{checkpoint.name}" if checkpoint.name == "best" else checkpoint.name
    return f"{model_type}:{name}"


def _require_features(features: DatasetFeatures | None, to_rank: SplitToRank) -> None:
    if features is None or to_rank.features is None:
        raise UsageError("a trained model reads features: pass --features (built by `mmel features build`)")


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
    """Link `split` once through the served linker with the model alone, then score every weight of the prior.

    Each weight w reorders each mention's K candidates by `model score + w * name_match` with the
    linker's tie rule (`reranking.order_by_score`), so trying many weights costs one evaluation and
    the chosen weight gives, in an index, exactly the ranking it was chosen for.
    """
    if not weights or min(weights) < 0:
        raise UsageError(f"give one or more weights >= 0, got {list(weights)}")
    to_rank, linked = link_split_once(dataset, split, checkpoint, features, first_stage=first_stage,
                                      num_candidates=num_candidates, progress=progress)
    features = shortlist_features(linked, dataset)
    metrics = {}
    for weight in sorted(set(map(float, weights))):
        metrics[weight] = ranking_from_links(with_prior_added(linked, features, ContextPrior.name_only(weight)),
                                             to_rank.gold_rows, dataset.kb.qids).metrics()
    best = max(metrics, key=lambda w: (metrics[w]["hits@1"], metrics[w]["mrr"], -w))
    return NamePriorTuning(checkpoint=str(checkpoint), split=to_rank.name, mentions=len(to_rank.gold_rows),
                           first_stage=first_stage, candidates=num_candidates, metrics=metrics, best_weight=best)


def link_split_once(dataset: Dataset, split: str, checkpoint: Path, features: DatasetFeatures, *,
                    first_stage: str = "hybrid", num_candidates: int = 100,
                    progress: bool = True) -> tuple[SplitToRank, list[LinkResult]]:
    """Every mention of `split` through the served linker with the model alone (no name prior), keeping all K
    reranked candidates with their unit scores: what analyses rescoring the same shortlist start from."""
    features.check_dataset(dataset)
    _check_features_fit(checkpoint, features)
    to_rank = SplitToRank.of(dataset, split, features)
    with served_linker(dataset, checkpoint, features, first_stage, NO_PRIOR, progress=progress) as linker:
        linked = linker.rank_features(to_rank.mentions, to_rank.features, top_k=num_candidates,
                                      candidates_k=num_candidates, progress=progress)
    return to_rank, linked


def shortlist_features(linked: Sequence[LinkResult], dataset: Dataset) -> list[list[tuple[float, ...]]]:
    """[M][K][F] context features of each linked mention against each of its candidates."""
    kb = dataset.kb
    return [candidate_features(result.mention, [kb[kb.row_of(c.qid)] for c in result.candidates]) for result in linked]


def with_prior_added(linked: Sequence[LinkResult], features: Sequence[Sequence[Sequence[float]]],
                     prior: ContextPrior) -> list[LinkResult]:
    """Each linked mention (ranked by the model alone) rescored with `prior` added, as an index serving it ranks."""
    return [rescored(result, prior.apply([c.score for c in result.candidates], rows))
            for result, rows in zip(linked, features, strict=True)]


def rescored(result: LinkResult, scores: Sequence[float]) -> LinkResult:
    """`result`'s candidates with new `scores`, reordered by the linker's tie rule."""
    order = order_by_score(scores, [c.first_stage_rank for c in result.candidates])
    candidates = tuple(dataclasses.replace(result.candidates[i], score=scores[i], rank=rank)
                       for rank, i in enumerate(order, start=1))
    return dataclasses.replace(result, candidates=candidates)


def features_for(store: Path, dataset: Dataset, method: str, view_id: str | None = None) -> DatasetFeatures:
    """The feature view of `dataset` in `store` that `method` reads.

    For a checkpoint: the view with its backbone, template, max length and further views; for a
    baseline: the pretrained backbone's `mimic` view (dense and name-match read global vectors). Several
    fitting views (e.g. float16 and float32) need `view_id`.
    """
    views = list_views(store).get(dataset.name, [])
    if view_id is not None:
        return open_features(store, dataset.name, view_id=view_id)
    fitting = [view for view in views if _view_fits(open_features(store, dataset.name, view_id=view), method)]
    if len(fitting) != 1:
        raise MismatchError(f"{store}: {len(fitting)} feature views of {dataset.name!r} fit {method} "
                            f"({', '.join(fitting) or 'none'}; all: {', '.join(views) or 'none'}); "
                            "build one with `mmel features build`, or name one with --feature-view")
    return open_features(store, dataset.name, view_id=fitting[0])


def _view_fits(features: DatasetFeatures, method: str) -> bool:
    if method in BASELINES:   # the pretrained encoder's final features: no cached lower layer, no fine-tuned one
        return features.template.name == "mimic" and "+" not in features.backbone_fingerprint
    try:
        _check_features_fit(Path(method), features)
    except MismatchError:
        return False
    return True


def _check_features_fit(checkpoint: Path, features: DatasetFeatures) -> None:
    """Refuse features made with another backbone, text template or max length than the model was trained on."""
    spec = ModelSpec.read(checkpoint)
    expected = {"backbone": spec.backbone_fingerprint or features.backbone_fingerprint,
                "template": spec.template, "max text length": spec.max_text_length}
    found = {"backbone": features.backbone_fingerprint, "template": features.template,
             "max text length": features.max_text_length}
    problems = [f"{name} {found[name]} (model: {expected[name]})" for name in expected if found[name] != expected[name]]
    missing = sorted(set(spec.views.mention_extra + spec.views.entity_extra) - set(features.extra_views))
    if missing:
        problems.append(f"text views {', '.join(missing)} missing (add them with `mmel features build --view`)")
    if problems:
        raise MismatchError(f"{features.view_dir} does not fit {checkpoint}: {'; '.join(problems)}; "
                            "rebuild the features with the model's backbone and preprocessing")


__all__ = [
    "BASELINES",
    "NamePriorTuning",
    "RowSubset",
    "SplitToRank",
    "evaluate",
    "features_for",
    "ranking_from_links",
    "served_linker",
    "tune_name_prior",
]
