"""`mmel data prepare | validate | convert` through the real typer app."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from mmel.cli.main import app
from mmel.data import load_dataset

runner = CliRunner()


def test_prepare_validate_convert_round_trip(wikimel_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "wikimel"
    result = runner.invoke(app, ["data", "prepare", "wikimel", "--raw", str(wikimel_raw), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| train | 3 | 0 | 2 |" in result.output  # default images dir RAW/images/wikimel was used
    result = runner.invoke(app, ["data", "validate", str(out), "--json", str(tmp_path / "report.json")])
    assert result.exit_code == 0 and "# Dataset `wikimel`" in result.output
    assert json.loads((tmp_path / "report.json").read_text())["split_counts"] == {"train": 3, "dev": 1, "test": 1}
    result = runner.invoke(app, ["data", "convert", str(out), "--to", "mimic", "--out", str(tmp_path / "mimic")])
    assert result.exit_code == 0 and (tmp_path / "mimic" / "WIKIMEL_train.json").is_file()
    result = runner.invoke(app, ["data", "convert", str(tmp_path / "mimic"), "--to", "jsonl",
                                 "--out", str(tmp_path / "back")])
    assert result.exit_code == 0
    back, original = load_dataset(tmp_path / "back"), load_dataset(out)
    assert list(back.kb) == list(original.kb)
    assert [(m.id, m.surface, m.gold_qid) for m in back.split("train")] == \
           [(m.id, m.surface, m.gold_qid) for m in original.split("train")]


def test_prepare_richpediamel_with_options(richpedia_raw: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "prepare", "richpediamel", "--raw", str(richpedia_raw), "--out",
                                 str(tmp_path / "r"), "--dev-fraction", "0.25", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert {s: len(m) for s, m in load_dataset(tmp_path / "r").splits.items()} == {"train": 6, "dev": 2, "test": 2}


def test_data_errors_are_one_line_with_exit_code_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "kb.jsonl").write_text('{"qid": "Q1"}\n')
    result = runner.invoke(app, ["data", "validate", str(bad)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: {bad / 'kb.jsonl'}, record line 1: "
                                                  "missing required key(s) name"]
    assert "Traceback" not in result.output


def test_usage_errors_exit_with_code_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "prepare", "weibomel", "--raw", str(tmp_path), "--out", str(tmp_path)])
    assert result.exit_code == 2
    result = runner.invoke(app, ["data", "convert", str(tmp_path), "--to", "csv", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2


def test_strict_validation_fails_on_errors(tmp_path: Path) -> None:
    root = tmp_path / "d"
    (root / "mentions").mkdir(parents=True)
    (root / "kb.jsonl").write_text('{"qid": "Q1", "name": "A"}\n{"qid": "Q1", "name": "B"}\n')
    (root / "mentions" / "test.jsonl").write_text('{"id": "m", "sentence": "A", "surface": "A", "gold_qid": "Q9"}\n')
    assert runner.invoke(app, ["data", "validate", str(root)]).exit_code == 0
    result = runner.invoke(app, ["data", "validate", str(root), "--strict", "--no-decode-images"])
    assert result.exit_code == 1 and "1 QIDs on more than one KB row" in result.output


def test_synth_writes_a_loadable_dataset_with_images(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    result = runner.invoke(app, ["data", "synth", "--out", str(out), "--entities", "12", "--train", "6", "--dev",
                                 "2", "--test", "4", "--cue-mix", "1:0:0:0", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "12 entities, 6 train, 2 dev, 4 test mentions" in result.output
    dataset = load_dataset(out)
    assert len(dataset.kb) == 12 and all(m.extra["cue"] == "image" for m in dataset.split("test"))
    assert all((out / m.image).is_file() for m in dataset.split("test"))
    bad = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "bad"), "--cue-mix", "1:1"])
    assert bad.exit_code != 0 and "--cue-mix" in bad.output
