"""DIM's candidate generator: the top-100 entity NAMES by fuzzy string similarity to the mention (models.md §4.7).

DIM's `search_top100.json` holds, per mention string, the 100 entities whose names fuzzywuzzy's
`process.extract` ranks first: scorer `WRatio`, both strings lower-cased with non-alphanumeric
characters turned into spaces (`full_process`). This module does the same with rapidfuzz (a
maintained, C++ implementation of the same scorers): `fuzz.WRatio` over names prepared by
`utils.default_process`. Two known differences: rapidfuzz's WRatio returns unrounded floats where
fuzzywuzzy rounds to integers, so fewer scores tie; ties are broken towards the lower entity row,
as `process.extract` does for a list of choices.

The candidate rows feed the DIM protocol of `mmel.evaluation.candidate_protocol`, which adds the
gold entity to them. Letters: M mentions, N entities, K candidates, m mentions in a chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rapidfuzz import fuzz, process, utils

from mmel.core.errors import UsageError
from mmel.evaluation import top_k_per_row

DIM_CANDIDATES = 100   # search_top100 (§4.6, §4.7)


class FuzzyNameIndex:
    """Entity names prepared once; `top_k(surfaces)` returns each surface's best-matching entity rows."""

    def __init__(self, names: Sequence[str], *, workers: int = 1):
        """`names` in KB row order; `workers` is rapidfuzz's thread count (-1: all cores)."""
        self.processed_names = [utils.default_process(name) for name in names]
        self.workers = workers

    def __len__(self) -> int:
        return len(self.processed_names)

    def top_k(self, surfaces: Sequence[str], k: int = DIM_CANDIDATES, *, mention_chunk: int = 256) -> np.ndarray:
        """Entity rows [M, min(k, N)] (int64), best WRatio first, lower row first among equal scores.

        Each distinct surface is scored once (DIM keys its candidates by the mention string); the
        [m, N] score block of one chunk of distinct surfaces is the largest array held.
        """
        if k < 1 or mention_chunk < 1:
            raise UsageError(f"k and mention_chunk must be >= 1, got k={k}, mention_chunk={mention_chunk}")
        if not self.processed_names:
            raise UsageError("FuzzyNameIndex has no entity names to search")
        distinct, inverse = np.unique(np.asarray(list(surfaces), dtype=object), return_inverse=True)
        keep = min(k, len(self.processed_names))
        rows = np.empty((len(distinct), keep), dtype=np.int64)
        for start in range(0, len(distinct), mention_chunk):
            chunk = [utils.default_process(surface) for surface in distinct[start:start + mention_chunk]]
            scores = process.cdist(chunk, self.processed_names, scorer=fuzz.WRatio, processor=None,
                                   dtype=np.float32, workers=self.workers)                  # [m, N]
            rows[start:start + len(chunk)] = top_k_per_row(scores, keep)[0]
        return rows[inverse.reshape(-1)]


__all__ = ["DIM_CANDIDATES", "FuzzyNameIndex"]
