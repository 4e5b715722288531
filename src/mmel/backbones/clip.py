"""CLIP, the papers' backbone: `transformers.CLIPModel` from a local directory or a hub id.

It gives exactly the encoder outputs MIMIC and M3EL read (shared/specs/models.md §1.2):

| FeatureBatch field | CLIP output | ViT-B/32 shape |
|---|---|---|
| text_global | `text_embeds`: projected EOS state, L2-normalised | [B, 512] |
| text_tokens | text `last_hidden_state` (after the final LayerNorm, pads included) | [B, 40, 512] |
| image_global | `image_embeds`: projected pooled CLS, L2-normalised | [B, 512] |
| image_patches | vision `last_hidden_state` (CLS + 49 patches, before `post_layernorm`) | [B, 50, 768] |

Preprocessing follows the papers (§1.1): text padded and truncated to `max_length` (40) with BOS and
EOS inside; images resized to 224 x 224 with LANCZOS (aspect ratio not kept), scaled to [0, 1] and
normalised with the checkpoint's mean and std (CLIP's by default). The text and vision towers are
called directly rather than through `CLIPModel.forward`, which computes the same tensors but needs
both modalities at once.

Weights are read from safetensors only: a pickle `.bin` checkpoint can run code when it is loaded,
so a directory (or hub snapshot) without `model.safetensors` is refused with the way to convert it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPTokenizer, PreTrainedTokenizerBase

from mmel.backbones.base import ImageFeatures, TextFeatures, make_fingerprint, pixels_from_images
from mmel.core.errors import MmelError
from mmel.core.paths import read_json

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # the papers' checkpoint (models.md §1.1)
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "preprocessor_config.json"
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")   # one file, or shards with an index


class CLIPBackbone(nn.Module):
    """A CLIP checkpoint behind the Backbone interface; an `nn.Module`, so it can be fine-tuned in place."""

    name = "clip"

    def __init__(self, model: CLIPModel, tokenizer: PreTrainedTokenizerBase, *, source: str,
                 image_mean: tuple[float, ...] = CLIP_IMAGE_MEAN, image_std: tuple[float, ...] = CLIP_IMAGE_STD):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.image_mean = image_mean
        self.image_std = image_std
        vision = model.config.vision_config
        self.text_dim = model.config.text_config.hidden_size
        self.image_global_dim = model.config.projection_dim
        self.image_patch_dim = vision.hidden_size
        self.image_size = vision.image_size
        self.num_patches = (vision.image_size // vision.patch_size) ** 2 + 1  # + CLS
        self.max_positions = model.config.text_config.max_position_embeddings
        self._fingerprint: str | None = None

    @classmethod
    def load(cls, path: str | Path = DEFAULT_CLIP, *, device: str | torch.device = "cpu",
             local_files_only: bool = True) -> CLIPBackbone:
        """Load a CLIP checkpoint from a directory or a hub id (offline by default: the HF cache only).

        Only safetensors weights are read; a local directory holding pickle weights alone is refused.
        """
        source = str(path)
        _require_safetensors(Path(source))
        try:
            model = CLIPModel.from_pretrained(source, local_files_only=local_files_only, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
        except OSError as error:
            raise MmelError(f"cannot load a CLIP checkpoint from {source!r}: {error}. Pass a local directory "
                            f"holding config.json, the weights and the tokenizer files (a copy of {DEFAULT_CLIP} "
                            "gives the papers' features), or allow downloads with local_files_only=False") from None
        mean, std = _image_normalisation(Path(source))
        return cls(model.eval(), tokenizer, source=source, image_mean=mean, image_std=std).to(device)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def fingerprint(self) -> str:
        """Hash of the weights (as first asked), the tokenizer and the image preprocessing."""
        if self._fingerprint is None:
            tokenizer_hash = hashlib.sha256(self.tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()
            self._fingerprint = make_fingerprint(self.name, {
                "weights": _state_dict_sha256(self.model), "tokenizer": tokenizer_hash,
                "image_size": self.image_size, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std), "resize": "lanczos-squash"})
        return self._fingerprint

    def encode_texts(self, texts: list[str], max_length: int) -> TextFeatures:
        """texts -> text_embeds [B, Dproj] (normalised), token states [B, L, Dt], mask [B, L]."""
        if not 2 <= max_length <= self.max_positions:
            raise ValueError(f"max_length must be between 2 and {self.max_positions} for this CLIP, got {max_length}")
        encoded = self.tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                                 return_tensors="pt")
        input_ids = encoded["input_ids"].to(self.device)       # [B, L]
        mask = encoded["attention_mask"].to(self.device)       # [B, L]
        output = self.model.text_model(input_ids=input_ids, attention_mask=mask)
        text_embeds = F.normalize(self.model.text_projection(output.pooler_output), dim=-1)  # [B, Dproj]
        return TextFeatures(global_=text_embeds, tokens=output.last_hidden_state, mask=mask.bool())

    def encode_images(self, images: list[Image.Image]) -> ImageFeatures:
        return self.encode_pixels(pixels_from_images(images, self.image_size, self.image_mean, self.image_std))

    def encode_blank_images(self, count: int) -> ImageFeatures:
        """The release's missing image: an all-zero tensor *after* normalisation, encoded like a real one."""
        return self.encode_pixels(torch.zeros(count, 3, self.image_size, self.image_size))

    def encode_pixels(self, pixels: torch.Tensor) -> ImageFeatures:
        """pixels [B, 3, S, S] -> image_embeds [B, Dproj] (normalised), vision states [B, P, Dp]."""
        output = self.model.vision_model(pixel_values=pixels.to(self.device))
        image_embeds = F.normalize(self.model.visual_projection(output.pooler_output), dim=-1)  # [B, Dproj]
        return ImageFeatures(global_=image_embeds, patches=output.last_hidden_state)


