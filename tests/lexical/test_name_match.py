"""Surface-name match: the function, its inverted index over a KB, and its ScoreBlock."""

from __future__ import annotations

import numpy as np
import pytest

from mmel.core.types import Entity, KnowledgeBase
from mmel.lexical.name_match import NameMatchIndex, name_match, name_tokens

KB = KnowledgeBase([Entity("Q1", "Greta Garbo"), Entity("Q2", "Melvyn Douglas"), Entity("Q3", "Cristina Garmendia"),
                    Entity("Q4", "Cristina Gaioni"), Entity("Q5", "José Martí"), Entity("Q6", "")])


def test_tokens_ignore_case_accents_and_punctuation():
    assert name_tokens("José MARTÍ, Jr.") == {"jose", "marti", "jr"}
    assert name_tokens("  ") == frozenset()


@pytest.mark.parametrize(("surface", "name", "expected"), [
    ("Garbo", "Greta Garbo", 1.0),                       # a surname: all of the surface, not the whole name
    ("Cristina Garmendia", "Cristina Garmendia", 2.0),   # the same token set: plus the exact bonus
    ("Cristina Garmendia", "Cristina Gaioni", 0.5),
    ("garbo", "Melvyn Douglas", 0.0),
    ("Jose Marti", "José Martí", 2.0),
    ("", "Greta Garbo", 0.0),
])
def test_name_match_values(surface, name, expected):
    assert name_match(surface, name) == expected


def test_index_scores_equal_the_function_for_every_entity():
    index = NameMatchIndex.from_kb(KB)
    for surface in ("Garbo", "Cristina Garmendia", "cristina", "Nobody Here", "José Martí"):
        np.testing.assert_array_equal(index.scores(surface), [name_match(surface, e.name) for e in KB])


def test_score_block_and_candidate_scores_slice_the_same_values():
    index = NameMatchIndex.from_kb(KB)
    surfaces = ["Garbo", "Cristina Garmendia"]
    block = index.score_block(surfaces)(np.array([1, 0]), 1, 4)                          # [2, 3]
    np.testing.assert_array_equal(block, [[0.0, 2.0, 0.5], [0.0, 0.0, 0.0]])
    candidates = np.array([[3, 0], [2, 3]])                                                 # [2, K=2]
    np.testing.assert_array_equal(index.candidate_scores(surfaces, candidates), [[0.0, 1.0], [2.0, 0.5]])
