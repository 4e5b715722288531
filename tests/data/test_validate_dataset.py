"""`validate_dataset`: every count and error the report promises."""

from __future__ import annotations

import json
from pathlib import Path

from mmel.core.types import Dataset, Entity, KnowledgeBase, Mention
from mmel.data import validate_dataset


def flawed_dataset(root: Path, write_jpeg) -> Dataset:
    write_jpeg(root / "ok.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a JPEG")
    kb = KnowledgeBase([
        Entity("Q1", "Alpha", attributes="Type: band.", images=("ok.jpg", "gone.jpg")),
        Entity("Q2", "Beta"),  # no text at all
        Entity("Q2", "Beta twin", description="Duplicate row."),
        Entity("Q3", "Gamma", description="Only a description."),
    ])
    splits = {
        "train": [
            Mention("a", "Alpha rocks", "Alpha", (0, 5), "ok.jpg", "Q1"),
            Mention("a", "ALPHA again", "alpha", (0, 5), "broken.jpg", "Q1"),
            Mention("b", "Nobody here", "Somebody", None, "../outside.jpg", None),
        ],
        "test": [Mention("c", "Omega wins", "Omega", (0, 5), None, "Q404")],
    }
    return Dataset("flawed", kb, splits, root)


def test_report_counts_every_problem(tmp_path: Path, write_jpeg) -> None:
    report = validate_dataset(flawed_dataset(tmp_path, write_jpeg))
    assert report.entities == 4 and report.duplicate_qids == ["Q2"]
    assert report.entities_without_text == 1 and report.entities_with_images == 1
    assert report.split_counts == {"train": 3, "test": 1}
    assert report.nil_mentions == {"train": 1, "test": 0}
    assert report.surface_not_in_sentence == {"train": 1, "test": 0}
    assert report.gold_missing_from_kb == {"train": 0, "test": 1}
    assert report.duplicate_mention_ids == {"train": 1, "test": 0}
    assert report.mentions_with_image == {"train": 3, "test": 0}
    assert report.mention_images.loaded == 1
    assert report.mention_images.problems["escapes the data root"] == 1
    assert report.mention_images.problems["corrupt or truncated image"] + \
        report.mention_images.problems["not a usable image"] == 1
    assert report.entity_images.loaded == 1 and report.entity_images.problems == {"missing": 1}
    assert report.examples["gold QID not in KB"] == ["test/c: Q404"]
    assert report.examples["duplicate mention id"] == ["train/a x2"]
    assert report.errors() == ["1 mentions whose gold QID is not in the KB", "1 QIDs on more than one KB row",
                               "1 repeated mention ids within a split", "1 image paths that escape the data root"]


def test_report_renders_as_markdown_and_json(tmp_path: Path, write_jpeg) -> None:
    report = validate_dataset(flawed_dataset(tmp_path, write_jpeg))
    markdown = report.to_markdown()
    assert markdown.startswith("# Dataset `flawed`")
    assert "| train | 3 | 1 | 1 | 0 | 1 | 3 |" in markdown and "| test | 1 | 0 | 0 | 1 | 0 | 0 |" in markdown
    assert "- 1 QIDs on more than one KB row" in markdown and "gold QID not in KB: test/c: Q404" in markdown
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["entity_images"] == {"usable": 1, "problems": {"missing": 1}, "examples": {"missing": ["gone.jpg"]}}
    assert as_dict["errors"] == report.errors() and as_dict["duplicate_qids"] == ["Q2"]


def test_existence_only_mode_does_not_decode(tmp_path: Path, write_jpeg) -> None:
    report = validate_dataset(flawed_dataset(tmp_path, write_jpeg), decode_images=False)
    assert report.mention_images.loaded == 2  # the broken file exists
    assert not report.images_decoded and "checked for existence only" in report.to_markdown()


def test_clean_dataset_has_no_errors(tiny_dataset: Dataset) -> None:
    report = validate_dataset(tiny_dataset)
    assert report.errors() == [] and "- none" in report.to_markdown()
    assert report.nil_mentions == {"train": 1, "test": 0} and report.surface_not_in_sentence == {"train": 0, "test": 1}
    assert report.mention_images.loaded == 1 and report.entity_images.loaded == 1
