"""`prepare_wikimel` / `prepare_richpediamel` on tiny hand-made raw releases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmel.core.errors import DataError
from mmel.data import PreparationReport, prepare_richpediamel, prepare_wikimel, read_dataset
from mmel.data.jsonl_format import read_dataset_info
from mmel.data.raw_release import default_images_dir


def test_prepare_wikimel_explodes_samples_and_counts_what_it_skips(wikimel_raw: Path, tmp_path: Path) -> None:
    report = PreparationReport("wikimel")
    dataset = prepare_wikimel(wikimel_raw, tmp_path / "out", default_images_dir(wikimel_raw, "wikimel"), report=report)
    assert dataset.root == tmp_path / "out" and dataset.name == "wikimel"
    assert len(dataset.kb) == 5 and dataset.kb.get("Q1000296").name == "Fred (footballer, born 1979)"
    assert dataset.kb.get("Q17717").attributes == "Sex: male. Name: Oscar Robertson."
    assert {split: [m.id for m in mentions] for split, mentions in dataset.splits.items()} == \
           {"train": ["10-0", "10-1", "11-0"], "dev": ["12-0"], "test": ["13-0"]}
    first, second, _ = dataset.split("train")
    assert (first.surface, first.span, first.gold_qid) == ("Noel Harrison", (12, 25), "Q532915")
    assert second.extra == {"sample_id": "10", "entities": "Stefanie Powers"}
    assert first.image == second.image == "images/10.jpg" and (dataset.root / "images" / "10.jpg").is_file()
    assert dataset.split("dev")[0].span == (0, 4)  # "fred" matched case-insensitively
    assert dataset.split("test")[0].span is None
    assert report.mentions == {"train": 3, "dev": 1, "test": 1}
    assert report.mentions_with_image == {"train": 2, "dev": 0, "test": 0}
    assert report.spans_not_located["test"] == 1
    assert report.skipped == {"splits.json ids not in Wikidata-MEL.json (ignored)": 1,
                              "image files of no prepared mention (sample not in the release or not in a split)": 1}
    assert "MELBench" in read_dataset_info(dataset.root).source
    written = json.loads((dataset.root / "preparation.json").read_text())
    assert written["mentions"] == report.mentions and written["skipped"] == dict(report.skipped)
    assert "| train | 3 | 0 | 2 |" in (dataset.root / "PREPARATION.md").read_text()
    assert read_dataset(dataset.root).splits == dataset.splits


def test_prepare_wikimel_without_images_accepts_the_release_folder_itself(wikimel_raw: Path, tmp_path: Path) -> None:
    dataset = prepare_wikimel(wikimel_raw / "wikimel", tmp_path / "out")
    assert all(m.image is None for mentions in dataset.splits.values() for m in mentions)
    assert not (tmp_path / "out" / "images").exists()


def test_wikimel_sample_with_unequal_lists_is_an_error(wikimel_raw: Path, write_json, tmp_path: Path) -> None:
    path = wikimel_raw / "wikimel" / "Wikidata-MEL.json"
    samples = json.loads(path.read_text())
    samples["11"]["answer"].append("Q1")
    write_json(path, samples)
    with pytest.raises(DataError, match=r"Wikidata-MEL\.json, record 11: 'mentions', 'entities' and 'answer'"):
        prepare_wikimel(wikimel_raw, tmp_path / "out")


def test_wikimel_sample_in_two_splits_is_an_error(wikimel_raw: Path, write_json, tmp_path: Path) -> None:
    write_json(wikimel_raw / "wikimel" / "splits.json", {"train": ["10", "11"], "dev": ["12", "10"], "test": ["13"]})
    with pytest.raises(DataError, match="sample 10 is in both 'train' and 'dev'"):
        prepare_wikimel(wikimel_raw, tmp_path / "out")


def test_wikimel_missing_files_are_named(wikimel_raw: Path, tmp_path: Path) -> None:
    (wikimel_raw / "wikimel" / "qid2abs.json").unlink()
    with pytest.raises(DataError, match=r"qid2abs\.json: file not found"):
        prepare_wikimel(wikimel_raw, tmp_path / "out")
    with pytest.raises(DataError, match="is this the raw wikimel release"):
        prepare_wikimel(tmp_path / "elsewhere", tmp_path / "out")
    with pytest.raises(DataError, match="images directory not found"):
        prepare_wikimel(wikimel_raw, tmp_path / "out", tmp_path / "no-images")


def test_prepare_richpediamel_builds_kb_names_dev_split_and_images(richpedia_raw: Path, tmp_path: Path) -> None:
    report = PreparationReport("richpediamel")
    dataset = prepare_richpediamel(richpedia_raw, tmp_path / "out", default_images_dir(richpedia_raw, "richpediamel"),
                                   dev_fraction=0.25, seed=3, report=report)
    assert len(dataset.kb) == 10
    assert dataset.kb.get("Q7").name == dataset.kb.get("Q8").name == "Adam Smith"  # Q7 named from its record
    assert dataset.kb.get("Q101").attributes == "" and dataset.kb.get("Q101").description == "Long text about Person B."
    assert {split: len(mentions) for split, mentions in dataset.splits.items()} == {"train": 6, "dev": 2, "test": 2}
    train_ids = [m.id for m in dataset.split("train") + dataset.split("dev")]
    assert sorted(train_ids) == sorted(["Q101", "Q102", "Q103", "Q104", "Q105", "Q106", "Q107", "Q7"])
    assert [m.id for m in dataset.split("test")] == ["Q100", "Q8"]
    mention = next(m for mentions in dataset.splits.values() for m in mentions if m.id == "Q7")
    assert mention.image == "images/Q7.jpg" and (dataset.root / mention.image).is_file()
    assert (mention.surface, mention.span, mention.gold_qid, mention.extra) == ("Smith", (0, 5), "Q7",
                                                                               {"entities": "Adam Smith"})
    assert report.settings == {"dev_fraction": 0.25, "seed": 3}
    assert any("1 entity names are missing from ne2qid.json" in note for note in report.notes)
    assert report.skipped == {}


def test_richpediamel_dev_split_is_reproducible(richpedia_raw: Path, tmp_path: Path) -> None:
    first = prepare_richpediamel(richpedia_raw, tmp_path / "a", seed=11)
    second = prepare_richpediamel(richpedia_raw, tmp_path / "b", seed=11)
    assert [m.id for m in first.split("dev")] == [m.id for m in second.split("dev")]
    assert len(first.split("dev")) == 1  # floor(0.125 * 8)
    with pytest.raises(ValueError, match="dev_fraction must be in"):
        prepare_richpediamel(richpedia_raw, tmp_path / "c", dev_fraction=1.0)


def test_richpediamel_cross_checks_and_counts_unmatched_images(richpedia_raw: Path, write_json,
                                                                tmp_path: Path) -> None:
    folder = richpedia_raw / "richpediamel"
    train = json.loads((folder / "train.json").read_text())
    full = {**train, "Q999": {**train["Q7"], "id": "Q999", "answer": "Q999"}}
    full["Q7"] = {**train["Q7"], "sentence": "Smith (1723-1790) wrote a book."}
    write_json(folder / "Richpedia-MEL.json", full)
    write_json(folder / "img_list.json", [*json.loads((folder / "img_list.json").read_text()), "raw_data/imgs/Q5.jpg"])
    report = PreparationReport("richpediamel")
    prepare_richpediamel(richpedia_raw, tmp_path / "out", report=report)
    assert report.skipped == {"Richpedia-MEL.json samples in neither train.json nor test.json": 1,
                              "img_list.json entries whose file stem is no sample id": 1}
    assert any(note.startswith("1 sentences in train.json/test.json differ") for note in report.notes)


def test_richpediamel_overlapping_train_and_test_is_an_error(richpedia_raw: Path, write_json, tmp_path: Path) -> None:
    folder = richpedia_raw / "richpediamel"
    train = json.loads((folder / "train.json").read_text())
    write_json(folder / "test.json", {**json.loads((folder / "test.json").read_text()), "Q7": train["Q7"]})
    with pytest.raises(DataError, match=r"in both train\.json and test\.json"):
        prepare_richpediamel(richpedia_raw, tmp_path / "out")


def test_richpediamel_record_with_wrong_type(richpedia_raw: Path, write_json, tmp_path: Path) -> None:
    folder = richpedia_raw / "richpediamel"
    test = json.loads((folder / "test.json").read_text())
    test["Q8"]["answer"] = ["Q8"]
    write_json(folder / "test.json", test)
    with pytest.raises(DataError, match=r"test\.json, record Q8: 'answer' must be a str"):
        prepare_richpediamel(richpedia_raw, tmp_path / "out")
