"""Import checkpoints of the official MIMIC release (shared/specs/official_keys.txt).

The release is a Lightning module with two attributes: `encoder` (HF CLIP plus two projections)
and `matcher` (the MIMIC units). mmel's `MIMICModel` uses the matcher's own parameter names and
holds the two projections, so the key map is a short prefix table. The CLIP weights under
`encoder.clip.*` can be written to a Hugging Face CLIP directory for the `clip` backbone.

The only `torch.load` in mmel lives here, always with `weights_only=True`: no pickled Python
objects are ever executed.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import torch

from mmel.core.errors import MismatchError
from mmel.models.mimic import MIMICConfig, MIMICModel

# official prefix -> mmel prefix; keys matching none of these (other than CLIP's) are an error.
MIMIC_KEY_PREFIXES = {
    "matcher.": "",
    "encoder.image_cls_fc.": "image_cls_fc.",
    "encoder.image_tokens_fc.": "image_tokens_fc.",
}
CLIP_PREFIX = "encoder.clip."
# transformers < 4.31 saved these buffers; newer CLIPModel versions compute them and do not store them.
_CLIP_LEGACY_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
# files of a Hugging Face CLIP directory that are not weights (tokenizer, image processor).
_CLIP_AUXILIARY_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                         "special_tokens_map.json", "preprocessor_config.json")


def read_official_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of an official checkpoint: a Lightning `.ckpt` (its `state_dict`) or a plain state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint {path} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise MismatchError(
            f"{path}: cannot be read with weights_only=True ({type(error).__name__}: {error}). The file holds "
            "pickled Python objects besides tensors (e.g. hyper-parameters). In an environment you trust, save only "
            "its tensors: torch.save(torch.load(PATH)['state_dict'], 'weights.pth'), then import weights.pth") from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MismatchError(f"{path}: expected a state dict of tensors (or a Lightning checkpoint holding one)")
    return state


def split_official_state_dict(state: dict[str, torch.Tensor]
                              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Official keys -> (MIMICModel state dict, HF CLIPModel state dict)."""
    head: dict[str, torch.Tensor] = {}
    clip: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        if key.startswith(CLIP_PREFIX):
            clip[key[len(CLIP_PREFIX):]] = tensor
            continue
        prefix = next((p for p in MIMIC_KEY_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            unknown.append(key)
        else:
            head[MIMIC_KEY_PREFIXES[prefix] + key[len(prefix):]] = tensor
    if unknown:
        raise MismatchError(f"keys that belong to no part of an official MIMIC checkpoint: {sorted(unknown)[:10]}"
                            f"{' ...' if len(unknown) > 10 else ''}; is this an M3EL or other checkpoint?")
    return head, clip


def infer_mimic_config(head: dict[str, torch.Tensor], **options: bool) -> MIMICConfig:
    """Widths from the projection and LayerNorm shapes; `options` sets the mmel-only switches."""
    required = ("image_cls_fc.weight", "image_tokens_fc.weight", "text_cls_layernorm.weight")
    missing = [key for key in required if key not in head]
    if missing:
        raise MismatchError(f"not an official MIMIC checkpoint: missing {missing} (official names: "
                            "encoder.image_cls_fc.*, encoder.image_tokens_fc.*, matcher.text_cls_layernorm.*)")
    hidden_dim, image_global_dim = head["image_cls_fc.weight"].shape
    _, image_patch_dim = head["image_tokens_fc.weight"].shape
    (text_dim,) = head["text_cls_layernorm.weight"].shape
    return MIMICConfig(text_dim=text_dim, image_global_dim=image_global_dim, image_patch_dim=image_patch_dim,
                       hidden_dim=hidden_dim, **options)


def load_official_mimic(path: Path, *, mask_missing_images: bool = False,
                        exclude_duplicate_negatives: bool = False) -> MIMICModel:
    """An official MIMIC checkpoint as a `MIMICModel` (strict: every key mapped, every shape checked).

    The mmel options default to off, since the official weights were trained without them;
    the imported model then scores exactly as the release does.
    """
    head, _ = split_official_state_dict(read_official_state_dict(path))
    config = infer_mimic_config(head, mask_missing_images=mask_missing_images,
                                exclude_duplicate_negatives=exclude_duplicate_negatives)
    model = MIMICModel(config)
    model.load_weights(head, source=path)
    return model.eval()


def export_official_clip(path: Path, out_dir: Path, *, clip_dir: Path | None = None) -> Path:
    """Write the checkpoint's fine-tuned `encoder.clip.*` weights as a Hugging Face CLIP directory.

    The official file holds weights only. The architecture comes from `clip_dir` (the user's
    local `openai/clip-vit-base-patch32` directory, whose tokenizer and image-processor files are
    copied too) or, without it, from transformers' default CLIPConfig, which is ViT-B/32; a
    tokenizer must then be added before the `clip` backbone can load the directory.
    """
    from transformers import CLIPConfig, CLIPModel

    _, clip_state = split_official_state_dict(read_official_state_dict(path))
    if not clip_state:
        raise MismatchError(f"{path}: holds no encoder.clip.* weights to export")
    config = CLIPConfig.from_pretrained(str(clip_dir), local_files_only=True) if clip_dir else CLIPConfig()
    clip = CLIPModel(config)
    clip_state = {k: v for k, v in clip_state.items() if k not in _CLIP_LEGACY_BUFFERS}
    _check_clip_keys(clip.state_dict(), clip_state, path)
    clip.load_state_dict(clip_state, strict=False)
    out_dir = Path(out_dir)
    clip.save_pretrained(str(out_dir), safe_serialization=True)
    if clip_dir is not None:
        for name in _CLIP_AUXILIARY_FILES:
            if (Path(clip_dir) / name).is_file():
                shutil.copy2(Path(clip_dir) / name, out_dir / name)
    return out_dir


def _check_clip_keys(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: Path) -> None:
    """Every CLIP parameter present with its shape; buffers that newer transformers recompute may be absent."""
    buffers_recomputed = set(_CLIP_LEGACY_BUFFERS)
    missing = sorted(set(own) - set(state) - buffers_recomputed)
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs CLIP {tuple(own[k].shape)}"
                       for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or misshaped:
        raise MismatchError(f"{source}: encoder.clip.* does not fit the CLIP architecture; "
                            f"missing: {missing or 'none'}; unexpected: {unexpected or 'none'}; "
                            f"shape mismatches: {misshaped or 'none'}")


__all__ = ["export_official_clip", "infer_mimic_config", "load_official_mimic", "read_official_state_dict",
           "split_official_state_dict"]
