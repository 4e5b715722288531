import json

import numpy as np
import pytest

from mmel.core.errors import MismatchError
from mmel.core.types import Dataset, Entity, KnowledgeBase, Mention
from mmel.experiments.evaluate import evaluate
from mmel.lexical.bm25 import BM25Index, entity_text, query_text


@pytest.fixture
def kb() -> KnowledgeBase:
    return KnowledgeBase([
        Entity(qid="Q1", name="George Washington", attributes="Occupation: politician, general."),
        Entity(qid="Q2", name="Washington", attributes="State of the United States."),
        Entity(qid="Q3", name="Noel Harrison", attributes="Occupation: singer, actor."),
        Entity(qid="Q4", name="Stefanie Powers", description="An American actress."),
        Entity(qid="Q5", name="Washington Irving", attributes="Occupation: writer."),
    ])


def test_name_search_ranks_the_matching_entities_first(kb):
    index = BM25Index.build(kb, "name")
    hits = index.search(["Noel Harrison", "Powers", "Washington"], k=3)
    assert hits.rows[0, 0] == 2
    assert hits.rows[1, 0] == 3
    assert hits.rows[2, 0] == 1  # the shortest name containing the word wins (length normalisation)
    assert set(hits.rows[2].tolist()) == {0, 1, 4}
    assert (np.diff(hits.scores, axis=1) <= 0).all()


def test_name_plus_text_uses_the_entity_text(kb):
    assert entity_text(kb[3], "name+text") == "Stefanie Powers An American actress."
    names_only = BM25Index.build(kb, "name").scores(["actress"])
    with_text = BM25Index.build(kb, "name+text").scores(["actress"])
    assert not names_only.any()
    assert with_text[0].argmax() == 3


def test_unknown_words_score_zero_everywhere(kb):
    scores = BM25Index.build(kb, "name").scores(["zzz qqq", "", "the of"])
    assert scores.shape == (3, 5) and not scores.any()


def test_save_load_gives_identical_scores(kb, tmp_path):
    index = BM25Index.build(kb, "name+text")
    index.save(tmp_path / "bm25")
    loaded = BM25Index.load(tmp_path / "bm25", kb=kb)
    queries = ["Washington the writer", "Harrison singer", "nothing here"]
    np.testing.assert_array_equal(loaded.scores(queries), index.scores(queries))
    assert loaded.qids == kb.qids and loaded.settings == index.settings
    manifest = json.loads((tmp_path / "bm25" / "manifest.json").read_text())
    assert manifest["tokenizer"]["stemmer"] is None and manifest["num_entities"] == 5
    assert not list((tmp_path / "bm25").rglob("*.pkl"))


def test_loading_against_another_kb_is_refused(kb, tmp_path):
    BM25Index.build(kb, "name").save(tmp_path / "bm25")
    other = KnowledgeBase([*kb, Entity(qid="Q6", name="Someone Else")])
    with pytest.raises(MismatchError, match="another knowledge base"):
        BM25Index.load(tmp_path / "bm25", kb=other)
    (tmp_path / "bm25" / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(MismatchError, match="rebuild"):
        BM25Index.load(tmp_path / "bm25")


def test_the_bm25_baseline_full_kb_report(kb):
    mentions = [Mention(id="m1", sentence="Noel Harrison sang.", surface="Noel Harrison", gold_qid="Q3"),
                Mention(id="m2", sentence="Powers smiled.", surface="Powers", gold_qid="Q4"),
                Mention(id="m3", sentence="Washington spoke.", surface="Washington", gold_qid="Q1"),
                Mention(id="m4", sentence="Nobody.", surface="Nobody", gold_qid=None),
                Mention(id="m5", sentence="Gone.", surface="Gone", gold_qid="Q99")]
    dataset = Dataset(name="toy", kb=kb, splits={"test": mentions}, root=".")
    report = evaluate(dataset, "test", "bm25", progress=False)
    assert report.mention_count == 3 and report.excluded_nil == 1 and report.excluded_missing_gold == 1
    assert report.metrics["hits@1"] == pytest.approx(2 / 3)
    assert report.model == "bm25-name" and report.protocol == "full-kb" and report.kb_size == 5
    assert report.extra["query"] == "surface+sentence"
    assert query_text(mentions[0], "surface+sentence") == "Noel Harrison Noel Harrison sang."


def test_synthetic_group_members_tie_on_names_and_text_cues_break_the_tie():
    from mmel.data.synthetic import generate_dataset

    dataset = generate_dataset(200, group_size=4, seed=0, mentions_per_split={"test": 80},
                               cue_mix={"image": 0.5, "text": 0.5, "both": 0.0})
    names = evaluate(dataset, "test", "bm25", progress=False)
    assert names.metrics["mr"] == 4.0 and names.metrics["hits@1"] == 0.0  # ties count against the gold
    with_text = evaluate(dataset, "test", "bm25-text", progress=False)
    assert with_text.metrics["hits@1"] == 0.5  # exactly the text-cue half