def create_random_clip(directory: Path, *, seed: int = 0, text_width: int = 32, vision_width: int = 48,
                       projection_dim: int = 32, image_size: int = 224, patch_size: int = 32) -> Path:
    """Save a tiny randomly initialised CLIP (2 layers per tower, ASCII character vocabulary) to `directory`.

    For tests and offline demos of the CLIP code path: real CLIP architecture and preprocessing, no download.
    """
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in map(chr, range(33, 127)):   # printable ASCII, inside and at the end of a word
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": text_width, "intermediate_size": 2 * text_width,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": vision_width, "intermediate_size": 2 * vision_width, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": image_size, "patch_size": patch_size},
        projection_dim=projection_dim)
    torch.manual_seed(seed)
    directory = Path(directory)
    CLIPModel(config).save_pretrained(directory)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(directory)
    return directory


def _require_safetensors(directory: Path) -> None:
    """Refuse a local checkpoint directory whose weights exist only as pickle files, naming them and the fix."""
    if not directory.is_dir() or any((directory / name).is_file() for name in SAFETENSORS_FILES):
        return
    pickles = sorted(path.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for path in directory.glob(pattern))
    if pickles:
        raise MmelError(f"{directory / pickles[0]}: CLIP weights stored as pickle, which can run code when loaded; "
                        "mmel reads model.safetensors only. Download the checkpoint's safetensors weights (the "
                        "OpenAI CLIP repositories publish model.safetensors), or, if you trust this file, convert it "
                        "once: CLIPModel.from_pretrained(dir, use_safetensors=False).save_pretrained(dir)")


def _image_normalisation(directory: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std from the checkpoint's preprocessor config when it has one, else CLIP's."""
    config_path = directory / PREPROCESSOR_FILE
    if not config_path.is_file():
        return CLIP_IMAGE_MEAN, CLIP_IMAGE_STD
    config = read_json(config_path)
    return (tuple(config.get("image_mean", CLIP_IMAGE_MEAN)), tuple(config.get("image_std", CLIP_IMAGE_STD)))


def _state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


__all__ = ["CLIP_IMAGE_MEAN", "CLIP_IMAGE_STD", "DEFAULT_CLIP", "CLIPBackbone", "create_random_clip"]
