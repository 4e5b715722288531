"""Index edits killed (SIGKILL) at each of their crash points are finished or undone by the next open (issue 13 #6).

For every kill point of `add_entities`, `remove_entities` and `compact`, a forked child runs the edit
on a copy of the conftest index and dies there; the parent then opens the copy and reruns the same
edit, as a user reruns the command. The result must equal an uninterrupted run's (entities, QIDs of
every part, change log, cache segments, files, ranked candidates), the rerun must report what the
uninterrupted run reported, and nothing may be left behind. The slow harness (bench/crash_runs.py)
does the same for every traced stage of the real CLI commands.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from crash_harness import index_snapshot, leftovers, run_killed_at, traced_stages

from mmel.core import paths
from mmel.core.errors import MismatchError
from mmel.core.types import Entity
from mmel.retrieval import kb_edits
from mmel.retrieval.edit_journal import JOURNAL_FILE
from mmel.retrieval.index_build import VECTORS_DIR
from mmel.retrieval.kb_edits import ChangeReport
from mmel.retrieval.linker import Linker

ADDED = [Entity("Q999", "Mercury Morris", "Sex: male. Occupation: American football running back."),
         Entity("Q90", "Paris (city)", "Capital and largest city of France, on the Seine.")]
REMOVED = ["Q47899", "Q830149"]
QUERIES = [("Mercury Morris ran for the Dolphins.", "Mercury Morris"), ("We flew to Paris to see the Eiffel Tower.",
                                                                        "Paris"),
           ("Paris posted a selfie from the hotel party.", "Paris"), ("Mercury sang Bohemian Rhapsody.", "Mercury")]


@dataclass(frozen=True)
class Edit:
    name: str
    base: str                                   # 'plain' (the conftest index) or 'added' (ADDED applied)
    run: Callable[[Linker, Path], object]       # the edit, as the CLI command makes it


EDITS = {
    "add": Edit("add", "plain", lambda linker, root: linker.add_entities(ADDED, root)),
    "remove": Edit("remove", "plain", lambda linker, root: linker.remove_entities(REMOVED)),
    "compact": Edit("compact", "added", lambda linker, root: linker.compact()),
}


# Every crash point each edit passes, in order ('<stage>#<n>': its n-th passage), and what a kill there
# must lead to: 'undone' before the edit's commit point, 'finished' after it.
KILL_POINTS = {
    "add": [
        ("atomic_directory.before_swap@edit-staged#1", "undone"),
        ("index_add.staged#1", "undone"),
        ("atomic_write.before_rename@edit-journal.json#1", "undone"),
        ("index_add.journaled#1", "undone"),
        ("atomic_write.before_rename@qids.json#1", "undone"),
        ("atomic_directory.before_swap@segment-000001#1", "undone"),
        ("atomic_write.before_rename@segments.json#1", "undone"),     # the listing is the commit point
        ("index_add.cache_written#1", "finished"),
        ("index_add.entities_stored#1", "finished"),
        ("atomic_write.before_rename@id_map.json#1", "finished"),
        ("atomic_write.before_rename@manifest.json#1", "finished"),
        ("atomic_directory.before_swap@vectors#1", "finished"),
        ("atomic_directory.after_swap@vectors#1", "finished"),
        ("index_add.vectors_saved#1", "finished"),
        ("atomic_write.before_rename@qids.json#2", "finished"),
        ("atomic_write.before_rename@manifest.json#2", "finished"),
        ("atomic_directory.before_swap@bm25#1", "finished"),
        ("atomic_directory.after_swap@bm25#1", "finished"),
        ("index_add.bm25_saved#1", "finished"),
        ("atomic_write.before_rename@manifest.json#3", "finished"),
        ("index_add.manifest_written#1", "finished"),
    ],
    "remove": [
        ("atomic_write.before_rename@edit-journal.json#1", "undone"),  # the journal is the commit point
        ("index_remove.journaled#1", "finished"),
        ("atomic_write.before_rename@id_map.json#1", "finished"),
        ("atomic_write.before_rename@manifest.json#1", "finished"),
        ("atomic_directory.before_swap@vectors#1", "finished"),
        ("atomic_directory.after_swap@vectors#1", "finished"),
        ("index_remove.vectors_saved#1", "finished"),
        ("index_remove.entities_deleted#1", "finished"),
        ("atomic_write.before_rename@qids.json#1", "finished"),
        ("atomic_write.before_rename@manifest.json#2", "finished"),
        ("atomic_directory.before_swap@bm25#1", "finished"),
        ("atomic_directory.after_swap@bm25#1", "finished"),
        ("index_remove.bm25_saved#1", "finished"),
        ("atomic_write.before_rename@manifest.json#3", "finished"),
        ("index_remove.manifest_written#1", "finished"),
    ],
    "compact": [
        ("atomic_write.before_rename@edit-journal.json#1", "undone"),
        ("index_compact.journaled#1", "undone"),
        ("atomic_write.before_rename@qids.json#1", "undone"),
        ("atomic_directory.before_swap@segment-000002#1", "undone"),
        ("atomic_write.before_rename@segments.json#1", "undone"),     # the listing is the commit point
        ("index_compact.compacted#1", "finished"),
    ],
}


@dataclass(frozen=True)
class Bases:
    plain: Path
    added: Path
    root: Path


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_index, linker_backbone) -> Bases:
    work = tmp_path_factory.mktemp("edit-bases")
    plain = tiny_index.copy_index(work / "plain")
    added = tiny_index.copy_index(work / "added")
    with Linker.load(added, backbone=linker_backbone) as linker:
        linker.add_entities(ADDED, tiny_index.root)
    return Bases(plain=plain, added=added, root=tiny_index.root)


def _copy_base(bases: Bases, edit: Edit, target: Path) -> Path:
    shutil.copytree(getattr(bases, edit.base), target)
    return target


def _rerun(directory: Path, edit: Edit, bases: Bases, backbone) -> object:
    with Linker.load(directory, backbone=backbone) as linker:
        return edit.run(linker, bases.root)


def _child_edit(directory: Path, edit: Edit, bases: Bases, backbone) -> Callable[[], object]:
    return lambda: _rerun(directory, edit, bases, backbone)




def _summary(report: object) -> object:
    """What a report says, apart from whether recovery finished it."""
    if isinstance(report, ChangeReport):
        return report.added, report.updated, report.removed, report.image_report.summary()
    return report


@pytest.fixture(scope="module")
def uninterrupted(bases, linker_backbone, tmp_path_factory) -> dict[str, tuple[object, dict]]:
    """Each edit run to the end once: its report and the index it leaves."""
    results = {}
    for name, edit in EDITS.items():
        directory = _copy_base(bases, edit, tmp_path_factory.mktemp(f"uninterrupted-{name}") / "index")
        report = _rerun(directory, edit, bases, linker_backbone)
        results[name] = (report, index_snapshot(directory, QUERIES, backbone=linker_backbone))
    return results


@pytest.mark.parametrize("name", list(EDITS))
def test_each_edit_passes_exactly_the_listed_kill_points(name, bases, linker_backbone, tmp_path):
    edit = EDITS[name]
    directory = _copy_base(bases, edit, tmp_path / "index")
    stages = traced_stages(_child_edit(directory, edit, bases, linker_backbone), tmp_path / "trace")
    assert stages == [stage for stage, _ in KILL_POINTS[name]]


@pytest.mark.parametrize(("name", "stage", "outcome"),
                         [(name, stage, outcome) for name, points in KILL_POINTS.items() for stage, outcome in points])
def test_edit_killed_at_a_stage_then_rerun_equals_an_uninterrupted_run(name, stage, outcome, bases, uninterrupted,
                                                                        linker_backbone, tmp_path):
    edit = EDITS[name]
    directory = _copy_base(bases, edit, tmp_path / "index")
    run_killed_at(stage, _child_edit(directory, edit, bases, linker_backbone))

    report = _rerun(directory, edit, bases, linker_backbone)

    expected_report, expected_index = uninterrupted[name]
    assert _summary(report) == _summary(expected_report)
    if isinstance(report, ChangeReport):
        assert report.recovered == (outcome == "finished")
    assert index_snapshot(directory, QUERIES, backbone=linker_backbone) == expected_index
    assert leftovers(directory) == []


def test_opening_after_a_kill_says_what_it_finished(bases, linker_backbone, tmp_path, caplog):
    edit = EDITS["add"]
    directory = _copy_base(bases, edit, tmp_path / "index")
    run_killed_at("index_add.vectors_saved#1", _child_edit(directory, edit, bases, linker_backbone))
    assert (directory / JOURNAL_FILE).is_file()
    with Linker.load(directory, backbone=linker_backbone) as linker:
        assert len(linker) == 9 and linker.entity("Q999") is not None
    assert "an interrupted add was finished" in caplog.text


def test_a_kill_during_recovery_is_recovered_the_same_way(bases, uninterrupted, linker_backbone, tmp_path):
    edit = EDITS["add"]
    directory = _copy_base(bases, edit, tmp_path / "index")
    run_killed_at("index_add.vectors_saved#1", _child_edit(directory, edit, bases, linker_backbone))
    run_killed_at("index_add.bm25_saved#1", lambda: Linker.load(directory, backbone=linker_backbone))  # recovering

    report = _rerun(directory, edit, bases, linker_backbone)

    expected_report, expected_index = uninterrupted["add"]
    assert _summary(report) == _summary(expected_report) and report.recovered
    assert index_snapshot(directory, QUERIES, backbone=linker_backbone) == expected_index
    assert leftovers(directory) == []


def test_an_edit_that_raised_blocks_edits_until_reopening_finishes_it(bases, uninterrupted, linker_backbone, tmp_path,
                                                                      monkeypatch):
    """An exception after the commit point (a full disk, say) leaves the journal; the same Linker must not
    write a second journal over it."""
    def disk_full(parts, revision):
        raise OSError(28, "No space left on device")

    edit = EDITS["add"]
    directory = _copy_base(bases, edit, tmp_path / "index")
    with Linker.load(directory, backbone=linker_backbone) as linker:
        monkeypatch.setattr(kb_edits, "_save_vectors", disk_full)
        with pytest.raises(OSError, match="No space left"):
            linker.add_entities(ADDED, bases.root)
        monkeypatch.undo()
        with pytest.raises(MismatchError, match="did not finish"):
            linker.remove_entities(["Q90"])

    report = _rerun(directory, edit, bases, linker_backbone)

    assert _summary(report) == _summary(uninterrupted["add"][0]) and report.recovered
    assert index_snapshot(directory, QUERIES, backbone=linker_backbone) == uninterrupted["add"][1]


def test_a_second_add_of_the_same_entities_after_recovery_is_an_update(bases, linker_backbone, tmp_path):
    """Recovery answers the one rerun of the killed command; running the add again later is a new edit."""
    edit = EDITS["add"]
    directory = _copy_base(bases, edit, tmp_path / "index")
    run_killed_at("index_add.cache_written#1", _child_edit(directory, edit, bases, linker_backbone))
    with Linker.load(directory, backbone=linker_backbone) as linker:
        first = linker.add_entities(ADDED, bases.root)
        second = linker.add_entities(ADDED, bases.root)
    assert (first.added, first.updated, first.recovered) == (1, 1, True)
    assert (second.added, second.updated, second.recovered) == (0, 2, False)


def test_kill_between_the_two_renames_of_a_fallback_swap_is_recovered(bases, uninterrupted, linker_backbone,
                                                                       tmp_path, monkeypatch):
    """Without RENAME_EXCHANGE the old vectors are moved aside first; a kill then leaves no vectors/ (issue 13 #6)."""
    monkeypatch.setattr(paths, "_exchange", lambda first, second: False)
    edit = EDITS["add"]
    directory = _copy_base(bases, edit, tmp_path / "index")
    run_killed_at("atomic_directory.old_moved_aside@vectors#1", _child_edit(directory, edit, bases, linker_backbone))
    assert not (directory / VECTORS_DIR).exists() and (directory / f".{VECTORS_DIR}.old").is_dir()

    report = _rerun(directory, edit, bases, linker_backbone)

    expected_report, expected_index = uninterrupted["add"]
    assert _summary(report) == _summary(expected_report) and report.recovered
    assert index_snapshot(directory, QUERIES, backbone=linker_backbone) == expected_index
    assert leftovers(directory) == []


# --- the atomic directory swap on its own ----------------------------------------------------------

def _write_version(path: Path, version: str) -> None:
    with paths.atomic_directory(path) as tmp:
        (tmp / "version.txt").write_text(version)


def test_swap_killed_before_the_old_copy_is_deleted_keeps_the_new_and_the_next_write_cleans(tmp_path):
    target = tmp_path / "part"
    _write_version(target, "1")
    run_killed_at("atomic_directory.after_swap@part#1", lambda: _write_version(target, "2"))
    assert (target / "version.txt").read_text() == "2"           # never missing, already the new version
    assert [p.name for p in tmp_path.iterdir() if p.name != "part"] != []   # the old copy, left by the kill
    _write_version(target, "3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part"] and (target / "version.txt").read_text() == "3"


def test_fallback_swap_killed_between_its_renames_is_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "_exchange", lambda first, second: False)
    target = tmp_path / "part"
    _write_version(target, "1")
    run_killed_at("atomic_directory.old_moved_aside@part#1", lambda: _write_version(target, "2"))
    assert not target.exists()
    assert paths.restore_interrupted_swap(target) and (target / "version.txt").read_text() == "1"
    _write_version(target, "2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part"] and (target / "version.txt").read_text() == "2"


def test_a_killed_first_write_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    target = tmp_path / "part"
    run_killed_at("atomic_directory.before_swap@part#1", lambda: _write_version(target, "1"))
    assert not target.exists() and len(list(tmp_path.iterdir())) == 1
    _write_version(target, "1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part"]
