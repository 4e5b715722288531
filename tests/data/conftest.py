"""Small hand-made datasets and raw releases for the data-layer tests (never /work/shared)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmel.core.types import Dataset, Entity, KnowledgeBase, Mention


def save_jpeg(path: Path, size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG")
    return path


def dump(path: Path, value: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture
def write_jpeg():
    """`write_jpeg(path, size=..., color=...)`: a small real JPEG file."""
    return save_jpeg


@pytest.fixture
def write_json():
    """`write_json(path, value)`: a JSON file (parents created)."""
    return dump


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Dataset:
    """Three entities and three mentions covering images, NIL, unicode/quoting and a missing span."""
    root = tmp_path / "source"
    save_jpeg(root / "kb" / "alpha.jpg")
    save_jpeg(root / "pics" / "m1.jpg", color=(10, 200, 10))
    kb = KnowledgeBase([
        Entity("Q1", "Alpha (band, 1990)", attributes="Type: band.", images=("kb/alpha.jpg",)),
        Entity("Q2", "Zoë 100% Beta/Gamma", description="A person with an awkward name.", extra={"type": "entity"}),
        Entity("Q3", "Delta", attributes="Type: city."),
    ])
    splits = {
        "train": [
            Mention("t1", "Alpha played in Delta.", "Alpha", (0, 5), "pics/m1.jpg", "Q1", {"entities": "Alpha"}),
            Mention("t2", "Someone unknown spoke.", "Someone", (0, 7), None, None),
        ],
        "test": [Mention("s1", "A story about Beta.", "Zoë Beta", None, None, "Q2")],
    }
    return Dataset("tiny", kb, splits, root)


@pytest.fixture
def wikimel_raw(tmp_path: Path) -> Path:
    """A raw WikiMEL release in miniature: 4 samples, one unknown split id, one image, one orphan image."""
    raw = tmp_path / "raw"
    samples = {
        "10": {"id": "10", "sentence": "Powers with Noel Harrison in a film.", "mentions": ["Noel Harrison", "Powers"],
               "entities": ["Noel Harrison", "Stefanie Powers"], "answer": ["Q532915", "Q256474"]},
        "11": {"id": "11", "sentence": "Robertson as a Buck", "mentions": ["Robertson"],
               "entities": ["Oscar Robertson"], "answer": ["Q17717"]},
        "12": {"id": "12", "sentence": "fred at the stadium", "mentions": ["Fred"],
               "entities": ["Fred (footballer, born 1979)"], "answer": ["Q1000296"]},
        "13": {"id": "13", "sentence": "Earl of Aberdeen", "mentions": ["Earl Aberdeen"],
               "entities": ["Noel Harrison"], "answer": ["Q532915"]},
    }
    dump(raw / "wikimel" / "Wikidata-MEL.json", samples)
    dump(raw / "wikimel" / "splits.json", {"train": ["10", "11", "999"], "dev": ["12"], "test": ["13"]})
    names = {"Noel Harrison": "Q532915", "Stefanie Powers": "Q256474", "Oscar Robertson": "Q17717",
             "Fred (footballer, born 1979)": "Q1000296", "Unused Person": "Q5"}
    dump(raw / "wikimel" / "ne2qid.json", names)
    dump(raw / "wikimel" / "qid2abs.json", {qid: f"Sex: male. Name: {name}." for name, qid in names.items()})
    save_jpeg(raw / "images" / "wikimel" / "10.jpg")
    save_jpeg(raw / "images" / "wikimel" / "777.jpg")
    return raw


@pytest.fixture
def richpedia_raw(tmp_path: Path) -> Path:
    """A raw RichpediaMEL release in miniature: 10 samples, two entities sharing one name, one image."""
    raw = tmp_path / "raw"
    people = [(f"Q{100 + i}", f"Person {chr(65 + i)}") for i in range(8)] + [("Q7", "Adam Smith"), ("Q8", "Adam Smith")]
    records = {qid: {"id": qid, "sentence": f"{name.split()[-1]} wrote a book.", "mentions": name.split()[-1],
                     "entities": name, "answer": qid} for qid, name in people}
    test_ids = {"Q100", "Q8"}
    dump(raw / "richpediamel" / "train.json", {k: v for k, v in records.items() if k not in test_ids})
    dump(raw / "richpediamel" / "test.json", {k: v for k, v in records.items() if k in test_ids})
    dump(raw / "richpediamel" / "ne2qid.json", {name: qid for qid, name in people})  # Adam Smith -> Q8 only
    dump(raw / "richpediamel" / "qid2abs.json", {qid: "" if qid == "Q101" else f"Short {qid}." for qid, _ in people})
    dump(raw / "richpediamel" / "qid2abs_long.json", {qid: f"Long text about {name}." for qid, name in people})
    dump(raw / "richpediamel" / "img_list.json", [f"raw_data/imgs/{qid}.jpg" for qid, _ in reversed(people)])
    save_jpeg(raw / "images" / "richpediamel" / "Q7.jpg")
    return raw
