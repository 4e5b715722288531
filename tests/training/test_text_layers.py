"""Partial fine-tuning: cached lower text layers + trainable top layers, saved with the checkpoint and linked with.

Real MiniLM weights, a tiny hand-made KB (tests/conftest.py), a few training steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmel.backbones import load_backbone
from mmel.backbones.text_layers import TEXT_LAYERS_FILE, LowerTextLayers, TopTextLayers, text_layer_stack
from mmel.core.config import ConfigError
from mmel.core.errors import MismatchError, UsageError
from mmel.core.types import Dataset
from mmel.features.store import build_features
from mmel.features.templates import get_template
from mmel.retrieval.index_build import ModelSpec, build_index, load_checked_backbone
from mmel.retrieval.linker import Linker
from mmel.training.recipe import load_recipe
from mmel.training.run import _check_model_reads, build_model, fit, stored_inputs


@pytest.fixture(scope="module")
def tiny_dataset(tiny_index) -> Dataset:
    """The conftest's KB and queries, the queries also as the dev split (training validates on them)."""
    source = tiny_index.dataset
    return Dataset(name=source.name, kb=source.kb, splits={"train": source.split("train"),
                                                          "dev": source.split("train")}, root=source.root)


def test_cached_lower_layers_then_top_layers_equal_the_full_encoder(tmp_path, linker_backbone, tiny_dataset) -> None:
    """The store's layer-4 states (float32) through the copied top layers give the full encoder's features."""
    features = build_features(tiny_dataset, LowerTextLayers(linker_backbone, 4), tmp_path, dtype="float32",
                              progress=False)
    assert features.manifest["backbone"]["text_layer"] == 4
    assert features.manifest["backbone"]["fingerprint"] == f"{linker_backbone.fingerprint}+text-layer4"
    top = TopTextLayers.from_backbone(linker_backbone, 2).eval()
    assert top.first == 4
    template = get_template("mimic")
    texts = [template.entity_text(entity) for entity in tiny_dataset.kb]
    with torch.no_grad():
        refined = top(features.entities.gather(np.arange(len(texts))))
        full = linker_backbone.encode_texts(texts, 40)
    mask = full.mask
    assert torch.equal(refined.text_mask, mask)
    torch.testing.assert_close(refined.text_tokens[mask], full.tokens[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(refined.text_global, full.global_, atol=1e-5, rtol=1e-5)


def test_layer_choices_outside_the_stack_are_refused(linker_backbone) -> None:
    count = len(text_layer_stack(linker_backbone))
    for layer in (0, count):
        with pytest.raises(UsageError, match="text-layer must be between"):
            LowerTextLayers(linker_backbone, layer)
    with pytest.raises(UsageError, match="train_text_layers must be between"):
        TopTextLayers.from_backbone(linker_backbone, count)


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, tiny_dataset):
    """A MIMIC head trained for 3 epochs with MiniLM's top text layer and the learned name signal."""
    torch.manual_seed(0)
    store = tmp_path_factory.mktemp("layer-store")
    base = load_backbone("minilm_effnet")
    build_features(tiny_dataset, LowerTextLayers(base, 5), store, progress=False)
    recipe = load_recipe("mimic-synthetic-small-cpu", [
        "backbone.train_text_layers=1", "backbone.max_text_length=40", "model.name_signal=true",
        "model.options.hidden_dim=8", "data.batch_size=9", "optimizer.backbone_lr=1e-3", "trainer.max_epochs=3",
        "trainer.check_val_every_n_epoch=1", "trainer.progress=false", "validation.entity_batch_size=4"])
    inputs = stored_inputs(recipe, tiny_dataset, store)
    assert isinstance(inputs.encoder, TopTextLayers)
    model = build_model(recipe.model, inputs.widths)
    out = tmp_path_factory.mktemp("run")
    fit(model, inputs.datamodule, recipe, out, inputs.info, encoder=inputs.encoder)
    return base, inputs.encoder, out / "best"


def test_training_moves_the_top_layer_and_the_checkpoint_carries_it(fine_tuned) -> None:
    base, trained, checkpoint = fine_tuned
    pretrained = text_layer_stack(base)[5].state_dict()
    moved = [name for name, tensor in trained.layers[0].state_dict().items()
             if not torch.equal(tensor, pretrained[name])]
    assert moved, "no weight of the trained text layer changed"
    assert (checkpoint / TEXT_LAYERS_FILE).is_file()
    header = json.loads((checkpoint / "config.json").read_text())
    block = header["backbone"]["fine_tuned_text_layers"]
    assert (block["first_layer"], block["count"], block["file"]) == (5, 1, TEXT_LAYERS_FILE)
    assert header["backbone"]["fingerprint"].startswith(base.fingerprint + "+text-layers-")
    learned = header["inference"]["name_prior_weight"]
    assert learned > 0 and learned != 8.0, "the name signal's weight did not train"


def test_a_loaded_checkpoint_backbone_encodes_with_the_fine_tuned_layers(fine_tuned, tiny_dataset) -> None:
    base, _, checkpoint = fine_tuned
    spec = ModelSpec.read(checkpoint)
    backbone = load_checked_backbone(spec)
    assert backbone.fingerprint == spec.backbone_fingerprint != base.fingerprint
    saved = load_file(checkpoint / TEXT_LAYERS_FILE)
    loaded_layer = text_layer_stack(backbone)[5].state_dict()
    assert all(torch.equal(saved[f"encoder.layer.5.{name}"], tensor) for name, tensor in loaded_layer.items())
    assert not torch.equal(loaded_layer["output.dense.weight"], text_layer_stack(base)[5].state_dict()[
        "output.dense.weight"])
    # what the linker computes (full encoder, fine-tuned) = what training computed (cached states + top layer)
    texts = [get_template("mimic").mention_text(mention) for mention in tiny_dataset.split("train")]
    with torch.no_grad():
        lower = LowerTextLayers(base, 5).encode_texts(texts, 40)
        from_cache = TopTextLayers.from_backbone(backbone, 1).eval()(_text_batch(lower))
        loaded = backbone.encode_texts(texts, 40)
    torch.testing.assert_close(loaded.global_, from_cache.text_global, atol=1e-5, rtol=1e-5)
    with pytest.raises(MismatchError, match="fingerprint"):
        load_checked_backbone(spec, base)        # the pretrained encoder is not this checkpoint's


def test_the_linker_serves_a_fine_tuned_checkpoint(fine_tuned, tiny_dataset, tmp_path) -> None:
    _, _, checkpoint = fine_tuned
    build_index(tiny_dataset, checkpoint, tmp_path / "index", progress=False)
    with Linker.load(tmp_path / "index") as linker:
        assert linker.backbone.fingerprint == ModelSpec.read(checkpoint).backbone_fingerprint
        mention = tiny_dataset.split("train")[0]
        result = linker.link(mention.sentence, mention=mention.surface)
        assert result.candidates, "the linker returned no candidate"


def test_a_tampered_layer_file_is_refused(fine_tuned, tmp_path) -> None:
    import shutil

    _, _, checkpoint = fine_tuned
    copy = shutil.copytree(checkpoint, tmp_path / "copy")
    data = bytearray((copy / TEXT_LAYERS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (copy / TEXT_LAYERS_FILE).write_bytes(bytes(data))
    with pytest.raises(MismatchError, match="SHA-256"):
        load_checked_backbone(ModelSpec.read(copy))


def _text_batch(text):
    from mmel.core.features import FeatureBatch

    count = len(text.global_)
    return FeatureBatch(text_global=text.global_, text_tokens=text.tokens, text_mask=text.mask,
                        image_global=torch.zeros(count, 1280), image_patches=torch.zeros(count, 49, 1280),
                        has_image=torch.zeros(count, dtype=torch.bool))


def test_m3el_trains_with_top_text_layers_and_dim_is_refused(tmp_path, tiny_dataset, linker_backbone) -> None:
    """The top layers refine the primary text for any model; DIM's further pooled views they cannot refine."""
    store = tmp_path / "store"
    build_features(tiny_dataset, LowerTextLayers(linker_backbone, 5), store, template="m3el", max_text_length=24,
                   progress=False)
    recipe = load_recipe("m3el-synthetic-small-cpu", [
        "backbone.train_text_layers=1", "model.options.hidden_dim=8", "data.batch_size=9", "trainer.max_epochs=1",
        "trainer.check_val_every_n_epoch=1", "trainer.progress=false", "validation.entity_batch_size=4"])
    inputs = stored_inputs(recipe, tiny_dataset, store)
    fit(build_model(recipe.model, inputs.widths), inputs.datamodule, recipe, tmp_path / "run", inputs.info,
        encoder=inputs.encoder)
    assert (tmp_path / "run" / "best" / TEXT_LAYERS_FILE).is_file()
    dim = load_recipe("dim-wikimel-cpu", ["backbone.train_text_layers=1"])
    with pytest.raises(ConfigError, match="further text views"):
        _check_model_reads(build_model(dim.model, inputs.widths), dim, inputs.datamodule)


def test_the_resume_state_holds_the_trained_layers_and_the_name_weight(fine_tuned) -> None:
    """`mmel train --resume` restores everything the system trains, not only the head."""
    _, _, checkpoint = fine_tuned
    state = torch.load(checkpoint.parent / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    names = set(state["state_dict"])
    assert "name_signal.log_weight" in names
    assert any(name.startswith("encoder.layers.0.attention.") for name in names)
    assert any(name.startswith("model.") for name in names)
