"""DIM's TF-IDF negative sampler (models.md §4.4): hard negatives that share salient words with the gold.

For each gold entity g, one negative:

- with probability `word_probability` (0.95), if g's text has a sampling word: draw a word w of
  g's text in proportion to its TF-IDF weight in g, then an entity containing w in proportion to
  w's term frequency in it (an inverted index), never g itself;
- otherwise: an entity drawn uniformly from all entities but g.

Differences from the release, which built its tables with gensim (`neg.json`):
- TF-IDF is scikit-learn's (`TfidfVectorizer` defaults: lower-cased word tokens, smoothed idf,
  l2-normalised rows) with English stop words removed; gensim's idf is log2(N / df).
- Words are drawn in exact proportion to their weight, not from a list repeating each word
  int(tfidf · 100) times (which drops words weighing under 0.01).
- Only words that some other entity also contains are sampling words: a word unique to g cannot
  lead to a negative.

Everything is vectorised over a batch of golds (KBs have 20K-1M entities): each draw is one
`searchsorted` into the cumulative weights of a CSR matrix.

Letters: N entities, V vocabulary words, S requested samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer

from mmel.core.errors import UsageError

WORD_PROBABILITY = 0.95   # share of negatives drawn through a TF-IDF word (§4.4)


class TfidfNegativeSampler:
    """`fit(entity_texts)` once per KB (texts in KB row order), then `sample(gold_rows, rng)` per batch."""

    def __init__(self, word_probability: float = WORD_PROBABILITY, stop_words: str | None = "english"):
        if not 0.0 <= word_probability <= 1.0:
            raise UsageError(f"word_probability must lie in [0, 1], got {word_probability}")
        self.word_probability = word_probability
        self.stop_words = stop_words
        self.num_entities = 0

    def fit(self, entity_texts: Sequence[str]) -> TfidfNegativeSampler:
        """Build the per-entity word weights [N, V] and the inverted index [V, N] of term counts."""
        if len(entity_texts) < 2:
            raise UsageError(f"negative sampling needs at least 2 entities, got {len(entity_texts)}")
        try:
            counts = CountVectorizer(stop_words=self.stop_words).fit_transform(entity_texts)   # [N, V] int
        except ValueError as error:
            raise UsageError(f"no entity text has a word to index ({error}); check the entity texts") from None
        counts = sparse.csr_matrix(counts, dtype=np.int64)
        weights = TfidfTransformer().fit_transform(counts)                                    # [N, V] float
        shared = np.asarray((counts > 0).sum(axis=0)).ravel() >= 2                            # [V]
        word_weights = sparse.csr_matrix(weights @ sparse.diags(shared.astype(np.float64)))  # unique words -> 0
        word_weights.eliminate_zeros()
        word_weights.sort_indices()
        postings = sparse.csr_matrix(counts.T)                                                # [V, N] int
        postings.sort_indices()

        self.num_entities = counts.shape[0]
        self._has_words = np.diff(word_weights.indptr) > 0
        self._word_weights = word_weights
        self._word_cumulative = np.cumsum(word_weights.data, dtype=np.float64)
        self._postings = postings
        self._posting_cumulative = np.cumsum(postings.data, dtype=np.int64)
        # a sortable key per stored entry (word, entity): finds an entity inside a word's posting list
        posting_words = np.repeat(np.arange(postings.shape[0], dtype=np.int64), np.diff(postings.indptr))
        self._posting_keys = posting_words * self.num_entities + postings.indices
        return self

    @property
    def has_words(self) -> np.ndarray:
        """[N] bool: entities whose text has at least one sampling word."""
        self._check_fitted()
        return self._has_words

    def sample(self, gold_rows: np.ndarray | Sequence[int], rng: np.random.Generator) -> np.ndarray:
        """One negative entity row per gold row (any shape; the result has the same shape), never the gold."""
        self._check_fitted()
        gold = np.asarray(gold_rows, dtype=np.int64)
        flat = gold.ravel()                                                                   # [S]
        if flat.size and (flat.min() < 0 or flat.max() >= self.num_entities):
            raise UsageError(f"gold rows must lie in [0, {self.num_entities}), got {flat.min()}..{flat.max()}")
        negatives = uniform_other_rows(flat, self.num_entities, rng)                          # [S]
        use_word = (rng.random(flat.size) < self.word_probability) & self._has_words[flat]
        if use_word.any():
            words = self._draw_words(flat[use_word], rng)
            negatives[use_word] = self._draw_entities_with_word(words, flat[use_word], rng)
        return negatives.reshape(gold.shape)

    def _draw_words(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A word of each entity row, in proportion to its TF-IDF weight in that row -> word ids [S]."""
        indptr, cumulative = self._word_weights.indptr, self._word_cumulative
        start, stop = indptr[rows], indptr[rows + 1]
        base = np.where(start > 0, cumulative[np.maximum(start - 1, 0)], 0.0)
        targets = base + rng.random(len(rows)) * (cumulative[stop - 1] - base)
        positions = np.clip(np.searchsorted(cumulative, targets, side="right"), start, stop - 1)
        return self._word_weights.indices[positions]

    def _draw_entities_with_word(self, words: np.ndarray, golds: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """An entity containing each word, in proportion to the word's count in it, the gold left out -> rows [S].

        Integer counts make the draw exact: t is drawn over the total count minus the gold's, and
        skips the gold's share of the cumulative counts. Sampling words have another entity, so
        the remaining total is never 0.
        """
        indptr, cumulative, counts = self._postings.indptr, self._posting_cumulative, self._postings.data
        start, stop = indptr[words], indptr[words + 1]
        base = np.where(start > 0, cumulative[np.maximum(start - 1, 0)], 0)
        gold_keys = words * self.num_entities + golds
        gold_at = np.minimum(np.searchsorted(self._posting_keys, gold_keys), len(counts) - 1)
        has_gold = self._posting_keys[gold_at] == gold_keys
        gold_count = np.where(has_gold, counts[gold_at], 0)
        before_gold = np.where(has_gold, cumulative[gold_at] - counts[gold_at] - base, np.iinfo(np.int64).max)
        offsets = rng.integers(0, cumulative[stop - 1] - base - gold_count)
        offsets = np.where(offsets >= before_gold, offsets + gold_count, offsets)
        positions = np.searchsorted(cumulative, base + offsets, side="right")
        return self._postings.indices[positions].astype(np.int64)

    def _check_fitted(self) -> None:
        if not self.num_entities:
            raise RuntimeError("TfidfNegativeSampler.sample needs fit(entity_texts) first")


def uniform_other_rows(gold_rows: np.ndarray, num_entities: int, rng: np.random.Generator) -> np.ndarray:
    """For each gold row [S], an entity row drawn uniformly from the other num_entities - 1 rows."""
    draws = rng.integers(0, num_entities - 1, size=len(gold_rows))
    return draws + (draws >= gold_rows)


__all__ = ["WORD_PROBABILITY", "TfidfNegativeSampler", "uniform_other_rows"]
