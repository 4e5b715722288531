"""MIMIC-cleaned layout: reading, writing and both round trips."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest

from mmel.core.errors import DataError, PathEscapeError
from mmel.core.types import Dataset, Entity, KnowledgeBase, Mention
from mmel.data import load_dataset, read_dataset, write_dataset
from mmel.data.mimic_layout import MimicReadReport, official_image_name, read_mimic_layout, write_mimic_layout

# Rows deliberately out of id order; row 2 carries its QID itself, the others only through qid2id.json.
KB_ROWS = [
    {"id": 2, "type": "entity", "qid": "Q30", "entity_name": quote("Zoë (singer, born 1990)"), "attr": "Sex: female.",
     "desc": "A singer.", "image_list": ["Q30_0.jpg", "Q30_1.jpg"], "instance": "human"},
    {"id": 0, "type": "entity", "entity_name": quote("100% Pure/Love"), "attr": "Type: song.", "desc": "",
     "image_list": []},
    {"id": 1, "type": "entity", "entity_name": "Noel%20Harrison", "attr": "", "desc": "An actor.",
     "image_list": ["Q10_0.jpg"]},
]
QID2ID = {"Q20": 0, "Q10": 1, "Q30": 2}
TRAIN = [
    {"id": "w-1", "mentions": quote("Zoë"), "sentence": "Zoë sang in 2019.", "imgPath": "WikiMEL/imgs/55.png",
     "answer": "Q30", "entities": "Zoë (singer, born 1990)"},
    {"id": 7, "mentions": quote("Harrison"), "sentence": "Harrison on stage", "imgPath": "", "answer": "nil",
     "entities": "nil"},
]
DEV = [{"mentions": "Pure", "sentence": "pure love", "imgPath": "", "answer": "Q20", "entities": "100% Pure/Love"}]


@pytest.fixture
def mimic_dir(tmp_path: Path, write_json, write_jpeg) -> Path:
    root = tmp_path / "mimic"
    write_json(root / "kb_entity.json", KB_ROWS)
    (root / "qid2id.json").write_text(json.dumps(QID2ID) + "\n", encoding="utf-8")
    write_json(root / "WIKIMEL_train.json", TRAIN)
    write_json(root / "WIKIMEL_dev.json", DEV)
    for name in ("Q30_0.jpg", "Q30_1.jpg", "Q10_0.jpg"):
        write_jpeg(root / "kb_image" / name)
    write_jpeg(root / "mention_image" / "55.jpg")
    return root


def test_read_follows_the_official_loader(mimic_dir: Path) -> None:
    report = MimicReadReport()
    dataset = read_mimic_layout(mimic_dir, report=report)
    assert dataset.name == "wikimel" and list(dataset.splits) == ["train", "dev"]
    assert dataset.kb.qids == ["Q20", "Q10", "Q30"]  # sorted by id
    zoe = dataset.kb.get("Q30")
    assert zoe.name == "Zoë (singer, born 1990)" and zoe.attributes == "Sex: female." and zoe.description == "A singer."
    assert zoe.images == ("kb_image/Q30_0.jpg", "kb_image/Q30_1.jpg")
    assert zoe.extra == {"type": "entity", "instance": "human"}
    assert dataset.kb.get("Q20").name == "100% Pure/Love"
    first, nil = dataset.split("train")
    assert (first.id, first.surface, first.span, first.image) == ("w-1", "Zoë", (0, 3), "mention_image/55.jpg")
    assert first.extra == {"entities": "Zoë (singer, born 1990)"}
    assert nil.is_nil and nil.id == "7" and nil.image is None
    assert dataset.split("dev")[0].id == "dev-0" and dataset.split("dev")[0].span == (0, 4)
    assert report.nil_mentions == {"train": 1, "dev": 0}
    assert report.qid_sources == {"qid field": 1, "qid2id.json": 2}
    assert report.generated_mention_ids == 1 and report.qid_conflicts == 0 and not report.ids_not_dense


def test_mimic_to_mmel_to_mimic_keeps_what_the_official_code_reads(mimic_dir: Path, tmp_path: Path) -> None:
    jsonl = write_dataset(read_mimic_layout(mimic_dir), tmp_path / "jsonl")
    out = write_mimic_layout(read_dataset(jsonl), tmp_path / "again", prefix="WIKIMEL")
    rows = sorted(json.loads((out / "kb_entity.json").read_text()), key=lambda row: row["id"])
    for original in sorted(KB_ROWS, key=lambda row: row["id"]):
        written = rows[original["id"]]
        assert {key: written[key] for key in original if key != "qid"} == {k: v for k, v in original.items()
                                                                           if k != "qid"}
        assert all((out / "kb_image" / name).is_file() for name in written["image_list"])
    qid2id_text = (out / "qid2id.json").read_text()
    assert qid2id_text.count("\n") == 1 and json.loads(qid2id_text) == QID2ID
    for prefix_file, originals in (("WIKIMEL_train.json", TRAIN), ("WIKIMEL_dev.json", DEV)):
        written = json.loads((out / prefix_file).read_text())
        for original, record in zip(originals, written, strict=True):
            for key in ("mentions", "sentence", "answer", "entities"):
                assert record[key] == original[key]
            assert record["id"] == str(original.get("id", record["id"]))
            assert (record["imgPath"] == "") == (original["imgPath"] == "")
            if original["imgPath"]:
                assert official_image_name(record["imgPath"]) == official_image_name(original["imgPath"])
                assert (out / "mention_image" / official_image_name(record["imgPath"])).is_file()


def test_mmel_to_mimic_to_mmel_keeps_entities_and_mentions(tiny_dataset: Dataset, tmp_path: Path) -> None:
    out = write_mimic_layout(tiny_dataset, tmp_path / "mimic", prefix="RichpediaMEL")
    back = read_mimic_layout(out)
    assert back.name == "richpediamel"
    assert [(e.qid, e.name, e.attributes, e.description) for e in back.kb] == \
           [(e.qid, e.name, e.attributes, e.description) for e in tiny_dataset.kb]
    assert back.kb.get("Q1").images == ("kb_image/Q1_0.jpg",) and (out / "kb_image" / "Q1_0.jpg").is_file()
    for split, mentions in tiny_dataset.splits.items():
        for original, again in zip(mentions, back.split(split), strict=True):
            assert (again.id, again.sentence, again.surface, again.gold_qid) == \
                   (original.id, original.sentence, original.surface, original.gold_qid)
            assert again.extra == original.extra
            assert (again.image is None) == (original.image is None)
    assert back.split("train")[0].image == "mention_image/m1.jpg" and (out / "mention_image" / "m1.jpg").is_file()
    rows = json.loads((out / "kb_entity.json").read_text())
    assert all("desc" in row and row["type"] == "entity" for row in rows)  # one entity has a description
    assert rows[1]["entity_name"] == quote("Zoë 100% Beta/Gamma")


def test_mention_images_with_the_same_stem_get_distinct_files(tmp_path: Path, write_jpeg) -> None:
    root = tmp_path / "src"
    write_jpeg(root / "a" / "1.jpg", color=(255, 0, 0))
    write_jpeg(root / "b" / "1.jpg", color=(0, 0, 255))
    write_jpeg(root / "c" / "x.y.jpg")
    mentions = [Mention("m1", "s", "s", image="a/1.jpg"), Mention("m2", "s", "s", image="b/1.jpg"),
                Mention("m3", "s", "s", image="a/1.jpg"), Mention("m4", "s", "s", image="c/x.y.jpg")]
    out = write_mimic_layout(Dataset("d", KnowledgeBase([]), {"test": mentions}, root), tmp_path / "out")
    paths = [record["imgPath"] for record in json.loads((out / "WIKIMEL_test.json").read_text())]
    assert paths == ["1.jpg", "1_1.jpg", "1.jpg", "x_y.jpg"]
    assert [official_image_name(p) for p in paths] == paths
    assert (out / "mention_image" / "1.jpg").read_bytes() == (root / "a" / "1.jpg").read_bytes()
    assert (out / "mention_image" / "1_1.jpg").read_bytes() == (root / "b" / "1.jpg").read_bytes()


def test_richpedia_mention_images_folder_and_explicit_prefix(tmp_path: Path, write_json) -> None:
    root = tmp_path / "rich"
    write_json(root / "kb_entity.json", [{"id": 0, "qid": "Q1", "entity_name": "A", "attr": "", "image_list": []}])
    mention = {"mentions": "A", "sentence": "A", "imgPath": "x/Q1.jpg", "answer": "Q1"}
    write_json(root / "RichpediaMEL_test.json", [mention])
    write_json(root / "Other_test.json", [])
    (root / "mention_images").mkdir()
    with pytest.raises(DataError, match="several mention file prefixes found"):
        read_mimic_layout(root)
    dataset = read_mimic_layout(root, name="RichpediaMEL")
    assert dataset.split("test")[0].image == "mention_images/Q1.jpg"
    with pytest.raises(DataError, match="no mention files"):
        read_mimic_layout(root, name="WIKIMEL")


def test_qid2id_inconsistencies_are_reported(tmp_path: Path, write_json) -> None:
    root = tmp_path / "m"
    write_json(root / "kb_entity.json", [{"id": 0, "qid": "Q1", "entity_name": "A"}, {"id": 1, "entity_name": "B"},
                                   {"id": 3, "entity_name": "C"}])
    write_json(root / "qid2id.json", {"Q9": 0, "Q2": 1, "Q404": 7})
    report = MimicReadReport()
    dataset = read_mimic_layout(root, report=report)
    assert dataset.kb.qids == ["Q1", "Q2", "mimic-row-3"] and dataset.splits == {}
    assert report.qid_conflicts == 1 and report.qid2id_rows_not_in_kb == 1 and report.ids_not_dense
    assert report.qid_sources == {"qid field": 1, "qid2id.json": 1, "placeholder": 1}
    assert "rows whose qid disagrees" in report.summary()


@pytest.mark.parametrize(("rows", "message"), [
    ({"id": 0}, "expected a JSON list"),
    ([{"id": 0, "entity_name": "A"}, {"entity_name": "B"}], "#1: missing required key 'id'"),
    ([{"id": "0", "entity_name": "A"}], "'id' must be int"),
    ([{"id": 0, "entity_name": "A"}, {"id": 0, "entity_name": "B"}], "duplicate row id"),
    ([{"id": 0, "entity_name": "A", "image_list": "a.jpg"}], "'image_list' must be a list"),
    ([{"id": 0, "entity_name": "A", "attr": None}], "'attr' must be a string"),
])
def test_bad_kb_entity_rows(tmp_path: Path, write_json, rows: object, message: str) -> None:
    write_json(tmp_path / "kb_entity.json", rows)
    with pytest.raises(DataError) as error:
        read_mimic_layout(tmp_path)
    assert message in str(error.value) and "kb_entity.json" in str(error.value)


def test_kb_image_path_escaping_the_root(tmp_path: Path, write_json) -> None:
    write_json(tmp_path / "kb_entity.json", [{"id": 0, "entity_name": "A", "image_list": ["../../etc/passwd"]}])
    with pytest.raises(PathEscapeError, match=r"kb_entity\.json, record id 0"):
        read_mimic_layout(tmp_path)


@pytest.mark.parametrize(("record", "message"), [
    ({"sentence": "s", "answer": "Q1"}, "#0: missing required key 'mentions'"),
    ({"mentions": "m", "sentence": "s", "answer": 5}, "'answer' must be a string"),
    ({"mentions": "m", "sentence": "s", "answer": "Q1", "imgPath": None}, "'imgPath' must be a string"),
])
def test_bad_mention_records(tmp_path: Path, write_json, record: dict, message: str) -> None:
    write_json(tmp_path / "kb_entity.json", [])
    path = write_json(tmp_path / "WIKIMEL_test.json", [record])
    with pytest.raises(DataError) as error:
        read_mimic_layout(tmp_path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_malformed_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "kb_entity.json").write_text('[{"id": 0,', encoding="utf-8")
    with pytest.raises(DataError, match=r"kb_entity.json: malformed JSON at line 1"):
        load_dataset(tmp_path)


def test_writer_refuses_duplicate_qids_and_bad_prefixes(tmp_path: Path) -> None:
    kb = KnowledgeBase([Entity("Q1", "A"), Entity("Q1", "A again")])
    with pytest.raises(DataError, match="duplicate QIDs"):
        write_mimic_layout(Dataset("d", kb, {}, tmp_path), tmp_path / "out")
    with pytest.raises(DataError, match="prefix"):
        write_mimic_layout(Dataset("d", KnowledgeBase([]), {}, tmp_path), tmp_path / "out", prefix="a/b")


def test_extra_keys_may_not_shadow_layout_fields(tmp_path: Path) -> None:
    kb = KnowledgeBase([Entity("Q1", "A", extra={"attr": "sneaky"})])
    with pytest.raises(DataError, match="holds attr"):
        write_mimic_layout(Dataset("d", kb, {}, tmp_path), tmp_path / "out")


def test_mentions_sharing_their_sample_id_get_unique_ids(tmp_path: Path, write_json) -> None:
    write_json(tmp_path / "kb_entity.json", KB_ROWS)
    (tmp_path / "qid2id.json").write_text(json.dumps(QID2ID) + "\n", encoding="utf-8")
    sentence = "Zoë and Harrison on stage"
    write_json(tmp_path / "WIKIMEL_test.json", [
        {"id": "s9", "mentions": quote("Zoë"), "sentence": sentence, "imgPath": "", "answer": "Q30"},
        {"id": "s9", "mentions": "Harrison", "sentence": sentence, "imgPath": "", "answer": "Q10"}])
    report = MimicReadReport()
    dataset = read_mimic_layout(tmp_path, report=report)
    assert [(m.id, m.gold_qid) for m in dataset.split("test")] == [("s9", "Q30"), ("s9#2", "Q10")]
    assert report.renamed_mention_ids == 1
    assert "mentions repeating an earlier id (renamed '<id>#<n>'): 1" in report.summary()
