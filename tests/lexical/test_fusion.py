"""Reciprocal-rank fusion, computed by hand."""

from __future__ import annotations

import pytest

from mmel.lexical.fusion import RRF_CONSTANT, reciprocal_rank_fusion


def test_fusion_adds_one_over_sixty_plus_rank_from_every_list_holding_the_key():
    dense = [("Q1", 0.9), ("Q2", 0.8), ("Q3", 0.7)]
    lexical = [("Q3", 12.0), ("Q4", 5.0)]
    fused = dict(reciprocal_rank_fusion([dense, lexical], k=10))
    assert fused["Q3"] == pytest.approx(1 / (RRF_CONSTANT + 3) + 1 / (RRF_CONSTANT + 1))
    assert fused["Q1"] == pytest.approx(1 / 61) and fused["Q4"] == pytest.approx(1 / 62)
    assert [key for key, _ in reciprocal_rank_fusion([dense, lexical], k=2)] == ["Q3", "Q1"]


def test_equal_fused_scores_keep_first_appearance_order():
    assert [key for key, _ in reciprocal_rank_fusion([[("A", 1.0)], [("B", 1.0)]], k=2)] == ["A", "B"]
