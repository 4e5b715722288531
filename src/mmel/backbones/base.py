"""The one interface every backbone implements (text -> vectors/tokens, image -> vector/patches)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from mmel.core.config import ConfigBase, ConfigError

# How a Linker runs the backbone on its QUERIES (entity features are always the exact float32 ones):
#   float32   - the PyTorch network itself, bit for bit the features the store holds
#   onnx      - both networks in ONNX Runtime, float32 (same numbers up to ~1e-5)
#   onnx-int8 - ONNX Runtime, text network int8 (dynamic quantization), image network float32
#   auto      - the backbone's fastest runtime that loses no accuracy (see `query_backbone`)
QUERY_RUNTIMES = ("auto", "float32", "onnx", "onnx-int8")


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


@dataclass
class BackboneConfig(ConfigBase):
    """How a loaded backbone encodes queries: `query_runtime` (QUERY_RUNTIMES) and where exported files live.

    `onnx_cache_dir` None: `$MMEL_CACHE_DIR/onnx`, else `~/.cache/mmel/onnx`.
    """

    query_runtime: str = "auto"
    onnx_cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.query_runtime not in QUERY_RUNTIMES:
            raise ConfigError(f"BackboneConfig.query_runtime must be one of {', '.join(QUERY_RUNTIMES)}, "
                              f"got {self.query_runtime!r}")


def pixels_from_images(images: Sequence[Image.Image], size: int, mean: Sequence[float],
                       std: Sequence[float]) -> torch.Tensor:
    """MIMIC's image pipeline: resize to `size` x `size` (LANCZOS, aspect not kept), scale to [0, 1], normalise.

    Returns [B, 3, size, size] float32. An empty list gives [0, 3, size, size].
    """
    arrays = [np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
              for image in images]
    stacked = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), dtype=np.float32)  # [B, S, S, 3]
    pixels = torch.from_numpy(stacked).permute(0, 3, 1, 2) / 255.0                          # [B, 3, S, S]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((pixels - mean_t) / std_t).contiguous()


def make_fingerprint(name: str, identity: dict[str, object]) -> str:
    """`<name>-<16 hex>` from a JSON-able description of weights and preprocessing."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()
    return f"{name}-{digest[:16]}"
