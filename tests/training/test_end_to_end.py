"""Whole runs on a tiny dataset with a tiny random CLIP (conftest.py): the paper's end-to-end recipe and the CLI on
the store."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mmel.backbones import load_backbone
from mmel.cli.main import app
from mmel.features.store import build_features
from mmel.models import load_model
from mmel.training.recipe import load_recipe
from mmel.training.run import train


def test_paper_recipe_fine_tunes_the_backbone_end_to_end(tiny_clip: Path, tiny_dataset: Path, tmp_path) -> None:
    recipe = load_recipe("mimic-paper", [f"backbone.path={tiny_clip}", "data.batch_size=6", "data.num_workers=0",
                                         "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1",
                                         "trainer.progress=false", "trainer.accelerator=cpu", "trainer.num_threads=1",
                                         "optimizer.lr=1e-3"])
    result = train(recipe, data_dir=tiny_dataset, out_dir=tmp_path / "run")
    assert result.counts.train["nil"] == 1 and result.counts.train["usable"] == 12
    assert result.counts.dev["ranked"] == 6 and result.best_mrr is not None
    image_problems = json.loads((tmp_path / "run" / "summary.json").read_text())["image_problems"]
    assert image_problems["kb"].endswith("images loaded, no problems")
    header = load_model(result.best_dir).checkpoint_header
    assert header["config"]["text_dim"] == 32 and header["config"]["image_patch_dim"] == 48
    tuned = load_file(str(tmp_path / "run" / header["backbone"]["fine_tuned_weights"]))
    original = load_backbone("clip", path=str(tiny_clip)).state_dict()
    changed = [key for key in original if not torch.equal(original[key], tuned[key])]
    assert "model.text_model.encoder.layers.0.mlp.fc1.weight" in changed
    assert "model.vision_model.encoder.layers.0.mlp.fc1.weight" in changed


def test_cli_trains_the_head_on_stored_features(tiny_clip: Path, tiny_dataset: Path, tmp_path) -> None:
    from mmel.data import load_dataset

    backbone = load_backbone("clip", path=str(tiny_clip))
    features = build_features(load_dataset(tiny_dataset), backbone, tmp_path / "store", dtype="float32",
                              progress=False)
    arguments = ["train", "--recipe", "mimic-synthetic-cpu", "--dataset", str(tiny_dataset), "--features",
                 str(tmp_path / "store"), "--out", str(tmp_path / "run"), "--set", "backbone.name=clip",
                 "--set", "trainer.max_epochs=2", "--set", "data.batch_size=6", "--set", "trainer.progress=false"]
    outcome = CliRunner().invoke(app, arguments)
    assert outcome.exit_code == 0, outcome.output
    assert "best dev MRR" in outcome.output
    header = load_model(tmp_path / "run" / "best").checkpoint_header
    assert header["backbone"]["fingerprint"] == features.backbone_fingerprint
    assert header["preprocess"]["max_text_length"] == 40

    refused = CliRunner().invoke(app, [*arguments[:-8], "--set", "backbone.name=minilm_effnet",
                                       "--out", str(tmp_path / "other")])
    assert refused.exit_code == 1 and "match the recipe" in refused.output
