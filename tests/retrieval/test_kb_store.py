"""EntityStore: SQLite entity metadata, CRUD in row order, checksum, guards, concurrent reads."""

from __future__ import annotations

import threading

import pytest

from mmel.core.errors import DataError
from mmel.core.types import Entity, KnowledgeBase
from mmel.retrieval.kb_store import EntityStore, kb_checksum


def make_entity(number: int, **changes) -> Entity:
    values = {"qid": f"Q{number}", "name": f"Entity {number}", "attributes": f"Sex: none. Number: {number}.",
              "description": f"Entity number {number}, ünïcode.", "images": (f"img/{number}.jpg",),
              "extra": {"source": "test"}}
    return Entity(**{**values, **changes})


@pytest.fixture
def kb() -> KnowledgeBase:
    return KnowledgeBase([make_entity(number) for number in range(5)])


@pytest.fixture
def store(tmp_path, kb):
    with EntityStore.create(tmp_path / "entities.sqlite", kb, progress=False) as opened:
        yield opened


def test_create_and_read_back(store, kb):
    assert len(store) == store.count() == 5
    assert store.get("Q3") == kb[3] and store.get("Q3").extra == {"source": "test"}
    assert store.get("Q99") is None
    assert store.get_many(["Q4", "Q99", "Q0", "Q4"]) == [kb[4], None, kb[0], kb[4]]
    assert list(store) == list(kb)
    assert store.qids() == kb.qids
    assert "Q2" in store and "Q99" not in store


def test_store_persists_across_reopen(store, kb):
    store.close()
    with EntityStore.open(store.path) as reopened:
        assert list(reopened) == list(kb)


def test_upsert_replaces_in_place_and_appends_new_rows(store):
    report = store.upsert([make_entity(2, name="Renamed"), make_entity(7), make_entity(6)])
    assert report.updated == ("Q2",) and report.added == ("Q7", "Q6")
    assert store.get("Q2").name == "Renamed"
    assert store.qids() == ["Q0", "Q1", "Q2", "Q3", "Q4", "Q7", "Q6"]


def test_delete_keeps_row_order_and_refuses_unknown_qids(store):
    assert store.delete(["Q1", "Q3"]) == 2
    assert store.qids() == ["Q0", "Q2", "Q4"]
    with pytest.raises(KeyError, match="1 of 2 QID"):
        store.delete(["Q0", "Q99"])
    assert store.qids() == ["Q0", "Q2", "Q4"]  # the transaction rolled back: Q0 is still there
    store.upsert([make_entity(9)])
    assert store.qids() == ["Q0", "Q2", "Q4", "Q9"]


def test_checksum_is_stable_and_tracks_content_and_order(store, kb):
    original = store.checksum()
    assert original == kb_checksum(kb) == kb_checksum(list(kb))
    assert kb_checksum([make_entity(n, extra={"line": n}) for n in range(5)]) == original  # extra is provenance
    assert kb_checksum(reversed(list(kb))) != original
    store.upsert([make_entity(1, description="changed")])
    changed = store.checksum()
    assert changed != original
    store.upsert([make_entity(1)])
    assert store.checksum() == original
    store.delete(["Q4"])
    assert store.checksum() not in (original, changed)


def test_iteration_pages_through_large_stores(tmp_path):
    entities = [make_entity(number) for number in range(4_500)]
    with EntityStore.create(tmp_path / "big.sqlite", iter(entities), progress=False) as big:
        assert big.count() == 4_500
        assert [entity.qid for entity in big] == [entity.qid for entity in entities]
        assert len(big.get_many([f"Q{n}" for n in range(0, 4_500, 3)])) == 1_500


def test_duplicate_qid_fails_the_build_and_leaves_no_file(tmp_path):
    path = tmp_path / "entities.sqlite"
    with pytest.raises(DataError, match=r"entity 2: duplicate QID 'Q0'"):
        EntityStore.create(path, [make_entity(0), make_entity(1), make_entity(0)], progress=False)
    assert list(tmp_path.iterdir()) == []


def test_create_refuses_to_overwrite_unless_asked(store, tmp_path):
    store.close()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        EntityStore.create(store.path, [make_entity(8)], progress=False)
    with EntityStore.create(store.path, [make_entity(8)], overwrite=True, progress=False) as replaced:
        assert replaced.qids() == ["Q8"]


def test_bad_records_and_files_raise_data_errors(store, tmp_path):
    with pytest.raises(DataError, match="record Q5: extra is not JSON-serialisable"):
        store.upsert([make_entity(5, extra={"when": object()})])
    with pytest.raises(DataError, match="duplicate QID 'Q5' in one upsert"):
        store.upsert([make_entity(5), make_entity(5)])
    assert store.count() == 5
    with pytest.raises(DataError, match="entity store not found"):
        EntityStore.open(tmp_path / "missing.sqlite")
    not_sqlite = tmp_path / "notes.sqlite"
    not_sqlite.write_text("plain text, not a database")
    with pytest.raises(DataError, match="not an mmel entity store"):
        EntityStore.open(not_sqlite)


def test_concurrent_reads_and_writes_from_threads(store, kb):
    failures: list[BaseException] = []

    def read_repeatedly() -> None:
        try:
            for _ in range(50):
                assert store.get_many(["Q0", "Q4"]) == [kb[0], kb[4]]
        except BaseException as error:  # collected and re-raised in the main thread
            failures.append(error)

    readers = [threading.Thread(target=read_repeatedly) for _ in range(4)]
    for reader in readers:
        reader.start()
    for number in range(100, 130):
        store.upsert([make_entity(number)])
    for reader in readers:
        reader.join()
    assert not failures
    assert store.count() == 35
