"""DIM's fuzzy name candidates (models.md §4.7): fuzzywuzzy-style process.extract, via rapidfuzz."""

from __future__ import annotations

import numpy as np
import pytest
from rapidfuzz import fuzz, process, utils

from mmel.lexical.fuzzy import DIM_CANDIDATES, FuzzyNameIndex

NAMES = ["Gabor", "Greta Garbo", "garbo", "Garbo!", "Garbo", "Xavier Xu", "Gar bo", "Greta Gerwig",
         "Roger Federer", "Federer Express"]


def test_top_k_equals_process_extract_with_the_fuzzywuzzy_defaults() -> None:
    index = FuzzyNameIndex(NAMES)
    surfaces = ["Garbo", "greta", "FEDERER", "nothing alike", "Garbo"]
    rows = index.top_k(surfaces, k=4, mention_chunk=2)
    for surface, found in zip(surfaces, rows, strict=True):
        expected = process.extract(surface, NAMES, scorer=fuzz.WRatio, processor=utils.default_process, limit=4)
        assert found.tolist() == [position for _, _, position in expected]


def test_hand_case_exact_matches_first_ties_by_row() -> None:
    rows = FuzzyNameIndex(NAMES).top_k(["GARBO"], k=3)
    assert rows.tolist() == [[2, 3, 4]]      # 'garbo', 'Garbo!', 'Garbo' all score 100 after processing
    assert FuzzyNameIndex(NAMES).top_k(["Garbo"], k=100).shape == (1, len(NAMES))
    assert DIM_CANDIDATES == 100


def test_larger_kb_chunking_and_repeated_surfaces_agree() -> None:
    generator = np.random.default_rng(0)
    letters = list("abcdefgh ")
    names = ["".join(generator.choice(letters, size=8)) for _ in range(300)]
    surfaces = [names[i][:5] for i in generator.integers(0, 300, size=20)] * 2
    index = FuzzyNameIndex(names)
    whole = index.top_k(surfaces)
    assert whole.shape == (40, 100) and whole.dtype == np.int64
    np.testing.assert_array_equal(index.top_k(surfaces, mention_chunk=3), whole)
    np.testing.assert_array_equal(whole[:20], whole[20:])
    scores = process.cdist([surfaces[0]], names, scorer=fuzz.WRatio, processor=utils.default_process)[0]
    assert scores[whole[0]].min() >= np.delete(scores, whole[0]).max()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="k and mention_chunk"):
        FuzzyNameIndex(NAMES).top_k(["x"], k=0)
    with pytest.raises(ValueError, match="no entity names"):
        FuzzyNameIndex([]).top_k(["x"])
