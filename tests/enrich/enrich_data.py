"""Test data for the enrichment tests: a small dataset with images, and a digest of a directory tree."""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image

from mmel.core.types import Dataset, Entity, KnowledgeBase, Mention
from mmel.data import write_dataset

SECRET = "sk-test-SECRET-never-written-0123456789"


def make_dataset(path: Path, entities: int = 6) -> Path:
    """A dataset of `entities` entities ("Entity 00", ...), three mentions (two images, one of them missing)."""
    images = path.parent / f"{path.name}-images"
    (images / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), "red").save(images / "images" / "red.png")
    Image.new("RGB", (30, 40), "blue").save(images / "images" / "blue.png")
    Image.new("RGB", (40, 30), "green").save(images / "images" / "kb.png")
    kb = KnowledgeBase(Entity(f"Q{i}", f"Entity {i:02d}", attributes=f"Type: test. Number: {i}.",
                              images=("images/kb.png",) if i == 0 else ()) for i in range(entities))
    mentions = [Mention("m1", "Entity 00 in red.", "Entity 00", (0, 9), "images/red.png", "Q0"),
                Mention("m2", "Entity 01 in blue.", "Entity 01", (0, 9), "images/blue.png", "Q1"),
                Mention("m3", "Entity 02 again in red.", "Entity 02", (0, 9), "images/gone.png", "Q2"),
                Mention("m4", "Entity 01 without image.", "Entity 01", (0, 9), None, "Q1")]
    write_dataset(Dataset("tiny", kb, {"test": mentions}, root=images), path, source="hand-made test data")
    return path


def tree_digest(path: Path) -> dict[str, str]:
    """Content hash of every file under `path`: proof that a directory was not touched."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}
