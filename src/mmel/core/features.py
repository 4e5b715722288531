"""The feature tensors every model reads (spec models.md §1.2), for B mentions or B entities.

Shapes use: B items, L text tokens (padded to max_text_length), Dt text width,
Dg global image width, P image patches (+CLS where the backbone has one), Dp patch width.

A missing image is the normal case in MEL data. Rows without an image carry the backbone's
features of an all-zero pixel tensor (exactly what the published MIMIC/M3EL code encodes) and
`has_image = False`, so a model can either use them as the release does or mask them out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np
import torch


@dataclass
class FeatureBatch:
    text_global: torch.Tensor    # [B, Dt]     pooled / projected sentence vector
    text_tokens: torch.Tensor    # [B, L, Dt]  token states (pads included)
    text_mask: torch.Tensor      # [B, L]      bool, True for real tokens
    image_global: torch.Tensor   # [B, Dg]     pooled / projected image vector
    image_patches: torch.Tensor  # [B, P, Dp]  patch or grid tokens
    has_image: torch.Tensor      # [B]         bool

    def __len__(self) -> int:
        return self.text_global.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FeatureBatch:
        """Move to a device; `dtype` applies to the floating-point tensors only."""
        moved = {}
        for item in fields(self):
            tensor = getattr(self, item.name)
            cast = dtype if dtype is not None and tensor.is_floating_point() else None
            moved[item.name] = tensor.to(device=device, dtype=cast)
        return FeatureBatch(**moved)

    def select(self, rows: torch.Tensor | slice | list[int]) -> FeatureBatch:
        """The sub-batch at `rows` (an index tensor, list or slice)."""
        return FeatureBatch(**{item.name: getattr(self, item.name)[rows] for item in fields(self)})

    @staticmethod
    def concat(batches: list[FeatureBatch]) -> FeatureBatch:
        if not batches:
            raise ValueError("FeatureBatch.concat needs at least one batch")
        return FeatureBatch(**{item.name: torch.cat([getattr(b, item.name) for b in batches])
                               for item in fields(FeatureBatch)})

    @property
    def dims(self) -> dict[str, int]:
        """Widths a model is configured with: text, image global, image patch."""
        return {"text_dim": self.text_tokens.shape[-1], "image_global_dim": self.image_global.shape[-1],
                "image_patch_dim": self.image_patches.shape[-1]}


class FeatureTable(Protocol):
    """Features of an ordered list of items (a KB in row order, or a split in file order).

    Implementations may be memory-mapped (`mmel.features.store`) or in memory (below); `gather`
    returns float32 CPU tensors whatever the storage dtype.
    """

    def __len__(self) -> int: ...

    def gather(self, rows: Sequence[int] | np.ndarray) -> FeatureBatch: ...

    def text_global_matrix(self) -> np.ndarray:
        """[N, Dt] global text vectors (possibly memory-mapped), for dense first-stage retrieval."""
        ...


class InMemoryFeatureTable:
    """A FeatureTable over one FeatureBatch held in memory (tests, small KBs, on-the-fly encoding)."""

    def __init__(self, batch: FeatureBatch):
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch)

    def gather(self, rows: Sequence[int] | np.ndarray) -> FeatureBatch:
        index = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        return self.batch.select(index).to(dtype=torch.float32)

    def text_global_matrix(self) -> np.ndarray:
        return self.batch.text_global.float().numpy()


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """[rows, width] float32 rows scaled to unit length (an all-zero row stays zero), for cosine scores."""
    matrix = np.asarray(vectors, dtype=np.float32)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
