"""The two ranking protocols (benchmarks.md "Three evaluation protocols"), model-agnostic and chunked.

Evaluation never imports a model: it calls a scoring function.

- Full-KB (MIMIC / M3EL, models.md §0.4): every mention is ranked against every entity.
  `rank_full_kb` asks `score_block(mention_rows, entity_start, entity_stop)` for [b, n] blocks and
  never holds the [M, N] matrix: per mention batch it keeps counts (and an optional running top-k).
- Candidate-limited (DIM, models.md §4.7): the gold entity is ranked inside its candidate set, and
  the gold is always added to that set as DIM does. Unlike DIM's code (rank = 1 + #strictly
  greater), ties are counted against the gold entity here too, so a model cannot win by ties.

Mentions without a rank are never dropped silently: their gold row is `NIL_ROW` (no gold entity)
or `MISSING_GOLD_ROW` (gold QID absent from the KB), and the result counts them.

Letters: M mentions, N entities, b mentions in a batch, n entities in a chunk, k kept candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from mmel.core.errors import UsageError
from mmel.core.types import KnowledgeBase, Mention
from mmel.evaluation.metrics import DEFAULT_TIE_POLICY, HITS_AT, TiePolicy, ranking_metrics, ranks_from_counts

FULL_KB = "full-kb"
NIL_ROW = -1            # the mention is NIL (gold_qid is None)
MISSING_GOLD_ROW = -2   # the mention's gold QID is not in the knowledge base

ScoreBlock = Callable[[np.ndarray, int, int], "np.ndarray | torch.Tensor"]
"""(mention_rows [b], entity_start, entity_stop) -> scores [b, entity_stop - entity_start]."""

PairScorer = Callable[[np.ndarray, np.ndarray], "np.ndarray | torch.Tensor"]
"""(mention_rows [P], entity_rows [P]) -> scores [P] of each (mention, entity) pair."""


def candidates_protocol_name(num_candidates: int) -> str:
    """Protocol label of a candidate-limited evaluation, e.g. 'candidates-100'."""
    return f"candidates-{num_candidates}"


def gold_rows_for(mentions: Sequence[Mention], kb: KnowledgeBase) -> np.ndarray:
    """KB row of each mention's gold entity [M] (int64), or NIL_ROW / MISSING_GOLD_ROW."""
    rows = np.empty(len(mentions), dtype=np.int64)
    for index, mention in enumerate(mentions):
        if mention.gold_qid is None:
            rows[index] = NIL_ROW
        elif mention.gold_qid in kb:
            rows[index] = kb.row_of(mention.gold_qid)
        else:
            rows[index] = MISSING_GOLD_ROW
    return rows


@dataclass
class RankingResult:
    """Where each mention's gold entity ranks, plus the optional top-k entities of every mention.

    gold_rows    [M]    int64    gold KB row, or NIL_ROW / MISSING_GOLD_ROW (excluded from metrics)
    gold_scores  [M]    float64  score of the gold entity (NaN where excluded)
    num_greater  [M]    int64    entities scoring strictly above the gold (-1 where excluded)
    num_tied     [M]    int64    OTHER entities scoring exactly the gold score (-1 where excluded)
    topk_rows    [M, k] int64    best entity rows, best first (ties: lower row first); -1 pads
    topk_scores  [M, k] float64  their scores; -inf pads (candidate sets shorter than k)
    gold_added   int             candidate protocol: mentions whose candidate list lacked the gold
    """

    gold_rows: np.ndarray
    gold_scores: np.ndarray
    num_greater: np.ndarray
    num_tied: np.ndarray
    topk_rows: np.ndarray | None = None
    topk_scores: np.ndarray | None = None
    gold_added: int = 0

    @property
    def evaluated(self) -> np.ndarray:
        """[M] bool: mentions that have a gold entity in the KB and therefore a rank."""
        return self.gold_rows >= 0

    @property
    def mention_count(self) -> int:
        return int(self.evaluated.sum())

    @property
    def excluded_nil(self) -> int:
        return int((self.gold_rows == NIL_ROW).sum())

    @property
    def excluded_missing_gold(self) -> int:
        return int((self.gold_rows == MISSING_GOLD_ROW).sum())

    def ranks(self, tie_policy: TiePolicy = DEFAULT_TIE_POLICY) -> np.ndarray:
        """1-based gold ranks [E] of the evaluated mentions, in mention order."""
        keep = self.evaluated
        return ranks_from_counts(self.num_greater[keep], self.num_tied[keep], tie_policy)

    def metrics(self, tie_policy: TiePolicy = DEFAULT_TIE_POLICY,
                hits_at: tuple[int, ...] = HITS_AT) -> dict[str, float]:
        return ranking_metrics(self.ranks(tie_policy), hits_at)


