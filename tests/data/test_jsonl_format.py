"""mmel JSONL format: round trips, partial datasets and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmel.core.errors import DataError, PathEscapeError
from mmel.core.types import Dataset, Entity, KnowledgeBase, Mention
from mmel.data import load_dataset, read_dataset, read_kb_jsonl, read_mentions_jsonl, write_dataset
from mmel.data.jsonl_format import read_dataset_info

GOOD_MENTION = {"id": "m1", "sentence": "I met Alpha today.", "surface": "Alpha", "span": [6, 11],
                "image": None, "gold_qid": "Q1", "extra": {}}


def write_lines(path: Path, records: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_write_then_read_gives_back_the_same_dataset(tiny_dataset: Dataset, tmp_path: Path) -> None:
    out = write_dataset(tiny_dataset, tmp_path / "out", source="unit test")
    back = read_dataset(out)
    assert back.name == "tiny" and back.root == out
    assert list(back.kb) == list(tiny_dataset.kb)
    assert [e.extra for e in back.kb] == [e.extra for e in tiny_dataset.kb]
    assert back.splits == tiny_dataset.splits
    assert back.split("train")[0].extra == {"entities": "Alpha"}
    assert (out / "kb" / "alpha.jpg").is_file() and (out / "pics" / "m1.jpg").is_file()
    assert read_dataset_info(out).source == "unit test"
    assert load_dataset(str(out)).splits == tiny_dataset.splits


def test_image_subdir_moves_every_image_under_it(tiny_dataset: Dataset, tmp_path: Path) -> None:
    back = read_dataset(write_dataset(tiny_dataset, tmp_path / "out", image_subdir="images"))
    assert back.kb.get("Q1").images == ("images/kb/alpha.jpg",)
    assert back.split("train")[0].image == "images/pics/m1.jpg"
    assert (tmp_path / "out" / "images" / "pics" / "m1.jpg").is_file()


def test_missing_image_files_keep_their_reference(tmp_path: Path) -> None:
    kb = KnowledgeBase([Entity("Q1", "Alpha", images=("gone.jpg",))])
    back = read_dataset(write_dataset(Dataset("d", kb, {}, tmp_path / "nowhere"), tmp_path / "out"))
    assert back.kb[0].images == ("gone.jpg",)
    assert not (tmp_path / "out" / "gone.jpg").exists()


def test_extra_files_are_written_beside_the_data(tiny_dataset: Dataset, tmp_path: Path) -> None:
    out = write_dataset(tiny_dataset, tmp_path / "out", extra_files={"NOTES.md": "hello\n"})
    assert (out / "NOTES.md").read_text() == "hello\n"
    with pytest.raises(PathEscapeError):
        write_dataset(tiny_dataset, tmp_path / "out2", extra_files={"../evil.md": "x"})


def test_a_lone_kb_file_is_a_dataset_without_splits(tmp_path: Path) -> None:
    kb_file = write_lines(tmp_path / "my-kb" / "kb.jsonl", [{"qid": "Q1", "name": "Alpha"},
                                                            {"qid": "Q2", "name": "Beta", "images": ["img/b.png"]}])
    dataset = load_dataset(kb_file)
    assert dataset.splits == {} and dataset.kb.qids == ["Q1", "Q2"]
    assert dataset.kb[0] == Entity("Q1", "Alpha") and dataset.root == kb_file.parent
    assert read_kb_jsonl(kb_file)[1].images == ("img/b.png",)


def test_a_directory_without_dataset_json_reads_every_mentions_file(tmp_path: Path) -> None:
    write_lines(tmp_path / "d" / "kb.jsonl", [{"qid": "Q1", "name": "Alpha"}])
    write_lines(tmp_path / "d" / "mentions" / "queries.jsonl", [GOOD_MENTION])
    dataset = load_dataset(tmp_path / "d")
    assert list(dataset.splits) == ["queries"] and dataset.split("queries")[0].span == (6, 11)


def test_mentions_file_alone_with_defaults(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "m.jsonl", [{"id": "a", "sentence": "Hello Alpha", "surface": "alpha"}])
    [mention] = read_mentions_jsonl(path)
    assert mention == Mention("a", "Hello Alpha", "alpha") and mention.is_nil and mention.extra == {}


@pytest.mark.parametrize(("change", "message"), [
    ({"id": None}, "'id' must be a string"),
    ({"sentence": 3}, "'sentence' must be a string"),
    ({"extra": []}, "'extra' must be an object"),
    ({"gold": "Q1"}, "unknown key(s) gold"),
    ({"span": [6]}, "'span' must be [start, end]"),
    ({"span": [6.0, 11]}, "'span' must be [start, end]"),
    ({"span": [6, 40]}, "does not hold the surface"),
    ({"span": [0, 5]}, "does not hold the surface"),
    ({"span": [-1, 4]}, "does not hold the surface"),
    ({"image": "../outside.jpg"}, "escapes the data root"),
    ({"image": "/etc/passwd"}, "must be a non-empty path relative"),
    ({"image": ""}, "must be a non-empty path relative"),
])
def test_bad_mention_records_name_file_and_line(tmp_path: Path, change: dict, message: str) -> None:
    path = write_lines(tmp_path / "mentions.jsonl", [GOOD_MENTION, {**GOOD_MENTION, **change}])
    with pytest.raises(DataError) as error:
        read_mentions_jsonl(path)
    assert message in str(error.value)
    assert str(path) in str(error.value) and "line 2" in str(error.value)


def test_missing_required_mention_key(tmp_path: Path) -> None:
    record = {key: value for key, value in GOOD_MENTION.items() if key != "surface"}
    path = write_lines(tmp_path / "m.jsonl", [record])
    with pytest.raises(DataError, match=r"line 1: missing required key\(s\) surface"):
        read_mentions_jsonl(path)


def test_span_may_differ_in_case_only(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "m.jsonl", [{**GOOD_MENTION, "surface": "ALPHA"}])
    assert read_mentions_jsonl(path)[0].span == (6, 11)


def test_malformed_json_line(tmp_path: Path) -> None:
    path = tmp_path / "kb.jsonl"
    path.write_text('{"qid": "Q1", "name": "A"}\n{"qid": "Q2", \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"kb.jsonl, record line 2: malformed JSON"):
        read_kb_jsonl(path)


@pytest.mark.parametrize(("record", "message"), [
    ({"name": "A"}, "missing required key(s) qid"),
    ({"qid": "", "name": "A"}, "'qid' must not be empty"),
    ({"qid": "Q1", "name": ["A"]}, "'name' must be a string"),
    ({"qid": "Q1", "name": "A", "images": "a.jpg"}, "'images' must be a list"),
    ({"qid": "Q1", "name": "A", "images": [3]}, "'images' must be a list of strings"),
    ({"qid": "Q1", "name": "A", "images": ["x/../../up.jpg"]}, "escapes the data root"),
    ({"qid": "Q1", "name": "A", "desc": "M3EL key"}, "unknown key(s) desc"),
    (["Q1", "A"], "expected a JSON object"),
])
def test_bad_kb_records(tmp_path: Path, record: object, message: str) -> None:
    path = write_lines(tmp_path / "kb.jsonl", [record])
    with pytest.raises(DataError) as error:
        read_kb_jsonl(path)
    assert message in str(error.value) and "line 1" in str(error.value)


def test_symlink_leaving_the_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").mkdir()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "link").symlink_to(tmp_path / "secret")
    path = write_lines(tmp_path / "d" / "m.jsonl", [{**GOOD_MENTION, "image": "link/x.jpg"}])
    with pytest.raises(PathEscapeError):
        read_mentions_jsonl(path)


def _dataset_dir(tmp_path: Path, info: dict, splits: dict[str, list]) -> Path:
    root = tmp_path / "d"
    write_lines(root / "kb.jsonl", [{"qid": "Q1", "name": "Alpha"}])
    for split, records in splits.items():
        write_lines(root / "mentions" / f"{split}.jsonl", records)
    (root / "dataset.json").write_text(json.dumps(info), encoding="utf-8")
    return root


@pytest.mark.parametrize(("info", "files", "message"), [
    ({"name": "d", "format_version": 2, "splits": []}, {}, "format_version 2 is not supported"),
    ({"name": "d", "splits": []}, {}, "missing required key(s) format_version"),
    ({"name": "d", "format_version": 1, "splits": ["test"]}, {}, "test.jsonl: file not found"),
    ({"name": "d", "format_version": 1, "splits": []}, {"extra": [GOOD_MENTION]}, "extra.jsonl are not listed"),
    ({"name": "d", "format_version": 1, "splits": ["a", "a"]}, {"a": []}, "lists a split twice"),
    ({"name": "d", "format_version": 1, "splits": ["../a"]}, {}, "must be a plain file name"),
    ({"name": "d", "format_version": "1", "splits": []}, {}, "'format_version' must be an integer"),
])
def test_bad_dataset_json(tmp_path: Path, info: dict, files: dict, message: str) -> None:
    root = _dataset_dir(tmp_path, info, files)
    with pytest.raises(DataError) as error:
        read_dataset(root)
    assert message in str(error.value)


def test_writer_refuses_to_replace_a_directory_that_is_not_a_dataset(tiny_dataset: Dataset, tmp_path: Path) -> None:
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(DataError, match="refusing to replace"):
        write_dataset(tiny_dataset, precious)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_writer_replaces_an_earlier_dataset(tiny_dataset: Dataset, tmp_path: Path) -> None:
    out = write_dataset(tiny_dataset, tmp_path / "out")
    smaller = Dataset("tiny", tiny_dataset.kb, {"test": tiny_dataset.split("test")}, tiny_dataset.root)
    write_dataset(smaller, out)
    assert list(read_dataset(out).splits) == ["test"]
    assert not (out / "mentions" / "train.jsonl").exists()


def test_extra_that_json_cannot_hold_fails_at_write_time(tmp_path: Path) -> None:
    kb = KnowledgeBase([Entity("Q1", "Alpha", extra={"when": object()})])
    with pytest.raises(DataError, match="entity 'Q1' is not JSON-serialisable"):
        write_dataset(Dataset("d", kb, {}, tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_load_dataset_explains_what_it_expects(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"expected dataset.json .* or kb_entity.json"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"kb\.jsonl knowledge base"):
        load_dataset(tmp_path / "notes.txt")


def test_rewriting_a_dataset_in_place_keeps_its_images(tiny_dataset: Dataset, tmp_path: Path) -> None:
    out = write_dataset(tiny_dataset, tmp_path / "out")
    write_dataset(read_dataset(out), out, source="rewritten")
    again = read_dataset(out)
    assert again.splits == tiny_dataset.splits and read_dataset_info(out).source == "rewritten"
    assert (out / "pics" / "m1.jpg").is_file() and (out / "kb" / "alpha.jpg").is_file()


def test_repeated_mention_ids_are_made_unique_and_counted(tmp_path: Path, caplog) -> None:
    sentence = "Alpha met Beta and Gamma."
    records = [{"id": "s1", "sentence": sentence, "surface": surface} for surface in ("Alpha", "Beta", "Gamma")]
    records.append({"id": "s1#2", "sentence": sentence, "surface": "met"})  # the renaming must not collide
    path = write_lines(tmp_path / "m.jsonl", records)
    with caplog.at_level("WARNING"):
        mentions = read_mentions_jsonl(path)
    assert [m.id for m in mentions] == ["s1", "s1#3", "s1#4", "s1#2"]
    assert [m.surface for m in mentions] == ["Alpha", "Beta", "Gamma", "met"]
    assert "2 mention(s) repeat an earlier mention's id" in caplog.text and "m.jsonl" in caplog.text
    assert [m.id for m in read_mentions_jsonl(path)] == [m.id for m in mentions]  # stable across reads
