"""Whole runs on a tiny dataset with a tiny random CLIP: the paper's end-to-end recipe and the CLI on the store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode
from typer.testing import CliRunner

from mmel.backbones import load_backbone
from mmel.cli.main import app
from mmel.core.types import Dataset, Entity, KnowledgeBase, Mention
from mmel.data import write_dataset
from mmel.features.store import build_features
from mmel.models import load_model
from mmel.training.recipe import load_recipe
from mmel.training.run import train

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A randomly initialised CLIP (text 32, vision 48 wide, 32 px images) with a character-level tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-clip")
    characters = list(bytes_to_unicode().values())
    vocab = {token: index for index, token in enumerate(characters + [c + "</w>" for c in characters])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt")).save_pretrained(directory)
    end = vocab["<|endoftext|>"]
    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                     "num_attention_heads": 4, "vocab_size": len(vocab), "max_position_embeddings": 40,
                                     "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": end,
                                     "pad_token_id": end},
                        vision_config={"hidden_size": 48, "intermediate_size": 37, "num_hidden_layers": 1,
                                       "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
                        projection_dim=32)  # = text width, as in OpenAI's CLIPs (MIMIC needs t_cls and t_tok alike)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """Six entities with coloured images; mentions name their colour; one NIL mention per split."""
    source = tmp_path_factory.mktemp("tiny-source")
    (source / "images").mkdir()
    for colour in COLOURS:
        Image.new("RGB", (40, 40), colour).save(source / "images" / f"{colour}.png")
    entities = [Entity(qid=f"Q{i}", name=f"The {colour} one", attributes=f"Colour: {colour}.",
                       images=(f"images/{colour}.png",) if i % 2 == 0 else ())
                for i, colour in enumerate(COLOURS)]

    def mentions(split: str, repeats: int) -> list[Mention]:
        found = [Mention(id=f"{split}-{k}-{i}", sentence=f"I saw the {colour} thing.", surface=colour,
                         image=f"images/{colour}.png" if k % 2 == 0 else None, gold_qid=f"Q{i}")
                 for k in range(repeats) for i, colour in enumerate(COLOURS)]
        return [*found, Mention(id=f"{split}-nil", sentence="Nothing here.", surface="nothing")]

    dataset = Dataset("tiny", KnowledgeBase(entities), {"train": mentions("train", 2), "dev": mentions("dev", 1)},
                      source)
    return write_dataset(dataset, tmp_path_factory.mktemp("tiny") / "dataset")


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
