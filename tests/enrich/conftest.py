"""Fixtures for the enrichment tests: a small dataset on disk with images, and a live chat server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from chat_server import ChatServer
from enrich_data import make_dataset


@pytest.fixture
def chat_server() -> Iterator[ChatServer]:
    server = ChatServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "src")
