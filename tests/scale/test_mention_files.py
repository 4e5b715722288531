"""Mention files: Parquet rows read like JSONL records; a directory of files is linked file by file (local engine)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mention_data import query_records, write_jsonl, write_parquet

from mmel.core.errors import DataError, UsageError
from mmel.core.images import ImageReport
from mmel.core.types import Candidate, LinkResult
from mmel.data.mention_files import mention_files, read_mentions_file
from mmel.retrieval.jobs import link_jsonl

QUERIES = [("Paris is in France.", "Paris", "Q90"), ("Mercury sang.", "Mercury", "Q15869")]


def test_parquet_rows_are_the_same_mentions_as_jsonl_lines(tmp_path: Path) -> None:
    records = query_records(QUERIES)
    records[0] |= {"span": [0, 5], "image": "img/paris.png", "caption": "a city", "extra": {"source": "web"}}
    from_jsonl = read_mentions_file(write_jsonl(tmp_path / "m.jsonl", records))
    from_parquet = read_mentions_file(write_parquet(tmp_path / "m.parquet", records))
    assert from_parquet == from_jsonl
    assert [m.id for m in from_parquet] == ["q0", "q1", "q0#2", "blank"]
    assert from_parquet[0].span == (0, 5) and from_parquet[1].image is None and from_parquet[1].extra == {}


@pytest.mark.parametrize(("change", "message"), [
    ({"span": [0, 3]}, r"m\.parquet, record row 2: span \[0, 3\] does not hold the surface"),
    ({"image": "../../etc/passwd"}, r"m\.parquet, record row 2: .*escapes the data root"),
    ({"colour": "red"}, r"m\.parquet, record row 2: unknown key\(s\) colour"),
])
def test_a_bad_parquet_row_is_named_by_file_and_row(tmp_path: Path, change: dict, message: str) -> None:
    records = query_records(QUERIES)[:2]
    records[0] |= dict.fromkeys(change)    # null in row 1 (a null optional column is an absent key)
    records[1] |= change
    with pytest.raises(DataError, match=message):
        read_mentions_file(write_parquet(tmp_path / "m.parquet", records))


def test_a_column_of_the_wrong_type_is_named_at_its_first_row(tmp_path: Path) -> None:
    records = [record | {"id": number} for number, record in enumerate(query_records(QUERIES))]
    with pytest.raises(DataError, match=r"m\.parquet, record row 1: 'id' must be a string, got int 0"):
        read_mentions_file(write_parquet(tmp_path / "m.parquet", records))


def test_what_is_not_a_mention_file_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "m.parquet").write_text("id,sentence\n1,hello\n")
    with pytest.raises(DataError, match=r"m\.parquet: cannot read as Parquet"):
        read_mentions_file(tmp_path / "m.parquet")
    with pytest.raises(DataError, match="not a mentions file"):
        read_mentions_file(tmp_path / "m.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no mention files"):
        mention_files(tmp_path / "empty")


class OneCandidateLinker:
    """Answers every mention with its own id as the QID (the directory logic, not linking, is under test)."""

    def link_mentions(self, mentions, images_root, *, top_k, candidates_k, report: ImageReport) -> list[LinkResult]:
        return [LinkResult(mention, (Candidate(mention.id, mention.surface, 1.0, 1),)) for mention in mentions]


def test_colliding_output_names_in_a_directory_are_refused(tmp_path: Path) -> None:
    from mmel.retrieval.jobs import link_mention_files

    write_jsonl(tmp_path / "in" / "part.jsonl", query_records(QUERIES))
    write_parquet(tmp_path / "in" / "part.parquet", query_records(QUERIES))
    with pytest.raises(UsageError, match="part differ only in their suffix"):
        link_mention_files(tmp_path / "index-not-opened", tmp_path / "in", tmp_path / "out", progress=False)
    (tmp_path / "out-file").write_text("")
    (tmp_path / "in" / "part.parquet").unlink()
    with pytest.raises(UsageError, match="--output must be a directory too"):
        link_mention_files(tmp_path / "index-not-opened", tmp_path / "in", tmp_path / "out-file", progress=False)


def test_link_jsonl_reads_parquet_too(tmp_path: Path) -> None:
    source = write_parquet(tmp_path / "m.parquet", query_records(QUERIES))
    report = link_jsonl(OneCandidateLinker(), source, tmp_path / "out.jsonl", progress=False)
    assert report.linked == 4
    assert (tmp_path / "out.jsonl").read_text().count("\n") == 4
