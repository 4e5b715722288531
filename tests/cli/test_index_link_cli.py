"""`mmel index ...`, `mmel link` and `mmel serve` as a user runs them (typer's runner, in process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmel.cli.main import app
from mmel.data import write_dataset

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def invoke(*args: str):
    return runner.invoke(app, [str(arg) for arg in args])


@pytest.mark.slow
def test_build_info_add_link_remove(tiny_index, tmp_path):
    data = write_dataset(tiny_index.dataset, tmp_path / "data")
    index = tmp_path / "index"
    built = invoke("index", "build", "--dataset", data, "--model", tiny_index.checkpoint, "--out", index,
                   "--first-stage", "dense", "--quiet")
    assert built.exit_code == 0, built.output
    assert "8 entities (2 with an image)" in built.output
    info = json.loads(invoke("index", "info", index).output)
    assert info["entities"] == 8 and info["first_stage"] == "dense"

    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"qid": "Q999", "name": "Mercury Morris", "attributes": "American football player."})
                   + "\n")
    added = invoke("index", "add", index, "--kb", new)
    assert added.exit_code == 0 and "1 added" in added.output, added.output

    linked = invoke("link", index, "--sentence", "Mercury Morris ran for Miami.", "--mention", "Mercury Morris",
                    "--top-k", "9", "--json")
    assert linked.exit_code == 0, linked.output
    assert "Q999" in [c["qid"] for c in json.loads(linked.output[linked.output.index("{"):])["candidates"]]

    mentions = tmp_path / "mentions.jsonl"
    mentions.write_text(json.dumps({"id": "m1", "sentence": "Mercury sang with Queen.", "surface": "Mercury"}) + "\n")
    out = tmp_path / "results.jsonl"
    file_run = invoke("link", index, "--input", mentions, "--output", out, "--top-k", "2")
    assert file_run.exit_code == 0 and "1 linked" in file_run.output, file_run.output
    assert "0 linked, 1 already done" in invoke("link", index, "--input", mentions, "--output", out).output

    calibrated = invoke("index", "calibrate-nil", index, "--dataset", data, "--split", "train", "--nil-fraction",
                        "0.3", "--report", tmp_path / "nil.md")
    assert calibrated.exit_code == 0, calibrated.output
    assert "| operating point |" in calibrated.output and (tmp_path / "nil.md").is_file()
    assert json.loads(invoke("index", "info", index).output)["nil_threshold"] is not None

    removed = invoke("index", "remove", index, "Q999")
    assert removed.exit_code == 0 and "1 removed" in removed.output
    assert json.loads(invoke("index", "info", index).output)["revision"] == 2
    compacted = invoke("index", "compact", index)
    assert compacted.exit_code == 0 and "segments 2 -> 1" in compacted.output, compacted.output


def test_user_errors_are_one_line_messages(tiny_index, tmp_path):
    not_an_index = invoke("index", "info", tmp_path)
    assert not_an_index.exit_code == 1 and "not an mmel link index" in not_an_index.output
    unknown = invoke("index", "remove", tiny_index.index_dir, "Q-none")
    assert unknown.exit_code == 1 and "not in the index" in unknown.output
    bad_span = invoke("link", tiny_index.index_dir, "--sentence", "Paris", "--span", "a:b")
    assert bad_span.exit_code != 0 and "START:END" in bad_span.output
    no_mention = invoke("link", tiny_index.index_dir, "--sentence", "Paris is big", "--mention", "Rome")
    assert no_mention.exit_code == 1 and "does not occur" in no_mention.output
    no_output = invoke("link", tiny_index.index_dir, "--input", tmp_path / "m.jsonl")
    assert no_output.exit_code != 0 and "--output" in no_output.output
    bad_serve = invoke("serve", tiny_index.index_dir, "--token", "short")
    assert bad_serve.exit_code == 1 and "token" in bad_serve.output


@pytest.mark.slow
def test_readme_link_input_loads_the_example_images(tiny_index, tmp_path, monkeypatch):
    """README: `mmel link idx --input examples/wikimel-mini/mentions/test.jsonl --output results.jsonl`.

    The mentions' image paths are relative to the dataset directory, not to `mentions/`.
    """
    monkeypatch.chdir(REPO)
    mentions = "examples/wikimel-mini/mentions/test.jsonl"
    with_image = sum(json.loads(line)["image"] is not None for line in Path(mentions).read_text().splitlines())
    out = tmp_path / "results.jsonl"
    result = invoke("link", tiny_index.index_dir, "--input", mentions, "--output", out)
    assert result.exit_code == 0, result.output
    assert f"{with_image} images loaded, no problems" in result.output
    assert with_image > 0 and len(out.read_text().splitlines()) == 60
