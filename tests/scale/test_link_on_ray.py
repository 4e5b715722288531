"""`mmel link --input --engine ray`: workers open the index and link chunks; the output equals the local engine's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from killing import KillingEngine
from mention_data import query_records, write_jsonl, write_parquet

from mmel.core.engine import LocalEngine, WorkerLostError
from mmel.retrieval.jobs import link_mention_files

pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray")]

CHUNK = 2   # mentions per chunk: several chunks per worker


def link(index_dir: Path, source: Path, output: Path, engine) -> object:
    return link_mention_files(index_dir, source, output, engine=engine, top_k=3, chunk_size=CHUNK, num_threads=1,
                              progress=False)


@pytest.fixture(scope="module")
def local_output(tiny_index, tmp_path_factory) -> tuple[Path, Path]:
    """The mentions file and what the local engine writes for it."""
    base = tmp_path_factory.mktemp("local-link")
    source = write_jsonl(base / "mentions.jsonl", query_records(tiny_index.queries))
    link(tiny_index.index_dir, source, base / "local.jsonl", LocalEngine())
    return source, base / "local.jsonl"


def test_ray_workers_write_the_same_results_as_the_local_engine(ray_engine, tiny_index, local_output,
                                                                tmp_path) -> None:
    source, expected = local_output
    report = link(tiny_index.index_dir, source, tmp_path / "ray.jsonl", ray_engine)
    assert (tmp_path / "ray.jsonl").read_bytes() == expected.read_bytes()
    assert (report.linked, report.failed, report.skipped) == (len(tiny_index.queries) + 1, 1, 0)
    lines = [json.loads(line) for line in expected.read_text().splitlines()]
    assert [line["id"] for line in lines][-2:] == ["q0#2", "blank"] and "error" in lines[-1]
    assert lines[0]["candidates"][0]["qid"] == tiny_index.queries[0][2]


def test_parquet_directory_on_ray_gives_the_same_lines(ray_engine, tiny_index, local_output, tmp_path) -> None:
    records = query_records(tiny_index.queries)
    write_parquet(tmp_path / "in" / "part-0.parquet", records)
    report = link(tiny_index.index_dir, tmp_path / "in", tmp_path / "out", ray_engine)
    assert (tmp_path / "out" / "part-0.jsonl").read_bytes() == local_output[1].read_bytes()
    assert report.files == 1


def test_a_killed_worker_loses_no_mention_and_links_none_twice(ray_engine, tiny_index, local_output,
                                                               tmp_path) -> None:
    source, expected = local_output
    output = tmp_path / "results.jsonl"
    killer = KillingEngine(ray_engine, lambda chunk: any(mention.id == "q5" for mention in chunk))
    with pytest.raises(WorkerLostError):
        link(tiny_index.index_dir, source, output, killer)
    written = output.read_text().splitlines() if output.exists() else []
    assert 0 < len(written) < len(expected.read_text().splitlines())
    report = link(tiny_index.index_dir, source, output, ray_engine)
    assert report.skipped == len(written)
    assert output.read_bytes() == expected.read_bytes()          # every mention once, in input order
