"""Error types of a ranking: each wrong mention classified by the names of its winner and its gold."""

from __future__ import annotations

import numpy as np

from mmel.core.types import Entity, KnowledgeBase, Mention
from mmel.evaluation.protocols import RankingResult
from mmel.experiments.errors import error_types

KB = KnowledgeBase([Entity("Q1", "Tim McGraw"), Entity("Q2", "Phil McGraw"), Entity("Q3", "McGraw"),
                    Entity("Q4", "Paris"), Entity("Q5", "Paris Hilton")])


def mention(surface: str) -> Mention:
    return Mention(id=surface, sentence=f"{surface} was there.", surface=surface, gold_qid=None)


def test_each_wrong_mention_gets_one_type() -> None:
    # rows: correct; namesake; better name won; worse name won; gold outside the shortlist; tie; NIL
    gold = np.array([0, 0, 0, 3, 4, 3, -1])
    top = np.array([[0, 1], [1, 0], [2, 0], [4, 3], [3, 2], [3, 4], [0, 1]])
    greater = np.array([0, 1, 1, 1, 2, 0, -1])
    tied = np.array([0, 0, 0, 0, 0, 1, -1])
    result = RankingResult(gold_rows=gold, gold_scores=np.zeros(7), num_greater=greater, num_tied=tied,
                           topk_rows=top, topk_scores=np.zeros((7, 2)))
    surfaces = ["McGraw", "McGraw", "McGraw", "Paris", "Paris Hilton", "Paris", "McGraw"]
    assert error_types(result, [mention(s) for s in surfaces], KB) == {
        "outside_shortlist": 1, "tie_with_gold": 1, "namesake": 1, "better_name_won": 1, "worse_name_won": 1}


def test_a_ranking_without_top_entities_has_no_breakdown() -> None:
    result = RankingResult(gold_rows=np.array([0]), gold_scores=np.zeros(1), num_greater=np.array([1]),
                           num_tied=np.array([0]))
    assert error_types(result, [mention("McGraw")], KB) is None