# --- full-KB ranking ------------------------------------------------------------------------------

def rank_full_kb(score_block: ScoreBlock, gold_rows: np.ndarray, num_entities: int, *,
                 mention_batch_size: int = 64, entity_chunk_size: int = 8192, top_k: int = 0,
                 progress: bool = True) -> RankingResult:
    """Rank every mention's gold entity against all `num_entities` entities, chunk by chunk.

    Per mention batch, the chunk holding each mention's gold entity is scored first (only for the
    mentions whose gold lies there) to learn the gold scores; those blocks are kept (at most
    b x entity_chunk_size scores in all) and reused when the chunk loop reaches them, so every
    (mention, entity) pair is scored exactly once. `score_block` must score a pair the same way
    whatever other rows share the call. With `top_k == 0`, excluded mentions are not scored at all.
    """
    gold = _check_gold_rows(gold_rows, num_entities)
    _check_positive(mention_batch_size=mention_batch_size, entity_chunk_size=entity_chunk_size)
    if top_k < 0:
        raise UsageError(f"top_k must be >= 0, got {top_k}")
    keep = min(top_k, num_entities)
    result = _empty_result(gold, keep)
    rows_to_score = np.arange(len(gold)) if keep else np.flatnonzero(gold >= 0)
    batches = range(0, len(rows_to_score), mention_batch_size)
    for start in tqdm(batches, desc="ranking (full KB)", unit="batch", disable=not progress):
        rows = rows_to_score[start:start + mention_batch_size]
        _rank_batch_full_kb(score_block, rows, num_entities, entity_chunk_size, keep, result)
    return result


