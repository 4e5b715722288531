import json
import math

import numpy as np
import pytest

from mmel.core.errors import DataError
from mmel.evaluation.protocols import NIL_ROW, rank_candidates, rank_full_kb
from mmel.evaluation.report import (
    EvalReport,
    build_report,
    read_report,
    render_comparison_table,
    write_report,
)


def small_report(**changes) -> EvalReport:
    scores = np.array([[3.0, 1.0, 2.0], [0.0, 5.0, 5.0], [1.0, 1.0, 1.0]])
    result = rank_full_kb(lambda rows, a, b: scores[rows, a:b], np.array([0, 1, NIL_ROW]), 3, progress=False)
    values = {"protocol": "full-kb", "kb_size": 3, "dataset": "toy", "split": "test", "model": "bm25-name",
              "backbone": "none", "wall_time_s": 0.25, "extra": {"query_mode": "surface"}}
    return build_report(result, **{**values, **changes})


def test_build_report_carries_counts_and_metrics():
    report = small_report()
    assert report.mention_count == 2
    assert report.excluded_nil == 1
    assert report.excluded_missing_gold == 0
    assert report.tie_policy == "against-gold"
    assert report.metrics["hits@1"] == 0.5  # mention 1 ties with entity 2 -> rank 2
    assert report.metrics["mr"] == 1.5
    assert report.mmel_version


def test_json_round_trip(tmp_path):
    report = small_report()
    json_path, markdown_path = write_report(report, tmp_path)
    assert json_path.name == "toy-test-bm25-name-full-kb.json"
    payload = json.loads(json_path.read_text())
    assert payload["format_version"] == 1
    assert payload["excluded_nil"] == 1 and payload["kb_size"] == 3 and payload["protocol"] == "full-kb"
    assert read_report(json_path) == report
    assert markdown_path.read_text() == report.to_markdown()


def test_a_report_name_with_a_dot_keeps_its_whole_name(tmp_path):
    json_path, markdown_path = write_report(small_report(model="mimic+name-prior-8.28+hybrid@100"), tmp_path)
    assert json_path.name == "toy-test-mimic+name-prior-8.28+hybrid_100-full-kb.json"
    assert markdown_path.name == "toy-test-mimic+name-prior-8.28+hybrid_100-full-kb.md"


def test_markdown_has_every_provenance_field():
    markdown = small_report(dataset="wiki|mel").to_markdown()
    header, rule, row = markdown.strip().splitlines()
    for column in ("Dataset", "Split", "Protocol", "KB size", "Mentions", "Excluded NIL / missing gold", "Model",
                   "Backbone", "Ties", "H@1", "H@20", "MRR", "MR", "Time (s)"):
        assert column in header
    assert header.count("|") == rule.count("|") == row.count("|") - 1  # the escaped pipe in the name
    assert "wiki\\|mel" in row
    for cell in ("test", "full-kb", "1 / 0", "bm25-name", "none", "against-gold", "50.00", "75.00", "1.50"):
        assert f" {cell} " in row


def test_comparison_table_and_explicit_path(tmp_path):
    reports = [small_report(), small_report(model="mimic", tie_policy="expected")]
    table = render_comparison_table(reports)
    assert len(table.strip().splitlines()) == 4
    assert "expected" in table
    json_path, markdown_path = write_report(reports[1], tmp_path / "runs" / "mimic.json")
    assert json_path == tmp_path / "runs" / "mimic.json" and markdown_path.suffix == ".md"


def test_empty_split_writes_null_metrics_and_reads_back_nan(tmp_path):
    result = rank_candidates(lambda m, e: np.zeros(len(m)), [np.array([0])], np.array([NIL_ROW]), progress=False)
    report = build_report(result, protocol="candidates-1", kb_size=1, dataset="toy", split="dev", model="m",
                          backbone="b", wall_time_s=0.0)
    json_path, _ = write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["metrics"]["hits@1"] is None
    assert math.isnan(read_report(json_path).metrics["mrr"])
    assert " - " in report.to_markdown()


def test_reading_a_foreign_json_names_the_file(tmp_path):
    path = tmp_path / "other.json"
    path.write_text('{"format_version": 1, "accuracy": 1.0}')
    with pytest.raises(DataError, match=r"other\.json"):
        read_report(path)
