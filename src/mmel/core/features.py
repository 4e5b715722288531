"""The feature tensors every model reads (spec models.md §1.2), for B mentions or B entities.

Shapes use: B items, L text tokens (padded to max_text_length), Dt text width,
Dg global image width, P image patches (+CLS where the backbone has one), Dp patch width.

A missing image is the normal case in MEL data. Rows without an image carry the backbone's
features of an all-zero pixel tensor (exactly what the published MIMIC/M3EL code encodes) and
`has_image = False`, so a model can either use them as the release does or mask them out.

Text comes in named views (`mmel.features.templates.TEXT_VIEWS`: `mention`, `mention_sentence`,
`caption`, `name`, `name_attr`, `name_desc`, `desc`). A batch carries its *primary* view in full
(global vector and token states, the `text_*` fields) and any further views the model asks for as
pooled vectors in `views`, each with a `present` flag: a mention without a caption, or an entity
without a description, has `present = False` and a zero vector, never the encoding of an empty
string. `FeatureViews` is what a model declares it reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol

import numpy as np
import torch

from mmel.core.errors import NotFoundError


@dataclass(frozen=True)
class FeatureViews:
    """The named text views a model reads (see the module doc); `ModelSpec` and the feature store check them.

    mention / entity:             the primary view of each side (global vector and token states)
    mention_extra / entity_extra: further views, pooled vectors only
    """

    mention: str = "mention_sentence"
    entity: str = "name_attr"
    mention_extra: tuple[str, ...] = ()
    entity_extra: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {"mention": self.mention, "entity": self.entity, "mention_extra": list(self.mention_extra),
                "entity_extra": list(self.entity_extra)}


@dataclass
class PooledView:
    """One further text view of B items: its pooled vector, and whether the item has that text at all."""

    global_: torch.Tensor   # [B, Dt]  zero where `present` is False
    present: torch.Tensor   # [B]      bool

    def __len__(self) -> int:
        return self.global_.shape[0]


@dataclass
class FeatureBatch:
    text_global: torch.Tensor    # [B, Dt]     pooled / projected vector of the primary text view
    text_tokens: torch.Tensor    # [B, L, Dt]  token states (pads included)
    text_mask: torch.Tensor      # [B, L]      bool, True for real tokens
    image_global: torch.Tensor   # [B, Dg]     pooled / projected image vector
    image_patches: torch.Tensor  # [B, P, Dp]  patch or grid tokens
    has_image: torch.Tensor      # [B]         bool
    views: dict[str, PooledView] = field(default_factory=dict)   # further named views, pooled

    def __len__(self) -> int:
        return self.text_global.shape[0]

    def _tensor_fields(self) -> list[str]:
        return [item.name for item in fields(self) if item.name != "views"]

    def map_tensors(self, function) -> FeatureBatch:
        """A batch with `function` applied to every tensor, the views' included."""
        views = {name: PooledView(function(view.global_), function(view.present)) for name, view in self.views.items()}
        return FeatureBatch(**{name: function(getattr(self, name)) for name in self._tensor_fields()}, views=views)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FeatureBatch:
        """Move to a device; `dtype` applies to the floating-point tensors only."""
        def move(tensor: torch.Tensor) -> torch.Tensor:
            cast = dtype if dtype is not None and tensor.is_floating_point() else None
            return tensor.to(device=device, dtype=cast)
        return self.map_tensors(move)

    def select(self, rows: torch.Tensor | slice | list[int]) -> FeatureBatch:
        """The sub-batch at `rows` (an index tensor, list or slice)."""
        return self.map_tensors(lambda tensor: tensor[rows])

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """A flat name -> tensor mapping (e.g. for safetensors); views become `view.<name>.global|present`."""
        flat = {name: getattr(self, name).contiguous() for name in self._tensor_fields()}
        for name, view in self.views.items():
            flat[f"view.{name}.global"] = view.global_.contiguous()
            flat[f"view.{name}.present"] = view.present.contiguous()
        return flat

    @classmethod
    def from_tensors(cls, flat: dict[str, torch.Tensor]) -> FeatureBatch:
        """The inverse of `to_tensors`."""
        names = sorted({key.split(".")[1] for key in flat if key.startswith("view.")})
        views = {name: PooledView(flat[f"view.{name}.global"], flat[f"view.{name}.present"]) for name in names}
        return cls(**{key: value for key, value in flat.items() if not key.startswith("view.")}, views=views)

    def view(self, name: str) -> PooledView:
        """The named pooled view; a clear error names the views this batch has."""
        try:
            return self.views[name]
        except KeyError:
            raise NotFoundError(f"text view {name!r} is not in this batch (it has: {', '.join(self.views) or 'none'}); "
                           "build the features with the views the model declares") from None

    @staticmethod
    def concat(batches: list[FeatureBatch]) -> FeatureBatch:
        if not batches:
            raise ValueError("FeatureBatch.concat needs at least one batch")
        names = set(batches[0].views)
        if any(set(batch.views) != names for batch in batches):
            raise ValueError("FeatureBatch.concat needs batches with the same text views")
        views = {name: PooledView(torch.cat([b.views[name].global_ for b in batches]),
                                  torch.cat([b.views[name].present for b in batches])) for name in batches[0].views}
        return FeatureBatch(**{name: torch.cat([getattr(b, name) for b in batches])
                               for name in batches[0]._tensor_fields()}, views=views)

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
