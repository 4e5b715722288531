"""Random inputs for the model tests: feature batches of any widths, and models whose every parameter is random.

Imported by the test modules of this folder (pytest puts it on the path); nothing here is a test.
"""

from __future__ import annotations

import torch

from mmel.core.features import FeatureBatch, PooledView
from mmel.models.base import MelModel

CLIP_DIMS = {"text_dim": 512, "image_global_dim": 512, "image_patch_dim": 768}
OFFLINE_DIMS = {"text_dim": 384, "image_global_dim": 1280, "image_patch_dim": 1280}


def random_features(count: int, dims: dict[str, int], *, length: int = 40, patches: int = 50, seed: int = 0,
                    has_image: list[bool] | None = None, dtype: torch.dtype = torch.float32,
                    has_caption: list[bool] | bool | None = None) -> FeatureBatch:
    """B = `count` rows of random features; with `has_caption` (True: every row has one), DIM's pooled `mention`
    and `caption` views too (an absent caption carries a zero vector, as the feature store writes it)."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype)

    batch = FeatureBatch(
        text_global=draw(count, dims["text_dim"]),
        text_tokens=draw(count, length, dims["text_dim"]),
        text_mask=torch.ones(count, length, dtype=torch.bool),
        image_global=draw(count, dims["image_global_dim"]),
        image_patches=draw(count, patches, dims["image_patch_dim"]),
        has_image=torch.tensor(has_image if has_image is not None else [True] * count),
    )
    if has_caption is not None:
        present = torch.tensor([has_caption] * count if isinstance(has_caption, bool) else has_caption)
        batch.views = {"mention": PooledView(draw(count, dims["text_dim"]), torch.ones(count, dtype=torch.bool)),
                       "caption": PooledView(draw(count, dims["text_dim"]) * present[:, None], present)}
    return batch


def randomise(model: MelModel, *, seed: int = 0, scale: float = 0.2, dtype: torch.dtype = torch.float32) -> MelModel:
    """`model` with every parameter (LayerNorms included) drawn at random, so no term hides behind an identity."""
    torch.manual_seed(seed)
    model = model.to(dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * scale)
    return model


class ReferenceWeights:
    """A model's state dict read by the spec references: plain Linear and LayerNorm formulas, no nn.Module."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        self.w = weights

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ self.w[f"{name}.weight"].T + self.w[f"{name}.bias"]

    def layer_norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        variance = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(variance + 1e-5) * self.w[f"{name}.weight"] + self.w[f"{name}.bias"]
