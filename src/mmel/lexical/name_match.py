"""Surface-name match: how much of a mention's surface form an entity's name contains.

    name_match(surface, name) = |S & N| / |S| + [S == N]        in [0, 2]

with S and N the token sets of the surface form and the name (lower-cased, accents stripped,
Unicode word tokens). "Garbo" matches "Greta Garbo" 1.0, "Cristina Garmendia" matches itself
2.0 and "Cristina Gaioni" 0.5.

Why: WikiMEL and RichpediaMEL mentions are mostly names or surnames of their gold entity, while
a model over frozen mean-pooled text features blurs names: many of its errors pick an entity that
the sentence mentions, or one with a similar name, over the one the surface form names. The
match serves two ways (mmel additions, not part of any published model):

- as a baseline, `name-match`: entities ranked by the match, ties broken by the dense cosine;
- as a prior added to a model's score, `model + weight * name_match`, with the weight tuned on a
  dev split (docs/RESULTS.md): the match narrows the KB to the entities the surface names, the
  model decides among them.

Shapes: b mentions, n entities in a block, K candidates per mention.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np

from mmel.core.types import KnowledgeBase
from mmel.evaluation import ScoreBlock

_WORD = re.compile(r"\w+")
EXACT_BONUS = 1.0


def name_tokens(text: str) -> frozenset[str]:
    """Lower-cased, accent-free Unicode word tokens of `text`."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return frozenset(_WORD.findall("".join(char for char in decomposed if not unicodedata.combining(char))))


def name_match(surface: str, name: str) -> float:
    """The share of the surface form's tokens in the name, plus 1 when the two token sets are equal."""
    surface_tokens, entity_tokens = name_tokens(surface), name_tokens(name)
    return float(_match_value(len(surface_tokens & entity_tokens), len(surface_tokens), len(entity_tokens)))


def _match_value(shared: float | np.ndarray, surface_count: int, name_count: int | np.ndarray) -> float | np.ndarray:
    """The formula from token counts (element-wise over entities); 0 for a surface without tokens.

    The sets are equal exactly when every surface token is shared and the name has no other token.
    """
    if surface_count == 0:
        return shared * 0.0
    return shared / surface_count + EXACT_BONUS * ((shared == surface_count) & (name_count == surface_count))


class NameMatchIndex:
    """`name_match` of mention surfaces against every KB entity, through an inverted index over name tokens."""

    def __init__(self, names: Sequence[str]):
        """`names`: one entity name per KB row."""
        postings: dict[str, list[int]] = {}
        token_counts = np.zeros(len(names), dtype=np.int32)                   # [N] |N| per entity
        for row, name in enumerate(names):
            tokens = name_tokens(name)
            token_counts[row] = len(tokens)
            for token in tokens:
                postings.setdefault(token, []).append(row)
        self._postings = {token: np.array(rows, dtype=np.int64) for token, rows in postings.items()}
        self._token_counts = token_counts

    @classmethod
    def from_kb(cls, kb: KnowledgeBase) -> NameMatchIndex:
        return cls([entity.name for entity in kb])

    def __len__(self) -> int:
        return len(self._token_counts)

    def scores(self, surface: str) -> np.ndarray:
        """[N] name_match of one surface form against every entity."""
        tokens = name_tokens(surface)
        shared = np.zeros(len(self), dtype=np.float64)
        for token in tokens:
            rows = self._postings.get(token)
            if rows is not None:
                shared[rows] += 1.0
        return _match_value(shared, len(tokens), self._token_counts)

    def score_block(self, surfaces: Sequence[str]) -> ScoreBlock:
        """A ScoreBlock (mention rows, start, stop) -> [b, n] for the evaluation protocols."""
        def score(mention_rows: np.ndarray, start: int, stop: int) -> np.ndarray:
            return np.stack([self.scores(surfaces[row])[start:stop] for row in mention_rows])
        return score

    def candidate_scores(self, surfaces: Sequence[str], candidate_rows: np.ndarray) -> np.ndarray:
        """[b, K] name_match of surface b against its own candidate rows [b, K]."""
        return np.stack([self.scores(surface)[rows] for surface, rows in zip(surfaces, candidate_rows, strict=True)])


__all__ = ["NameMatchIndex", "name_match", "name_tokens"]
