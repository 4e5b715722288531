"""Importing official MIMIC checkpoints: the exact official key names and shapes, built here."""

from __future__ import annotations

import argparse

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from mmel.core.errors import MismatchError
from mmel.models.convert_official import export_official_clip, load_official_mimic

# The MIMIC part of shared/specs/official_keys.txt: name -> shape.
DUAL_KEYS = {"cls_fc.weight": (96, 96), "cls_fc.bias": (96,), "tokens_fc.weight": (96, 96), "tokens_fc.bias": (96,),
             "fc.weight": (96, 96), "fc.bias": (96,), "gate_fc.weight": (1, 96), "gate_fc.bias": (1,),
             "add_layer_norm.weight": (96,), "add_layer_norm.bias": (96,), "layer_norm.weight": (96,),
             "layer_norm.bias": (96,)}
OFFICIAL_HEAD_KEYS = {
    "encoder.image_cls_fc.weight": (96, 512), "encoder.image_cls_fc.bias": (96,),
    "encoder.image_tokens_fc.weight": (96, 768), "encoder.image_tokens_fc.bias": (96,),
    "matcher.tglu.fc_query.weight": (96, 512), "matcher.tglu.fc_query.bias": (96,),
    "matcher.tglu.fc_key.weight": (96, 512), "matcher.tglu.fc_key.bias": (96,),
    "matcher.tglu.fc_value.weight": (96, 512), "matcher.tglu.fc_value.bias": (96,),
    "matcher.tglu.fc_cls.weight": (96, 512), "matcher.tglu.fc_cls.bias": (96,),
    "matcher.tglu.layer_norm.weight": (96,), "matcher.tglu.layer_norm.bias": (96,),
    **{f"matcher.vdlu.dual_ent2men.{key}": shape for key, shape in DUAL_KEYS.items()},
    **{f"matcher.vdlu.dual_men2ent.{key}": shape for key, shape in DUAL_KEYS.items()},
    "matcher.cmfu.text_fc.weight": (96, 512), "matcher.cmfu.text_fc.bias": (96,),
    "matcher.cmfu.image_fc.weight": (96, 96), "matcher.cmfu.image_fc.bias": (96,),
    "matcher.cmfu.gate_fc.weight": (1, 96), "matcher.cmfu.gate_fc.bias": (1,),
    "matcher.cmfu.gate_layer_norm.weight": (96,), "matcher.cmfu.gate_layer_norm.bias": (96,),
    "matcher.cmfu.context_layer_norm.weight": (96,), "matcher.cmfu.context_layer_norm.bias": (96,),
    "matcher.text_cls_layernorm.weight": (512,), "matcher.text_cls_layernorm.bias": (512,),
    "matcher.text_tokens_layernorm.weight": (512,), "matcher.text_tokens_layernorm.bias": (512,),
    "matcher.image_cls_layernorm.weight": (96,), "matcher.image_cls_layernorm.bias": (96,),
    "matcher.image_tokens_layernorm.weight": (96,), "matcher.image_tokens_layernorm.bias": (96,),
}


def tiny_clip_config() -> CLIPConfig:
    return CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                   "num_attention_heads": 4, "vocab_size": 99, "max_position_embeddings": 40,
                                   "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
                      vision_config={"hidden_size": 48, "intermediate_size": 37, "num_hidden_layers": 1,
                                     "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
                      projection_dim=24)


def official_state_dict(clip: CLIPModel | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=generator) for key, shape in OFFICIAL_HEAD_KEYS.items()}
    if clip is not None:
        state.update({f"encoder.clip.{key}": tensor for key, tensor in clip.state_dict().items()})
        # transformers 4.18, which the release pins, stored these buffers
        state["encoder.clip.text_model.embeddings.position_ids"] = torch.arange(40)[None]
    return state


def test_official_head_imports_with_every_tensor_in_its_place(tmp_path) -> None:
    state = official_state_dict()
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "mimic.ckpt")
    model = load_official_mimic(tmp_path / "mimic.ckpt")
    assert model.config.to_dict() == {"text_dim": 512, "image_global_dim": 512, "image_patch_dim": 768,
                                      "hidden_dim": 96, "mask_missing_images": False,
                                      "exclude_duplicate_negatives": False}
    own = model.state_dict()
    assert len(own) == len(OFFICIAL_HEAD_KEYS) and sum(t.numel() for t in own.values()) == 438_563
    torch.testing.assert_close(own["tglu.fc_query.weight"], state["matcher.tglu.fc_query.weight"])
    torch.testing.assert_close(own["vdlu.dual_men2ent.gate_fc.bias"], state["matcher.vdlu.dual_men2ent.gate_fc.bias"])
    torch.testing.assert_close(own["image_tokens_fc.weight"], state["encoder.image_tokens_fc.weight"])
    torch.testing.assert_close(own["text_cls_layernorm.bias"], state["matcher.text_cls_layernorm.bias"])


def test_plain_state_dict_with_clip_weights_imports_and_exports_clip(tmp_path) -> None:
    clip = CLIPModel(tiny_clip_config())
    torch.save(official_state_dict(clip), tmp_path / "mimic.pth")
    assert load_official_mimic(tmp_path / "mimic.pth", mask_missing_images=True).config.mask_missing_images
    tiny_clip_config().save_pretrained(tmp_path / "clip-base")
    (tmp_path / "clip-base" / "merges.txt").write_text("#version: 0.2\n")
    out = export_official_clip(tmp_path / "mimic.pth", tmp_path / "clip-finetuned", clip_dir=tmp_path / "clip-base")
    exported = CLIPModel.from_pretrained(str(out), local_files_only=True)
    for key, tensor in clip.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], tensor)
    assert (out / "merges.txt").is_file()


def test_mismatched_official_checkpoints_are_refused(tmp_path) -> None:
    state = official_state_dict()
    state["matcher.tglu.fc_key.weight"] = torch.zeros(96, 384)
    torch.save(state, tmp_path / "misshaped.pth")
    with pytest.raises(MismatchError, match=r"tglu.fc_key.weight: checkpoint \(96, 384\)"):
        load_official_mimic(tmp_path / "misshaped.pth")

    state = official_state_dict()
    state["matcher.timm.fc_query.weight"] = torch.zeros(96, 512)
    torch.save(state, tmp_path / "m3el.pth")
    with pytest.raises(MismatchError, match=r"unexpected: \['timm.fc_query.weight'\]"):
        load_official_mimic(tmp_path / "m3el.pth")

    state = official_state_dict()
    state["loss_fn.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "foreign.pth")
    with pytest.raises(MismatchError, match="belong to no part of an official MIMIC checkpoint"):
        load_official_mimic(tmp_path / "foreign.pth")

    torch.save(official_state_dict(), tmp_path / "no-clip.pth")
    with pytest.raises(MismatchError, match=r"no encoder\.clip"):
        export_official_clip(tmp_path / "no-clip.pth", tmp_path / "out")


def test_checkpoints_holding_python_objects_are_not_unpickled(tmp_path) -> None:
    torch.save({"state_dict": official_state_dict(), "hyper_parameters": argparse.Namespace(lr=1e-5)},
               tmp_path / "pickled.ckpt")
    with pytest.raises(MismatchError, match="weights_only=True"):
        load_official_mimic(tmp_path / "pickled.ckpt")
