"""`mmel features build` and `mmel features info` on a small dataset written in mmel's JSONL format."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from mmel.backbones.clip import create_random_clip
from mmel.cli.main import app
from mmel.data import write_dataset


def test_build_then_rebuild_then_info(dataset, tmp_path):
    data_dir = write_dataset(dataset, tmp_path / "jsonl")
    clip_dir = create_random_clip(tmp_path / "clip")
    store = tmp_path / "store"
    arguments = ["features", "build", str(data_dir), "--store", str(store), "--backbone", "clip",
                 "--clip-path", str(clip_dir), "--threads", "1", "--batch-size", "8",
                 "--json", str(tmp_path / "r.json")]
    first = CliRunner().invoke(app, arguments)
    assert first.exit_code == 0, first.output
    assert "texts: 40 encoded of 40 unique" in first.output and "store size" in first.output
    assert json.loads((tmp_path / "r.json").read_text())["rows"]["entities"] == 24

    again = CliRunner().invoke(app, arguments)
    assert again.exit_code == 0 and "texts: 0 encoded of 40 unique" in again.output

    info = CliRunner().invoke(app, ["features", "info", "--store", str(store)])
    assert info.exit_code == 0 and "entities 24 (8 with image)" in info.output

    kept = CliRunner().invoke(app, ["features", "prune", "--store", str(store), "--dry-run"])
    assert kept.exit_code == 0 and "0 views and 0 cache shards removed; would free 0.0 MiB" in kept.output
    view = json.loads(CliRunner().invoke(app, ["features", "info", "--store", str(store), "--json"]).output)["views"][0]
    dropped = CliRunner().invoke(app, ["features", "prune", "--store", str(store), "--drop-view",
                                       f"{view['dataset']}/{view['view_id']}"])
    assert dropped.exit_code == 0 and "1 views and" in dropped.output and "0 cache shards" not in dropped.output
    unknown = CliRunner().invoke(app, ["features", "prune", "--store", str(store), "--drop-view", "x/y"])
    assert unknown.exit_code == 1 and "no such views" in unknown.output


def test_missing_dataset_is_a_one_line_error(tmp_path):
    outcome = CliRunner().invoke(app, ["features", "build", str(tmp_path / "nowhere"), "--store", str(tmp_path / "s")])
    assert outcome.exit_code == 1 and "error:" in outcome.output
