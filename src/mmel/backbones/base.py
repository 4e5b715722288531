"""The one interface every backbone implements (text -> vectors/tokens, image -> vector/patches)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from PIL import Image


@dataclass
class TextFeatures:
    global_: torch.Tensor  # [B, Dt]
    tokens: torch.Tensor   # [B, L, Dt]  L = max_length (padding="max_length")
    mask: torch.Tensor     # [B, L] bool


@dataclass
class ImageFeatures:
    global_: torch.Tensor  # [B, Dg]
    patches: torch.Tensor  # [B, P, Dp]


@runtime_checkable
class Backbone(Protocol):
    """A frozen or trainable pair of encoders.

    `fingerprint` identifies the weights and preprocessing (it keys the feature store and is
    written into checkpoints and indexes, so that mismatched artifacts refuse to load together).
    """

    name: str
    text_dim: int
    image_global_dim: int
    image_patch_dim: int
    num_patches: int
    image_size: int

    @property
    def fingerprint(self) -> str: ...

    def encode_texts(self, texts: list[str], max_length: int) -> TextFeatures: ...

    def encode_images(self, images: list[Image.Image]) -> ImageFeatures: ...

    def encode_blank_images(self, count: int) -> ImageFeatures:
        """Features of an all-zero (normalised) pixel tensor: the release's stand-in for a missing image."""
        ...
