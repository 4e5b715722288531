"""Importing official MIMIC and M3EL checkpoints: the official key names and shapes, saved as the releases save."""

from __future__ import annotations

import os
import zipfile
from collections import OrderedDict

import pytest
import torch
from omegaconf import OmegaConf
from transformers import CLIPConfig, CLIPModel

from mmel.core.errors import MismatchError
from mmel.models import load_model
from mmel.models.convert_official import (
    export_official_clip,
    import_official,
    load_official,
    read_checkpoint_tensors,
)
from mmel.models.m3el import M3ELModel
from mmel.models.mimic import MIMICModel

# The MIMIC and M3EL parts of shared/specs/official_keys.txt: name -> shape.
DUAL_KEYS = {"cls_fc.weight": (96, 96), "cls_fc.bias": (96,), "tokens_fc.weight": (96, 96), "tokens_fc.bias": (96,),
             "fc.weight": (96, 96), "fc.bias": (96,), "gate_fc.weight": (1, 96), "gate_fc.bias": (1,),
             "add_layer_norm.weight": (96,), "add_layer_norm.bias": (96,), "layer_norm.weight": (96,),
             "layer_norm.bias": (96,)}
SHARED_KEYS = {
    "encoder.image_cls_fc.weight": (96, 512), "encoder.image_cls_fc.bias": (96,),
    "encoder.image_tokens_fc.weight": (96, 768), "encoder.image_tokens_fc.bias": (96,),
    "matcher.text_cls_layernorm.weight": (512,), "matcher.text_cls_layernorm.bias": (512,),
    "matcher.text_tokens_layernorm.weight": (512,), "matcher.text_tokens_layernorm.bias": (512,),
    "matcher.image_cls_layernorm.weight": (96,), "matcher.image_cls_layernorm.bias": (96,),
    "matcher.image_tokens_layernorm.weight": (96,), "matcher.image_tokens_layernorm.bias": (96,),
}


def linear(prefix: str, out_dim: int, in_dim: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (out_dim, in_dim), f"{prefix}.bias": (out_dim,)}


def intra_modal_keys(unit: str, in_dim: int) -> dict[str, tuple[int, ...]]:
    return {**linear(f"matcher.{unit}.fc_query", 96, in_dim), **linear(f"matcher.{unit}.fc_key", 96, in_dim),
            **linear(f"matcher.{unit}.fc_value", 96, in_dim), **linear(f"matcher.{unit}.fc_cls", 96, in_dim),
            **linear(f"matcher.{unit}.layer_norm", 96, 0)}


def mclet(prefix: str) -> dict[str, tuple[int, ...]]:
    return {**linear(f"{prefix}.cl_fc.0", 96, 96), **linear(f"{prefix}.cl_fc.2", 96, 96)}


def cross_modal_keys(unit: str) -> dict[str, tuple[int, ...]]:
    return {**linear(f"matcher.{unit}.text_fc", 96, 512), **linear(f"matcher.{unit}.image_fc", 96, 96),
            **linear(f"matcher.{unit}.gate_fc", 1, 96), **linear(f"matcher.{unit}.gate_layer_norm", 96, 0),
            **linear(f"matcher.{unit}.match_module.trans_linear", 96, 96),
            f"matcher.{unit}.multi_head_module.weight": (5, 1)}


MIMIC_KEYS = {
    **SHARED_KEYS,
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
}
M3EL_UNUSED_KEYS = {
    **mclet("matcher.cmm.mclet_text_loss"), **mclet("matcher.cmmb.mclet_text_loss"),
    **mclet("matcher.cmmb.mclet_image_loss"), **mclet("matcher.mclet_text_loss"), **mclet("matcher.mclet_image_loss"),
    **linear("matcher.text_fc", 96, 512), **linear("matcher.image_fc", 96, 96),
    **{key: shape for name in ("text_cls", "text_tokens", "image_cls", "image_tokens")
       for key, shape in linear(f"matcher.scale_{name}_layernorm", 96, 0).items()},
    "matcher.weight_cl_loss.logit_scale": (),
}
M3EL_KEYS = {
    **SHARED_KEYS, **intra_modal_keys("timm", 512), **intra_modal_keys("iimm", 96),
    **cross_modal_keys("cmm"), **linear("matcher.cmm.fusion_module.linear", 96, 96), **cross_modal_keys("cmmb"),
    **M3EL_UNUSED_KEYS,
}
FIXED_KEYS = {"matcher.cmm.multi_head_module.weight", "matcher.cmmb.multi_head_module.weight"}


