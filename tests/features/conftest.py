"""Fixtures for the feature store tests: a tiny random CLIP backbone and a small dataset with real image files."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from mmel.backbones.clip import CLIPBackbone, create_random_clip
from mmel.core.types import Dataset, Entity, KnowledgeBase, Mention


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> CLIPBackbone:
    return CLIPBackbone.load(create_random_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0))


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")


def make_dataset(root: Path, *, entities: int = 24, mentions: int = 16, name: str = "toy") -> Dataset:
    """Entities every 3rd with a picture (two share one file); mentions every 4th with a picture."""
    write_image(root / "kb" / "shared.jpg", (200, 40, 40))
    write_image(root / "kb" / "own.jpg", (40, 200, 40))
    write_image(root / "mention" / "m.jpg", (40, 40, 200))
    kb = KnowledgeBase(
        Entity(qid=f"Q{i}", name=f"Entity {i}", attributes=f"Sex: male. Birth: {1900 + i}.",
               description=f"Person number {i}" if i % 2 else "",
               images=(("kb/shared.jpg",) if i % 6 == 0 else ("kb/own.jpg",)) if i % 3 == 0 else ())
        for i in range(entities))
    items = [Mention(id=f"m{i}", sentence=f"A sentence that mentions entity {i}.", surface=f"entity {i}",
                     image="mention/m.jpg" if i % 4 == 0 else None, gold_qid=f"Q{i % entities}")
             for i in range(mentions)]
    half = mentions // 2
    return Dataset(name=name, kb=kb, splits={"train": items[:half], "test": items[half:]}, root=root)


@pytest.fixture
def dataset(tmp_path) -> Dataset:
    return make_dataset(tmp_path / "data")


@pytest.fixture
def image_writer():
    return write_image


@pytest.fixture
def dataset_factory():
    return make_dataset
