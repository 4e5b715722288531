"""The shipped example slice examples/wikimel-mini: readable, clean, small, attributed."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from mmel.data import load_dataset, validate_dataset

MINI = Path(__file__).resolve().parents[2] / "examples" / "wikimel-mini"


def test_example_slice_is_a_clean_real_dataset() -> None:
    dataset = load_dataset(MINI)
    assert dataset.name == "wikimel-mini"
    assert {split: len(mentions) for split, mentions in dataset.splits.items()} == {"train": 200, "dev": 40, "test": 60}
    assert 900 <= len(dataset.kb) <= 1100
    report = validate_dataset(dataset)
    assert report.errors() == []
    assert report.mention_images.failed == 0 and report.mention_images.loaded >= 30
    ids = [m.extra["sample_id"] for mentions in dataset.splits.values() for m in mentions]
    assert len(set(ids)) < len(ids)  # whole multi-mention samples are kept together


def test_example_slice_is_small_and_attributed() -> None:
    size = sum(path.stat().st_size for path in MINI.rglob("*") if path.is_file())
    assert size < 3_000_000
    for path in (MINI / "images").iterdir():
        with Image.open(path) as image:
            assert max(image.size) <= 384 and image.format == "JPEG"
    attribution = (MINI / "ATTRIBUTION.md").read_text()
    assert "MIT" in attribution and "BlueStragglers" in attribution and "Wikimedia" in attribution
