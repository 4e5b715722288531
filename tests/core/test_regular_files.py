"""Readers open regular files only: a FIFO named as an image or data file is a named problem, never a hang."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mmel.core.errors import DataError
from mmel.core.images import ImageReport, load_image, read_image_bytes
from mmel.core.paths import read_json, read_jsonl
from mmel.core.types import Dataset, Entity, KnowledgeBase, Mention
from mmel.data import validate_dataset
from mmel.retrieval.queries import MentionQuery, QueryError, prepare_query

TIMEOUT_S = 10


def finishes(call: Callable[[], Any]) -> Any:
    """Run `call` in a thread and fail (instead of blocking the suite) when it does not return in time."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed back to the test below
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive(), f"hung on a FIFO for {TIMEOUT_S} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@pytest.fixture
def fifo_root(tmp_path: Path) -> Path:
    os.mkfifo(tmp_path / "pipe.jpg")
    return tmp_path


def test_image_readers_count_a_fifo_as_not_a_regular_file(fifo_root: Path) -> None:
    report = ImageReport()
    assert finishes(lambda: read_image_bytes(fifo_root, "pipe.jpg", report)) is None
    assert finishes(lambda: load_image(fifo_root, "pipe.jpg", report)) is None
    assert report.problems == {"not a regular file": 2}
    assert report.examples["not a regular file"] == ["pipe.jpg", "pipe.jpg"]


def test_a_directory_is_not_an_image_either(tmp_path: Path) -> None:
    (tmp_path / "folder.jpg").mkdir()
    report = ImageReport()
    assert read_image_bytes(tmp_path, "folder.jpg", report) is None
    assert report.problems == {"not a regular file": 1}


@pytest.mark.parametrize("decode", [True, False])
def test_validate_reports_fifo_images_by_name(fifo_root: Path, decode: bool) -> None:
    dataset = Dataset("fifo", KnowledgeBase([Entity("Q1", "Alpha", images=("pipe.jpg",))]),
                      {"test": [Mention("m1", "Alpha", "Alpha", (0, 5), "pipe.jpg", "Q1")]}, fifo_root)
    report = finishes(lambda: validate_dataset(dataset, decode_images=decode))
    for images in (report.mention_images, report.entity_images):
        assert images.problems == {"not a regular file": 1}
        assert images.examples["not a regular file"] == ["pipe.jpg"]


def test_a_query_image_that_is_a_fifo_is_refused(fifo_root: Path) -> None:
    query = MentionQuery(sentence="Alpha plays.", mention="Alpha", image=fifo_root / "pipe.jpg")
    with pytest.raises(QueryError, match="not a regular file"):
        finishes(lambda: prepare_query(query, 0))


def test_json_readers_refuse_a_fifo_naming_it(tmp_path: Path) -> None:
    pipe = tmp_path / "mentions.jsonl"
    os.mkfifo(pipe)
    with pytest.raises(DataError, match=r"mentions\.jsonl.*not a regular file"):
        finishes(lambda: list(read_jsonl(pipe)))
    with pytest.raises(DataError, match="not a regular file"):
        finishes(lambda: read_json(pipe))


def test_a_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "m1"}).encode() + b"\r\n" + b'{"id": "m2"}\r\n')
    assert list(read_jsonl(path)) == [(1, {"id": "m1"}), (2, {"id": "m2"})]
    info = tmp_path / "dataset.json"
    info.write_bytes(b"\xef\xbb\xbf" + b'{"name": "x"}')
    assert read_json(info) == {"name": "x"}


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"id": "m1"}\n{"id": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl.*line 2") as caught:
        list(read_jsonl(path))
    assert "UTF-8" in str(caught.value)
    whole = tmp_path / "latin1.json"
    whole.write_bytes(b'{\n"id": "caf\xe9"}')
    with pytest.raises(DataError, match=r"latin1\.json.*line 2"):
        read_json(whole)
