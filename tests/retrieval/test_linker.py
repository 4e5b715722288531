"""The Linker over a real index (tests/conftest.py `tiny_index`): build, load, mismatch refusal,
linking, bad queries, incremental add / update / remove, NIL, and JSONL linking that resumes."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from mmel.core.config import ConfigError
from mmel.core.errors import DataError, MismatchError, PathEscapeError, UsageError
from mmel.core.paths import atomic_write_json, read_json
from mmel.core.types import Dataset, Entity, KnowledgeBase, Mention
from mmel.models.mimic import MIMICConfig, MIMICModel
from mmel.retrieval.index_build import IndexBuildConfig, build_index, describe_index
from mmel.retrieval.jobs import link_jsonl
from mmel.retrieval.linker import Linker, MentionQuery, QueryError
from mmel.retrieval.nil import calibrate_nil, choose_simulated_nil


@pytest.fixture
def index_copy(tiny_index, tmp_path):
    return tiny_index.copy_index(tmp_path / "index")


@pytest.fixture
def own_linker(index_copy, linker_backbone):
    """A Linker over a private copy of the index, for tests that change it."""
    with Linker.load(index_copy, backbone=linker_backbone) as linker:
        yield linker


def png_bytes(colour=(200, 30, 30), size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


# --- build and load -------------------------------------------------------------------------------

def test_index_directory_describes_itself(tiny_index):
    info = describe_index(tiny_index.index_dir)
    assert info["entities"] == len(tiny_index.dataset.kb)
    assert info["model"]["model_type"] == "mimic"
    assert info["backbone"]["name"] == "minilm_effnet"
    assert info["preprocess"]["max_text_length"] == 40
    assert info["first_stage"] == "hybrid" and info["vector_index"] == "flat"
    assert len(info["kb"]["checksum_at_build"]) == 64
    for name in ("model/config.json", "model/model.safetensors", "vectors/faiss.index", "entities.sqlite",
                 "entity_cache/segments.json", "bm25/manifest.json"):
        assert (tiny_index.index_dir / name).is_file(), name


def test_load_refuses_another_model(tiny_index, linker_backbone, tmp_path):
    other = MIMICModel(MIMICConfig(text_dim=384, image_global_dim=1280, image_patch_dim=1280))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(MismatchError, match="built for model"):
        Linker.load(tiny_index.index_dir, expect_model=tmp_path / "other", backbone=linker_backbone)
    with Linker.load(tiny_index.index_dir, expect_model=tiny_index.checkpoint, backbone=linker_backbone) as linker:
        assert len(linker) == len(tiny_index.dataset.kb)


def test_load_refuses_changed_model_weights(index_copy, linker_backbone, tmp_path):
    other = MIMICModel(MIMICConfig(text_dim=384, image_global_dim=1280, image_patch_dim=1280))
    other.save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", index_copy / "model" / "model.safetensors")
    with pytest.raises(MismatchError, match="weights changed"):
        Linker.load(index_copy, backbone=linker_backbone)


def test_load_refuses_another_backbone_fingerprint(index_copy, linker_backbone):
    manifest = read_json(index_copy / "manifest.json")
    manifest["backbone"]["fingerprint"] = "minilm_effnet-0000000000000000"
    atomic_write_json(index_copy / "manifest.json", manifest)
    with pytest.raises(MismatchError, match="backbone"):
        Linker.load(index_copy, backbone=linker_backbone)


def test_load_refuses_a_directory_that_is_not_an_index(tmp_path, linker_backbone):
    with pytest.raises(MismatchError, match="not an mmel link index"):
        Linker.load(tmp_path, backbone=linker_backbone)


# --- linking --------------------------------------------------------------------------------------

def test_every_known_mention_links_to_its_entity(shared_linker, tiny_index):
    for sentence, mention, qid in tiny_index.queries:
        result = shared_linker.link(sentence, mention=mention, top_k=3)
        assert result.best is not None and result.best.qid == qid, (sentence, [c.qid for c in result.candidates])
        assert [c.rank for c in result.candidates] == [1, 2, 3]
        scores = [c.score for c in result.candidates]
        assert scores == sorted(scores, reverse=True)
        assert set(result.best.unit_scores) == {"tglu", "vdlu", "cmfu"}
        assert result.best.retrieval_score is not None and not result.nil


def test_span_and_mention_text_give_the_same_answer(shared_linker):
    sentence = "Mercury sang Bohemian Rhapsody with Queen."
    by_text = shared_linker.link(sentence, mention="Mercury", top_k=4)
    by_span = shared_linker.link(sentence, span=(0, 7), top_k=4)
    assert by_text.mention.span == (0, 7) and by_text.mention.surface == "Mercury"
    assert [c.qid for c in by_text.candidates] == [c.qid for c in by_span.candidates]
    assert [c.score for c in by_text.candidates] == pytest.approx([c.score for c in by_span.candidates])


def test_batch_equals_one_by_one(shared_linker, tiny_index):
    queries = [MentionQuery(sentence=s, mention=m) for s, m, _ in tiny_index.queries]
    batch = shared_linker.link_batch(queries, top_k=3)
    for query, result in zip(queries, batch, strict=True):
        single = shared_linker.link(query.sentence, mention=query.mention, top_k=3)
        assert [c.qid for c in result.candidates] == [c.qid for c in single.candidates]
        assert [c.score for c in result.candidates] == pytest.approx([c.score for c in single.candidates], rel=1e-4)


def test_image_as_path_bytes_or_pil_gives_one_answer(shared_linker, tmp_path):
    (tmp_path / "m.png").write_bytes(png_bytes())
    sentence = "Mercury is the closest planet to the Sun."
    answers = [shared_linker.link(sentence, mention="Mercury", image=image, top_k=3)
               for image in (tmp_path / "m.png", str(tmp_path / "m.png"), png_bytes(),
                             Image.open(io.BytesIO(png_bytes())))]
    for answer in answers[1:]:
        assert [c.score for c in answer.candidates] == pytest.approx([c.score for c in answers[0].candidates])
    without = shared_linker.link(sentence, mention="Mercury", top_k=3)
    imaged = {c.qid: c for c in answers[0].candidates}
    assert imaged["Q308"].unit_scores["vdlu"] != 0.0          # both sides have an image: VDLU speaks
    assert {c.qid: c for c in without.candidates}["Q308"].unit_scores["vdlu"] == 0.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sentence": "   ", "mention": "x"}, "sentence is empty"),
    ({"sentence": "Paris is big", "mention": "Rome"}, "does not occur"),
    ({"sentence": "Paris is big", "mention": "Paris", "span": (0, 5)}, "exactly one"),
    ({"sentence": "Paris is big"}, "exactly one"),
    ({"sentence": "Paris is big", "span": (3, 99)}, "out of range"),
    ({"sentence": "Paris is big", "span": (5, 2)}, "out of range"),
    ({"sentence": "Paris is big", "span": (5, 6)}, "whitespace"),
    ({"sentence": "Paris is big", "mention": "Paris", "image": b"not an image"}, "not a usable image"),
    ({"sentence": "Paris is big", "mention": "Paris", "image": "/no/such/file.png"}, "cannot read image"),
    ({"sentence": "Paris is big", "mention": "Paris", "image": 42}, "must be a path"),
    ({"sentence": "Paris is big", "mention": "Paris", "top_k": 0}, "top_k"),
    ({"sentence": "Paris is big", "mention": "Paris", "top_k": True}, "top_k"),
    ({"sentence": "Paris\u200b\u200b is big", "mention": "\u200b\u200b"}, "mention is empty"),
    ({"sentence": "\u200b\ufeff \u200d", "mention": "\u200b"}, "sentence is empty"),
    ({"sentence": "Paris\u200b\u200b is big", "span": (5, 7)}, "invisible characters"),
])
def test_bad_queries_raise_query_error(shared_linker, kwargs, message):
    sentence = kwargs.pop("sentence")
    with pytest.raises(QueryError, match=message):
        shared_linker.link(sentence, **kwargs)


def test_entity_lookup_and_images(shared_linker):
    entity = shared_linker.entity("Q15869")
    assert entity is not None and entity.name == "Freddie Mercury"
    assert shared_linker.entity("Q-nope") is None
    assert shared_linker.entity_image("Q15869", 0).size == (96, 96)
    assert shared_linker.entity_image("Q15869", 1) is None       # it has one image
    assert shared_linker.entity_image("Q90", 0) is None          # no image at all
    assert set(shared_linker.entities(["Q90", "Q-nope"])) == {"Q90"}


# --- incremental changes --------------------------------------------------------------------------

def test_added_entity_is_linkable_at_once_and_after_reload(own_linker, index_copy, linker_backbone, tiny_index):
    new = Entity("Q999", "Mercury Morris", "Sex: male. Occupation: American football running back.")
    report = own_linker.add_entities([new], tiny_index.root)
    assert (report.added, report.updated) == (1, 0)
    result = own_linker.link("Mercury Morris ran for the Dolphins.", mention="Mercury Morris", top_k=10)
    assert "Q999" in [c.qid for c in result.candidates]
    assert len(own_linker) == len(tiny_index.dataset.kb) + 1
    with Linker.load(index_copy, backbone=linker_backbone) as reloaded:
        again = reloaded.link("Mercury Morris ran for the Dolphins.", mention="Mercury Morris", top_k=10)
        assert [c.qid for c in again.candidates] == [c.qid for c in result.candidates]
        assert reloaded.info()["revision"] == 1 and reloaded.info()["cache_segments"] == 2


def test_update_with_identical_content_keeps_scores(own_linker, tiny_index):
    sentence, mention, qid = tiny_index.queries[7]
    before = own_linker.link(sentence, mention=mention, top_k=8)
    report = own_linker.add_entities([tiny_index.dataset.kb.get(qid)], tiny_index.root)
    assert (report.added, report.updated) == (0, 1)
    after = own_linker.link(sentence, mention=mention, top_k=8)
    assert [c.qid for c in after.candidates] == [c.qid for c in before.candidates]
    assert [c.score for c in after.candidates] == pytest.approx([c.score for c in before.candidates], abs=1e-2)


def test_update_renames_and_remove_forgets(own_linker, index_copy, linker_backbone):
    own_linker.add_entities([Entity("Q90", "Paris (city)", "Capital and largest city of France, on the Seine.")],
                            index_copy)
    assert own_linker.entity("Q90").name == "Paris (city)"
    result = own_linker.link("We flew to Paris to see the Eiffel Tower.", mention="Paris", top_k=8)
    assert {c.qid: c.name for c in result.candidates}["Q90"] == "Paris (city)"
    own_linker.remove_entities(["Q90", "Q47899"])
    result = own_linker.link("We flew to Paris to see the Eiffel Tower.", mention="Paris", top_k=8)
    assert not {"Q90", "Q47899"} & {c.qid for c in result.candidates}
    assert own_linker.entity("Q90") is None
    with Linker.load(index_copy, backbone=linker_backbone) as reloaded:
        assert "Q90" not in {c.qid for c in reloaded.link("Paris", mention="Paris", top_k=8).candidates}
        assert len(reloaded) == 6
        before = reloaded.link("We flew to Paris to see the Eiffel Tower.", mention="Paris", top_k=6)
        report = reloaded.compact()
        assert (report.rows_before, report.rows_after) == (9, 6) and reloaded.info()["cache_rows_on_disk"] == 6
        after = reloaded.link("We flew to Paris to see the Eiffel Tower.", mention="Paris", top_k=6)
        assert [(c.qid, c.score) for c in after.candidates] == [(c.qid, c.score) for c in before.candidates]
    with Linker.load(index_copy, backbone=linker_backbone) as compacted:
        assert len(compacted) == 6 and compacted.info()["cache_rows_on_disk"] == 6


def test_remove_unknown_qid_changes_nothing(own_linker):
    with pytest.raises(KeyError, match="not in the index"):
        own_linker.remove_entities(["Q90", "Q-unknown"])
    assert own_linker.entity("Q90") is not None and len(own_linker) == 8


def test_add_refuses_bad_entities(own_linker, tiny_index):
    with pytest.raises(DataError, match="duplicate"):
        own_linker.add_entities([Entity("Q1", "A"), Entity("Q1", "B")], tiny_index.root)
    with pytest.raises(PathEscapeError):
        own_linker.add_entities([Entity("Q2", "B", images=("../../etc/passwd",))], tiny_index.root)
    assert len(own_linker) == 8


# --- NIL ------------------------------------------------------------------------------------------

def test_nil_threshold_decides_and_persists(own_linker, index_copy, linker_backbone):
    sentence = "Noel Harrison sang The Windmills of Your Mind."
    best = own_linker.link(sentence, mention="Noel Harrison").best.score
    too_high = calibrate_nil(np.array([best + 1.0, best + 2.0]), np.array([False, True]), np.array([True, False]))
    own_linker.set_nil_calibration(too_high)
    result = own_linker.link(sentence, mention="Noel Harrison")
    assert result.nil and result.best is None and result.nil_threshold == pytest.approx(too_high.threshold)
    with Linker.load(index_copy, backbone=linker_backbone) as reloaded:
        assert reloaded.link(sentence, mention="Noel Harrison").nil
        assert reloaded.info()["nil_threshold"] == pytest.approx(too_high.threshold)
    own_linker.set_nil_calibration(None)
    assert not own_linker.link(sentence, mention="Noel Harrison").nil


def test_calibrate_nil_on_dev_mentions(shared_linker, tiny_index):
    dev = [Mention(f"d{i}", sentence, mention, gold_qid=qid) for i, (sentence, mention, qid) in
           enumerate(tiny_index.queries)]
    dev.append(Mention("nil", "Zorblax the Wise opened the gates.", "Zorblax", gold_qid=None))
    calibration = shared_linker.calibrate_nil(dev, tiny_index.root, nil_fraction=0.3, seed=1, progress=False)
    assert calibration.num_mentions == len(dev)
    simulated = choose_simulated_nil(len(dev), 0.3, seed=1)
    assert calibration.num_nil == int(simulated[:-1].sum()) + 1     # the simulated ones plus the real NIL mention
    assert calibration.curve[0].answered == len(dev)
    assert 0.0 <= calibration.chosen.accuracy <= 1.0
    assert calibration.statistic == "margin"
    assert calibration.metadata["model_fingerprint"] == shared_linker.info()["model_fingerprint"]


def test_margin_threshold_makes_a_near_tie_nil(own_linker):
    sentence = "Noel Harrison sang The Windmills of Your Mind."
    result = own_linker.link(sentence, mention="Noel Harrison")
    margin = result.candidates[0].score - result.candidates[1].score
    above = calibrate_nil(np.array([margin + 1.0, margin + 2.0]), np.array([False, True]), np.array([True, False]),
                          statistic="margin")
    own_linker.set_nil_calibration(above)
    flagged = own_linker.link(sentence, mention="Noel Harrison")
    assert flagged.nil and flagged.nil_statistic == "margin"
    own_linker.set_nil_calibration(None)


# --- first stages ---------------------------------------------------------------------------------

def test_build_refuses_bad_settings_and_kbs(tiny_index, linker_backbone, tmp_path):
    with pytest.raises(ConfigError, match="available: dense, bm25, hybrid"):
        IndexBuildConfig(first_stage="sparse")
    with pytest.raises(ConfigError, match="ivf_num_probes"):
        IndexBuildConfig(ivf_num_probes=-1)
    with pytest.raises(ConfigError, match="recall_target"):
        IndexBuildConfig(recall_target=1.5)
    assert IndexBuildConfig(ivf_num_probes=64).vector_index_config().ivf_num_probes == 64
    with pytest.raises(ConfigError, match="vector_index"):
        IndexBuildConfig(vector_index="lsh")
    for kb, message in ((KnowledgeBase([]), "empty"), (KnowledgeBase([Entity("Q1", "A"), Entity("Q1", "B")]),
                                                         "duplicate")):
        dataset = Dataset(name="bad", kb=kb, splits={}, root=tmp_path)
        with pytest.raises(DataError, match=message):
            build_index(dataset, tiny_index.checkpoint, tmp_path / "index", backbone=linker_backbone, progress=False)
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize(("first_stage", "reranker"), [("dense", "model"), ("bm25", "none")])
def test_other_first_stages_and_no_reranker(tiny_index, linker_backbone, tmp_path, first_stage, reranker):
    config = IndexBuildConfig(first_stage=first_stage, reranker=reranker, cache_dtype="float16")
    build_index(tiny_index.dataset, tiny_index.checkpoint, tmp_path / "index", config=config,
                backbone=linker_backbone, progress=False)
    with Linker.load(tmp_path / "index", backbone=linker_backbone) as linker:
        result = linker.link("Stefanie Powers starred in Hart to Hart.", mention="Stefanie Powers", top_k=3)
        assert result.best.qid == "Q256474"
        assert (result.best.unit_scores == {}) == (reranker == "none")
        assert linker.info()["cache_dtype"] == "float16"


# --- JSONL files ----------------------------------------------------------------------------------

def test_link_jsonl_resumes_and_reports_bad_mentions(shared_linker, tmp_path):
    records = [{"id": "a", "sentence": "We flew to Paris to see the Eiffel Tower.", "surface": "Paris"},
               {"id": "b", "sentence": "Mercury sang Bohemian Rhapsody with Queen.", "surface": "Mercury",
                "span": [0, 7]},
               {"id": "c", "sentence": "Nobody here.", "surface": ""},
               {"id": "d", "sentence": "The singer of Queen was born in Zanzibar.", "surface": "Freddie Mercury"}]
    source = tmp_path / "mentions.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n")
    output = tmp_path / "out" / "results.jsonl"
    first = link_jsonl(shared_linker, source, output, top_k=2, progress=False)
    assert (first.linked, first.skipped, first.failed) == (2, 0, 0)
    with output.open("ab") as handle:                      # a run killed in the middle of a line
        handle.write(b'{"id": "c", "cand')
    source.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    second = link_jsonl(shared_linker, source, output, top_k=2, progress=False)
    assert (second.linked, second.skipped, second.failed) == (1, 2, 1) and second.dropped_partial_line
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["a", "b", "c", "d"]
    assert lines[0]["candidates"][0]["qid"] == "Q90" and lines[1]["candidates"][0]["qid"] == "Q15869"
    assert "empty" in lines[2]["error"]
    assert lines[3]["span"] is None and lines[3]["candidates"]   # a surface not in its sentence is still linked


def test_link_jsonl_refuses_a_foreign_output_file(shared_linker, tmp_path):
    source = tmp_path / "mentions.jsonl"
    source.write_text(json.dumps({"id": "a", "sentence": "Paris!", "surface": "Paris"}) + "\n")
    output = tmp_path / "results.jsonl"
    output.write_text("this is not mmel output\n")
    with pytest.raises(DataError, match="line 1"):
        link_jsonl(shared_linker, source, output, progress=False)



def test_name_prior_adds_the_weighted_surface_name_match(shared_linker, tiny_index, linker_backbone, tmp_path):
    from mmel.lexical.name_match import name_match
    from mmel.retrieval.index_build import IndexBuildConfig

    build_index(tiny_index.dataset, tiny_index.checkpoint, tmp_path / "prior",
                config=IndexBuildConfig(name_prior_weight=2.0), backbone=linker_backbone, progress=False)
    sentence = "Mercury sang Bohemian Rhapsody with Queen."
    plain = {c.qid: c for c in shared_linker.link(sentence, mention="Mercury", top_k=8).candidates}
    with Linker.load(tmp_path / "prior", backbone=linker_backbone) as linker:
        assert linker.info()["name_prior_weight"] == 2.0 and shared_linker.name_prior_weight == 0.0
        for candidate in linker.link(sentence, mention="Mercury", top_k=8).candidates:
            match = name_match("Mercury", linker.entity(candidate.qid).name)
            assert candidate.unit_scores["name_match"] == match
            assert candidate.score == pytest.approx(plain[candidate.qid].score + 2.0 * match, abs=1e-2)  # store fp16


def test_dataset_mentions_of_only_invisible_characters_are_refused_not_linked(shared_linker, tiny_index):
    from mmel.core.types import Mention

    blank = Mention(id="zw", sentence="\u200b\u200b", surface="\u200b")
    good = tiny_index.dataset.split("train")[0]
    outcomes = shared_linker.link_mentions([blank, good], tiny_index.root, top_k=1)
    assert isinstance(outcomes[0], QueryError) and "empty" in str(outcomes[0])
    assert outcomes[1].best.qid == good.gold_qid


def test_an_int8_reranker_cache_links_like_the_float32_one(tiny_index, linker_backbone, tmp_path):
    results = {}
    for dtype in ("float32", "int8"):
        build_index(tiny_index.dataset, tiny_index.checkpoint, tmp_path / dtype,
                    config=IndexBuildConfig(first_stage="dense", cache_dtype=dtype), backbone=linker_backbone,
                    progress=False)
        with Linker.load(tmp_path / dtype, backbone=linker_backbone) as linker:
            assert linker.info()["cache_dtype"] == dtype
            results[dtype] = linker.link("Stefanie Powers starred in Hart to Hart.", mention="Stefanie Powers",
                                         top_k=8)
    exact, quantized = results["float32"], results["int8"]
    assert [c.qid for c in quantized.candidates] == [c.qid for c in exact.candidates]
    np.testing.assert_allclose([c.score for c in quantized.candidates], [c.score for c in exact.candidates],
                               rtol=0.01)   # per-vector int8 steps move scores by well under a percent


def test_a_read_only_linker_links_and_refuses_edits(tiny_index, linker_backbone):
    sentence, surface, gold = tiny_index.queries[0]
    with Linker.load(tiny_index.index_dir, backbone=linker_backbone, read_only=True) as linker:
        assert linker.link(sentence, mention=surface, top_k=3).best.qid == gold
        with pytest.raises(UsageError, match="opened read-only"):
            linker.remove_entities([gold])
        assert gold in [c.qid for c in linker.link(sentence, mention=surface, top_k=3).candidates]


def test_a_context_prior_adds_its_weighted_features_and_old_indexes_read_as_a_name_prior(
        shared_linker, tiny_index, linker_backbone, tmp_path):
    from mmel.core.paths import atomic_write_json, read_json
    from mmel.core.types import Mention
    from mmel.lexical.context_features import FEATURE_NAMES, ContextPrior, candidate_features
    from mmel.retrieval.index_build import IndexBuildConfig

    weights = {"name_match": 2.0, "pronoun_conflicts": -5.0, "shared_words": 1.0}
    build_index(tiny_index.dataset, tiny_index.checkpoint, tmp_path / "prior",
                config=IndexBuildConfig(prior_weights=weights), backbone=linker_backbone, progress=False)
    sentence = "Mercury sang Bohemian Rhapsody with Queen; she was on stage."
    plain = {c.qid: c for c in shared_linker.link(sentence, mention="Mercury", top_k=8).candidates}
    with Linker.load(tmp_path / "prior", backbone=linker_backbone) as linker:
        assert linker.info()["prior"] == weights and linker.name_prior_weight == 2.0
        candidates = linker.link(sentence, mention="Mercury", top_k=8).candidates
        entities = [linker.entity(candidate.qid) for candidate in candidates]
        rows = candidate_features(Mention("m", sentence, "Mercury"), entities)
        for candidate, row in zip(candidates, rows, strict=True):
            assert candidate.unit_scores["shared_words"] == row[FEATURE_NAMES.index("shared_words")]
            expected = ContextPrior(weights).apply([plain[candidate.qid].score], [row])[0]
            assert candidate.score == pytest.approx(expected, abs=1e-2)   # the cache stores float16
        assert [c.score for c in candidates] == sorted((c.score for c in candidates), reverse=True)
    manifest_path = tmp_path / "prior" / "manifest.json"
    manifest = read_json(manifest_path)
    del manifest["prior"]   # an index from before the context prior: its name prior weight is the prior
    atomic_write_json(manifest_path, manifest)
    with Linker.load(tmp_path / "prior", backbone=linker_backbone) as linker:
        assert linker.prior.to_dict() == {"name_match": 2.0}