def official_state_dict(keys: dict[str, tuple[int, ...]], clip: CLIPModel | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state = OrderedDict()
    for key, shape in keys.items():
        shape = tuple(s for s in shape if s)   # (96, 0) in the helpers above means a vector (96,)
        state[key] = torch.ones(shape) if key in FIXED_KEYS else torch.randn(shape, generator=generator)
    if clip is not None:
        state.update({f"encoder.clip.{key}": tensor for key, tensor in clip.state_dict().items()})
        # transformers 4.18, which the release pins, stored these buffers
        state["encoder.clip.text_model.embeddings.position_ids"] = torch.arange(40)[None]
    return state


def save_like_lightning(state: dict[str, torch.Tensor], path) -> None:
    """As the releases' Lightning 1.7 ModelCheckpoint saves: state dict plus pickled OmegaConf hyper-parameters."""
    hyper_parameters = OmegaConf.create({"model": {"lr": 1e-5, "head_num": 5, "weight": 1.0},
                                         "data": {"kb_img_folder": "data/WikiMEL/kb_image"}})
    torch.save({"epoch": 13, "global_step": 1988, "pytorch-lightning_version": "1.7.7", "state_dict": state,
                "hyper_parameters": hyper_parameters, "hparams_name": "args",
                "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}}]}, path)


def tiny_clip_config() -> CLIPConfig:
    return CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                   "num_attention_heads": 4, "vocab_size": 99, "max_position_embeddings": 40,
                                   "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
                      vision_config={"hidden_size": 48, "intermediate_size": 37, "num_hidden_layers": 1,
                                     "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
                      projection_dim=24)


# --- the restricted reader ------------------------------------------------------------------------


def test_a_lightning_checkpoint_with_omegaconf_hyper_parameters_is_read_without_unpickling_them(tmp_path) -> None:
    state = official_state_dict(MIMIC_KEYS)
    state["shared.view"] = state["matcher.tglu.fc_key.weight"][:, 3:7]   # a strided view into another storage
    save_like_lightning(state, tmp_path / "mimic.ckpt")
    with pytest.raises(Exception, match=r"weights_only|Unsupported global"):
        torch.load(tmp_path / "mimic.ckpt", weights_only=True)   # what the reader replaces
    tensors, unread = read_checkpoint_tensors(tmp_path / "mimic.ckpt")
    assert list(tensors) == list(state)
    for key, tensor in state.items():
        assert torch.equal(tensors[key], tensor), key
    assert "omegaconf.dictconfig.DictConfig" in unread


class _Hostile:
    """Pickles as a call to os.system that would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _HostileOpen:
    """Pickles as builtins.open(marker, 'w'): creating the file would prove the call ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_hostile_pickles_are_never_executed(tmp_path) -> None:
    marker, second_marker = tmp_path / "pwned", tmp_path / "pwned-open"
    state = official_state_dict(MIMIC_KEYS)
    torch.save({"state_dict": state, "hyper_parameters": _Hostile(marker), "callbacks": [_HostileOpen(second_marker)]},
               tmp_path / "hostile.ckpt")
    tensors, unread = read_checkpoint_tensors(tmp_path / "hostile.ckpt")
    assert not marker.exists() and not second_marker.exists()
    assert {f"{os.system.__module__}.system", f"{open.__module__}.open"} <= set(unread)
    assert torch.equal(tensors["matcher.tglu.fc_key.weight"], state["matcher.tglu.fc_key.weight"])

    torch.save({"state_dict": {"matcher.tglu.fc_key.weight": _Hostile(marker)}}, tmp_path / "hostile-value.ckpt")
    with pytest.raises(MismatchError, match="expected a state dict of tensors"):
        read_checkpoint_tensors(tmp_path / "hostile-value.ckpt")
    assert not marker.exists()


def test_unreadable_files_are_refused_with_a_clear_error(tmp_path) -> None:
    torch.save(official_state_dict(MIMIC_KEYS), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(MismatchError, match="legacy format"):
        read_checkpoint_tensors(tmp_path / "legacy.pth")
    with pytest.raises(FileNotFoundError):
        read_checkpoint_tensors(tmp_path / "absent.ckpt")
    with zipfile.ZipFile(tmp_path / "crafted.ckpt", "w") as archive:   # a pickle that calls a storage type
        archive.writestr("archive/data.pkl", b"\x80\x02ctorch\nFloatStorage\n)R.")
    with pytest.raises(MismatchError, match="cannot be read without executing code"):
        read_checkpoint_tensors(tmp_path / "crafted.ckpt")


# --- MIMIC ----------------------------------------------------------------------------------------


def test_official_mimic_imports_with_every_tensor_in_its_place(tmp_path) -> None:
    state = official_state_dict(MIMIC_KEYS)
    save_like_lightning(state, tmp_path / "mimic.ckpt")
    model, report = load_official("mimic", tmp_path / "mimic.ckpt")
    assert isinstance(model, MIMICModel)
    assert model.config.to_dict() == {"text_dim": 512, "image_global_dim": 512, "image_patch_dim": 768,
                                      "hidden_dim": 96, "mask_missing_images": False,
                                      "exclude_duplicate_negatives": False}
    own = model.state_dict()
    assert len(own) == len(MIMIC_KEYS) == report.loaded and sum(t.numel() for t in own.values()) == 438_563
    assert report.unused == {} and report.fixed == {}
    torch.testing.assert_close(own["tglu.fc_query.weight"], state["matcher.tglu.fc_query.weight"])
    torch.testing.assert_close(own["vdlu.dual_men2ent.gate_fc.bias"], state["matcher.vdlu.dual_men2ent.gate_fc.bias"])
    torch.testing.assert_close(own["image_tokens_fc.weight"], state["encoder.image_tokens_fc.weight"])
    torch.testing.assert_close(own["text_cls_layernorm.bias"], state["matcher.text_cls_layernorm.bias"])


def test_plain_state_dict_with_clip_weights_imports_and_exports_clip(tmp_path) -> None:
    clip = CLIPModel(tiny_clip_config())
    torch.save(official_state_dict(MIMIC_KEYS, clip), tmp_path / "mimic.pth")
    model, report = load_official("mimic", tmp_path / "mimic.pth", {"mask_missing_images": True})
    assert model.config.mask_missing_images and report.clip_tensors == len(clip.state_dict()) + 1
    tiny_clip_config().save_pretrained(tmp_path / "clip-base")
    (tmp_path / "clip-base" / "merges.txt").write_text("#version: 0.2\n")
    out = export_official_clip(tmp_path / "mimic.pth", tmp_path / "clip-finetuned", clip_dir=tmp_path / "clip-base")
    exported = CLIPModel.from_pretrained(str(out), local_files_only=True)
    for key, tensor in clip.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], tensor)
    assert (out / "merges.txt").is_file()


def test_mismatched_official_checkpoints_are_refused(tmp_path) -> None:
    state = official_state_dict(MIMIC_KEYS)
    state["matcher.tglu.fc_key.weight"] = torch.zeros(96, 384)
    torch.save(state, tmp_path / "misshaped.pth")
    with pytest.raises(MismatchError, match=r"tglu.fc_key.weight: checkpoint \(96, 384\)"):
        load_official("mimic", tmp_path / "misshaped.pth")

    torch.save(official_state_dict(M3EL_KEYS), tmp_path / "m3el.pth")
    with pytest.raises(MismatchError, match=r"unexpected: \[.*'timm.fc_query.weight'"):
        load_official("mimic", tmp_path / "m3el.pth")

    state = official_state_dict(MIMIC_KEYS)
    state["loss_fn.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "foreign.pth")
    with pytest.raises(MismatchError, match="belong to no part of an official MIMIC checkpoint"):
        load_official("mimic", tmp_path / "foreign.pth")

    torch.save(official_state_dict(MIMIC_KEYS), tmp_path / "no-clip.pth")
    with pytest.raises(MismatchError, match=r"no encoder\.clip"):
        export_official_clip(tmp_path / "no-clip.pth", tmp_path / "out")
    with pytest.raises(KeyError, match="available: m3el, mimic"):
        load_official("dim", tmp_path / "no-clip.pth")


# --- M3EL -----------------------------------------------------------------------------------------


def test_official_m3el_imports_and_reports_every_tensor_it_does_not_use(tmp_path) -> None:
    state = official_state_dict(M3EL_KEYS)
    save_like_lightning(state, tmp_path / "m3el.ckpt")
    model, report = load_official("m3el", tmp_path / "m3el.ckpt")
    assert isinstance(model, M3ELModel) and model.cmmb is None
    assert model.config.release_single_key_cmn_branch and not model.config.mask_missing_images
    own = model.state_dict()
    assert sum(t.numel() for t in own.values()) == 123_072 + 197_184 + 37_440 + 77_473 + 2_432
    torch.testing.assert_close(own["timm.fc_query.weight"], state["matcher.timm.fc_query.weight"])
    torch.testing.assert_close(own["iimm.layer_norm.bias"], state["matcher.iimm.layer_norm.bias"])
    torch.testing.assert_close(own["cmm.fusion_module.linear.weight"], state["matcher.cmm.fusion_module.linear.weight"])
    torch.testing.assert_close(own["cmm.match_module.trans_linear.bias"],
                               state["matcher.cmm.match_module.trans_linear.bias"])
    torch.testing.assert_close(own["image_cls_fc.weight"], state["encoder.image_cls_fc.weight"])
    cmmb_keys = {key for key in M3EL_KEYS if key.startswith("matcher.cmmb.") and "mclet" not in key} - FIXED_KEYS
    assert set(report.unused) == set(M3EL_UNUSED_KEYS) | cmmb_keys
    assert "MCLET" in report.unused["matcher.mclet_image_loss.cl_fc.0.weight"]
    assert "not built" in report.unused["matcher.cmmb.text_fc.weight"]
    assert set(report.fixed) == FIXED_KEYS
    assert len(own) + len(report.unused) + len(report.fixed) == len(M3EL_KEYS)   # every key placed or reported
    summary = report.summary()
    assert "matcher.weight_cl_loss.logit_scale" in summary and "omegaconf.dictconfig.DictConfig" in summary


@pytest.mark.parametrize(("options", "has_cmm"), [({"bidirectional": True}, False),
                                                 ({"bidirectional": True, "release_t2v_inference": True}, True)],
                         ids=["wikidiverse-mmel", "wikidiverse-release"])
def test_wikidiverse_checkpoints_import_the_bidirectional_unit(tmp_path, options, has_cmm: bool) -> None:
    state = official_state_dict(M3EL_KEYS)
    save_like_lightning(state, tmp_path / "m3el.ckpt")
    model, report = load_official("m3el", tmp_path / "m3el.ckpt", options)
    own = model.state_dict()
    torch.testing.assert_close(own["cmmb.text_fc.weight"], state["matcher.cmmb.text_fc.weight"])
    assert (model.cmm is not None) == has_cmm
    assert ("matcher.cmm.text_fc.weight" in report.unused) == (not has_cmm)
    if has_cmm:
        torch.testing.assert_close(own["cmm.gate_fc.bias"], state["matcher.cmm.gate_fc.bias"])


def test_import_official_writes_a_checkpoint_directory_that_loads(tmp_path) -> None:
    save_like_lightning(official_state_dict(M3EL_KEYS), tmp_path / "m3el.ckpt")
    report = import_official("m3el", tmp_path / "m3el.ckpt", tmp_path / "imported", {"entity_text": "attr"})
    loaded = load_model(tmp_path / "imported")
    assert isinstance(loaded, M3ELModel) and loaded.config.entity_text == "attr"
    assert loaded.checkpoint_header["imported_from"]["release"] == "m3el"
    assert "matcher.weight_cl_loss.logit_scale" in loaded.checkpoint_header["imported_from"]["unused"]
    assert report.out_dir == tmp_path / "imported"
    assert "logit_scale" in (tmp_path / "imported" / "README.md").read_text()
    model, _ = load_official("m3el", tmp_path / "m3el.ckpt", {"entity_text": "attr"})
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_head_weights_other_than_ones_are_refused(tmp_path) -> None:
    state = official_state_dict(M3EL_KEYS)
    state["matcher.cmm.multi_head_module.weight"] = torch.full((5, 1), 0.5)
    torch.save(state, tmp_path / "m3el.pth")
    with pytest.raises(MismatchError, match="builds in ones"):
        load_official("m3el", tmp_path / "m3el.pth")