def _rank_batch_full_kb(score_block: ScoreBlock, rows: np.ndarray, num_entities: int, chunk_size: int,
                        keep: int, result: RankingResult) -> None:
    gold = result.gold_rows[rows]                                   # [b]
    evaluated = gold >= 0
    gold_chunk = np.where(evaluated, gold // chunk_size, -1)
    gold_scores = np.full(len(rows), np.nan)
    cached: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for chunk in np.unique(gold_chunk[evaluated]):
        positions = np.flatnonzero(gold_chunk == chunk)
        start, stop = _chunk_bounds(int(chunk), chunk_size, num_entities)
        block = _call_score_block(score_block, rows[positions], start, stop)  # [p, n]
        gold_scores[positions] = block[np.arange(len(positions)), gold[positions] - start]
        cached[int(chunk)] = (positions, block)

    greater = np.zeros(len(rows), dtype=np.int64)
    tied = np.zeros(len(rows), dtype=np.int64)
    top = _RunningTopK(len(rows), keep)
    for chunk in range(-(-num_entities // chunk_size)):
        start, stop = _chunk_bounds(chunk, chunk_size, num_entities)
        block = _assemble_chunk(score_block, rows, start, stop, cached.pop(chunk, None))  # [b, n]
        chunk_greater, chunk_tied = _count_against_gold(block[evaluated], gold_scores[evaluated])
        greater[evaluated] += chunk_greater
        tied[evaluated] += chunk_tied
        top.update(block, start)

    result.gold_scores[rows] = gold_scores
    result.num_greater[rows[evaluated]] = greater[evaluated]
    result.num_tied[rows[evaluated]] = tied[evaluated] - 1  # the gold entity ties with itself
    if keep:
        result.topk_rows[rows], result.topk_scores[rows] = top.rows, top.scores


def _assemble_chunk(score_block: ScoreBlock, rows: np.ndarray, start: int, stop: int,
                    cached: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """Scores [b, n] of the batch against entities [start, stop), reusing the gold-pass block if any."""
    if cached is None:
        return _call_score_block(score_block, rows, start, stop)
    positions, cached_block = cached
    others = np.setdiff1d(np.arange(len(rows)), positions)
    if not len(others):
        return cached_block
    other_block = _call_score_block(score_block, rows[others], start, stop)
    block = np.empty((len(rows), stop - start), dtype=np.result_type(cached_block, other_block))
    block[positions] = cached_block
    block[others] = other_block
    return block


def _count_against_gold(block: np.ndarray, gold_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `block` [e, n]: how many scores exceed, and how many equal, that row's gold score."""
    reference = gold_scores[:, None]                                # [e, 1]
    return (block > reference).sum(axis=1), (block == reference).sum(axis=1)


class _RunningTopK:
    """Best `k` (row, score) pairs per mention across chunks; ties resolved towards the lower row."""

    def __init__(self, batch: int, k: int):
        self.k = k
        self.rows = np.empty((batch, 0), dtype=np.int64)
        self.scores = np.empty((batch, 0), dtype=np.float64)

    def update(self, block: np.ndarray, offset: int) -> None:
        if not self.k:
            return
        chunk_rows, chunk_scores = top_k_per_row(block, self.k)
        rows = np.concatenate([self.rows, chunk_rows + offset], axis=1)
        scores = np.concatenate([self.scores, chunk_scores], axis=1)
        order = np.lexsort((rows, -scores), axis=-1)[:, :self.k]
        self.rows = np.take_along_axis(rows, order, axis=1)
        self.scores = np.take_along_axis(scores, order, axis=1)


def top_k_per_row(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns [b, k'] and scores [b, k'] (float64) of the k' = min(k, n) best entries of each row of
    `scores` [b, n], best first; among equal scores the lower column comes first.

    A plain argpartition would pick arbitrary members of a tie at the k-th value; this keeps
    everything above the k-th value plus the first tied columns, so the result does not depend on
    how entities are chunked.
    """
    batch, width = scores.shape
    keep = min(k, width)
    if keep < 1:
        return np.empty((batch, 0), dtype=np.int64), np.empty((batch, 0), dtype=np.float64)
    kth = np.partition(scores, width - keep, axis=1)[:, width - keep][:, None]   # [b, 1]
    above = scores > kth
    tied = scores == kth
    needed = keep - above.sum(axis=1, keepdims=True)
    chosen = above | (tied & (np.cumsum(tied, axis=1) <= needed))
    columns = np.nonzero(chosen)[1].reshape(batch, keep)
    values = np.take_along_axis(scores, columns, axis=1).astype(np.float64)
    order = np.lexsort((columns, -values), axis=-1)
    return np.take_along_axis(columns, order, axis=1).astype(np.int64), np.take_along_axis(values, order, axis=1)


# --- candidate-limited ranking --------------------------------------------------------------------

def rank_candidates(score_pairs: PairScorer, candidates: Sequence[np.ndarray], gold_rows: np.ndarray, *,
                    num_entities: int | None = None, mention_batch_size: int = 256, top_k: int = 0,
                    progress: bool = True) -> RankingResult:
    """Rank each mention's gold entity inside {gold} ∪ its candidate rows (DIM protocol, models.md §4.7).

    Duplicate candidate rows are scored once. `gold_added` counts the mentions whose list lacked
    the gold (the candidate generator's misses, which this protocol hides from the metrics).
    """
    gold = np.asarray(gold_rows, dtype=np.int64)
    if gold.ndim != 1 or len(candidates) != len(gold):
        raise UsageError(f"need one candidate array per mention: {len(candidates)} candidate arrays "
                         f"for gold_rows of shape {gold.shape}")
    if num_entities is not None:
        _check_gold_rows(gold, num_entities)
    _check_positive(mention_batch_size=mention_batch_size)
    result = _empty_result(gold, top_k)
    batches = range(0, len(gold), mention_batch_size)
    for start in tqdm(batches, desc="ranking (candidates)", unit="batch", disable=not progress):
        rows = np.arange(start, min(start + mention_batch_size, len(gold)))
        if not top_k:
            rows = rows[gold[rows] >= 0]
        sets = [_candidate_set(index, candidates[index], gold[index], num_entities, result) for index in rows]
        _rank_batch_candidates(score_pairs, rows, sets, top_k, result)
    return result


def _candidate_set(index: int, candidate_rows: np.ndarray, gold: int, num_entities: int | None,
                   result: RankingResult) -> np.ndarray:
    rows = np.unique(np.asarray(candidate_rows, dtype=np.int64))
    if num_entities is not None and len(rows) and (rows[0] < 0 or rows[-1] >= num_entities):
        raise UsageError(f"mention {index}: candidate rows must lie in [0, {num_entities}), "
                         f"got {rows[0]}..{rows[-1]}")
    if gold >= 0 and not np.isin(gold, rows):
        result.gold_added += 1
        rows = np.append(rows, gold)
    return rows


def _rank_batch_candidates(score_pairs: PairScorer, rows: np.ndarray, sets: list[np.ndarray], top_k: int,
                           result: RankingResult) -> None:
    if not len(rows):
        return
    sizes = np.array([len(entity_rows) for entity_rows in sets])
    mention_rows = np.repeat(rows, sizes)                            # [P]
    entity_rows = np.concatenate(sets)                               # [P]
    scores = as_numpy_scores(score_pairs(mention_rows, entity_rows))
    if scores.shape != entity_rows.shape:
        raise UsageError(f"score_pairs returned shape {scores.shape} for {len(entity_rows)} pairs")
    _check_no_nan(scores, f"score_pairs for mentions {rows[0]}..{rows[-1]}")
    for index, entity_set, set_scores in zip(rows, sets, np.split(scores, np.cumsum(sizes)[:-1]), strict=True):
        gold = result.gold_rows[index]
        if gold >= 0:
            gold_score = set_scores[entity_set == gold][0]
            result.gold_scores[index] = gold_score
            result.num_greater[index] = int((set_scores > gold_score).sum())
            result.num_tied[index] = int((set_scores == gold_score).sum()) - 1
        if top_k:
            order = np.lexsort((entity_set, -set_scores))[:top_k]
            result.topk_rows[index, :len(order)] = entity_set[order]
            result.topk_scores[index, :len(order)] = set_scores[order]


# --- shared checks --------------------------------------------------------------------------------

def _empty_result(gold: np.ndarray, keep: int) -> RankingResult:
    count = len(gold)
    return RankingResult(
        gold_rows=gold.copy(),
        gold_scores=np.full(count, np.nan),
        num_greater=np.full(count, -1, dtype=np.int64),
        num_tied=np.full(count, -1, dtype=np.int64),
        topk_rows=np.full((count, keep), -1, dtype=np.int64) if keep else None,
        topk_scores=np.full((count, keep), -np.inf) if keep else None,
    )


def _check_gold_rows(gold_rows: np.ndarray, num_entities: int) -> np.ndarray:
    gold = np.asarray(gold_rows, dtype=np.int64)
    if gold.ndim != 1:
        raise UsageError(f"gold_rows must be 1-D [M], got shape {gold.shape}")
    if num_entities < 1:
        raise UsageError(f"num_entities must be >= 1, got {num_entities}")
    bad = np.flatnonzero((gold >= num_entities) | ((gold < 0) & (gold != NIL_ROW) & (gold != MISSING_GOLD_ROW)))
    if len(bad):
        raise UsageError(f"gold row {gold[bad[0]]} of mention {bad[0]} is neither in [0, {num_entities}) nor "
                         f"NIL_ROW ({NIL_ROW}) / MISSING_GOLD_ROW ({MISSING_GOLD_ROW}); {len(bad)} such mentions")
    return gold


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")


def _chunk_bounds(chunk: int, chunk_size: int, num_entities: int) -> tuple[int, int]:
    return chunk * chunk_size, min((chunk + 1) * chunk_size, num_entities)


def _call_score_block(score_block: ScoreBlock, rows: np.ndarray, start: int, stop: int) -> np.ndarray:
    block = as_numpy_scores(score_block(rows, start, stop))
    if block.shape != (len(rows), stop - start):
        raise UsageError(f"score_block returned shape {block.shape} for {len(rows)} mentions x entities "
                         f"[{start}, {stop}); expected {(len(rows), stop - start)}")
    _check_no_nan(block, f"score_block for entities [{start}, {stop})")
    return block


def as_numpy_scores(scores: np.ndarray | torch.Tensor, dtype: type | None = None) -> np.ndarray:
    """A model's (tensor, any device) or a baseline's (array) scores as a NumPy array, in `dtype` if given.

    Half-precision tensors become float32 first (NumPy has no bfloat16).
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu()
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()
        scores = scores.numpy()
    return np.asarray(scores, dtype=dtype)


def _check_no_nan(scores: np.ndarray, where: str) -> None:
    """A NaN compares false with everything, so it would silently rank the gold first: refuse it."""
    if np.isnan(scores).any():
        raise UsageError(f"{where} returned NaN scores; fix the scorer (NaN would make ranks meaningless)")


__all__ = ["FULL_KB", "MISSING_GOLD_ROW", "NIL_ROW", "PairScorer", "RankingResult", "ScoreBlock",
           "as_numpy_scores", "candidates_protocol_name", "gold_rows_for", "rank_candidates", "rank_full_kb",
           "top_k_per_row"]
