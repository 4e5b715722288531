"""Why a ranking got a mention wrong: each error by type, from the surface-name match of the winner and the gold.

For every evaluable mention whose gold entity is not at rank 1 (ties count against the gold):

- `outside_shortlist`: the gold is not among the ranked entities (two-stage: the first stage missed it);
- `tie_with_gold`: the gold shares the top score with another entity;
- `namesake`: the winner's name matches the surface form exactly as well as the gold's (Phil vs Tim
  McGraw for "McGraw"): only the sentence, the image or the entity text can tell them apart;
- `better_name_won`: the winner's name matches the surface better than the gold's;
- `worse_name_won`: the winner's name matches worse: the model overruled the name and was wrong.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from mmel.core.types import KnowledgeBase, Mention
from mmel.evaluation.protocols import RankingResult
from mmel.lexical.name_match import name_match

ERROR_TYPES = ("outside_shortlist", "tie_with_gold", "namesake", "better_name_won", "worse_name_won")


def error_types(result: RankingResult, mentions: Sequence[Mention], kb: KnowledgeBase) -> dict[str, int] | None:
    """Counts of each error type (ERROR_TYPES order), or None when the ranking kept no top entities."""
    if result.topk_rows is None or result.topk_rows.shape[1] == 0:
        return None
    counts: Counter[str] = Counter({kind: 0 for kind in ERROR_TYPES})
    wrong = np.flatnonzero((result.gold_rows >= 0) & (result.num_greater + result.num_tied > 0))
    for index in wrong:
        counts[_error_type(result.topk_rows[index], int(result.gold_rows[index]), mentions[index].surface, kb)] += 1
    return {kind: counts[kind] for kind in ERROR_TYPES}


def _error_type(top_rows: np.ndarray, gold: int, surface: str, kb: KnowledgeBase) -> str:
    if gold not in top_rows:
        return "outside_shortlist"
    winner = int(top_rows[0])
    if winner == gold:
        return "tie_with_gold"
    winner_match, gold_match = name_match(surface, kb[winner].name), name_match(surface, kb[gold].name)
    if winner_match == gold_match:
        return "namesake"
    return "better_name_won" if winner_match > gold_match else "worse_name_won"


__all__ = ["ERROR_TYPES", "error_types"]
