"""The model contract every published model implements: config, views, row caches, scoring, save/load.

A model reads `FeatureBatch`es (never a backbone), so one class runs on any backbone whose
widths match its config. Scoring is split in three so that ranking a KB computes each side once:

    encode_entities(FeatureBatch [N]) -> entity RowCache [N]      once per KB (the index stores it)
    encode_mentions(FeatureBatch [B]) -> mention RowCache [B]     once per mention batch
    match(mentions [B], entities [N]) -> MatchOutput [B, N]       every pair (exhaustive ranking)
    match_candidates(mentions [B], entities [U], candidates [B, K]) -> MatchOutput [B, K]
                                                                  each mention's own candidates (reranking)

A `RowCache` is a dataclass of tensors with one row per item, declared with `cache_field`, whose
shape letters the model resolves from its config (`cache_sizes`): the index knows the layout of
the entity cache from the class alone, before anything is encoded. A model also declares which
named text views it reads (`feature_views`), and the unit names of its `MatchOutput`.

Adding a model: one file with a `MelModelConfig` subclass, its caches and a `MelModel` subclass,
plus one line in `mmel.models.MODELS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from mmel.core.checkpoint import read_checkpoint_header, read_checkpoint_weights, save_checkpoint
from mmel.core.config import ConfigBase, ConfigError
from mmel.core.errors import MismatchError
from mmel.core.features import FeatureBatch, FeatureViews
from mmel.models.outputs import MatchOutput

M = TypeVar("M", bound="MelModel")
R = TypeVar("R", bound="RowCache")

CacheShape = tuple[tuple[int, ...], str]
"""The trailing shape of one cache field (after the row axis) and its kind, 'float' or 'bool'."""


def cache_field(*dims: str, kind: str = "float") -> Any:
    """A RowCache field whose tensor is [rows, *dims]; dims are shape letters the model resolves (`cache_sizes`)."""
    if kind not in ("float", "bool"):
        raise ValueError(f"cache field kind must be 'float' or 'bool', got {kind!r}")
    return dataclasses.field(metadata={"dims": dims, "kind": kind})


@dataclass
class RowCache:
    """Tensors with one row per mention or entity, sliced, joined and moved along that row axis.

    Scoring may pair a cache with a leading pairing axis (`paired`): [1, N, ...] when every
    mention meets the same N entities, or [B, K, ...] after `select` with a [B, K] index tensor.
    """

    def __len__(self) -> int:
        return getattr(self, dataclasses.fields(self)[0].name).shape[0]

    def _apply(self: R, function) -> R:
        return type(self)(**{item.name: function(getattr(self, item.name)) for item in dataclasses.fields(self)})

    def select(self: R, rows: torch.Tensor | slice | list[int]) -> R:
        """Rows `rows` (a slice, list, [K] or [B, K] index tensor; the last adds a pairing axis)."""
        return self._apply(lambda tensor: tensor[rows])

    def paired(self: R) -> R:
        """Every tensor with a leading pairing axis of size 1 ([N, ...] -> [1, N, ...])."""
        return self._apply(lambda tensor: tensor.unsqueeze(0))

    def to(self: R, device: torch.device | str) -> R:
        return self._apply(lambda tensor: tensor.to(device))

    @classmethod
    def concat(cls: type[R], caches: list[R]) -> R:
        if not caches:
            raise ValueError(f"{cls.__name__}.concat needs at least one cache")
        return cls(**{item.name: torch.cat([getattr(c, item.name) for c in caches])
                      for item in dataclasses.fields(cls)})

    @classmethod
    def layout(cls, sizes: Mapping[str, int]) -> dict[str, CacheShape]:
        """Each field's trailing shape and kind, its shape letters resolved by `sizes`."""
        shapes = {}
        for item in dataclasses.fields(cls):
            if "dims" not in item.metadata:
                raise TypeError(f"{cls.__name__}.{item.name} is not declared with cache_field(...)")
            unknown = [letter for letter in item.metadata["dims"] if letter not in sizes]
            if unknown:
                raise KeyError(f"{cls.__name__}.{item.name}: no size for shape letter(s) {unknown}")
            shapes[item.name] = (tuple(int(sizes[letter]) for letter in item.metadata["dims"]), item.metadata["kind"])
        return shapes


def pair_dot(mention_vectors: torch.Tensor, entity_vectors: torch.Tensor) -> torch.Tensor:
    """[B, D] against entity vectors with a pairing axis, [1, N, D] or [B, K, D] (see `RowCache`) -> [B, N | K]."""
    if entity_vectors.shape[0] == 1:
        return mention_vectors @ entity_vectors[0].T
    return torch.einsum("bd,bnd->bn", mention_vectors, entity_vectors)


@dataclass
class MelModelConfig(ConfigBase):
    """What every model config has: the widths of the features it reads (a backbone's widths).

    text_dim:         width of the text vectors and token states (t_cls, t_tok)
    image_global_dim: width of the global image vector
    image_patch_dim:  width of the image patch/grid tokens
    """

    text_dim: int = 512            # CLIP ViT-B/32 text width (models.md §1.2)
    image_global_dim: int = 512    # CLIP image_embeds
    image_patch_dim: int = 768     # CLIP vision width

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name.endswith("_dim") and value <= 0:
                raise ConfigError(f"{type(self).__name__}.{item.name} must be positive, got {value}")

    @property
    def widths(self) -> dict[str, int]:
        """The feature widths, keyed as `FeatureBatch.dims` keys them."""
        return {"text_dim": self.text_dim, "image_global_dim": self.image_global_dim,
                "image_patch_dim": self.image_patch_dim}


class MelModel(nn.Module):
    config_class: ClassVar[type[MelModelConfig]]
    entity_cache_class: ClassVar[type[RowCache]]
    mention_cache_class: ClassVar[type[RowCache]]
    unit_names: ClassVar[tuple[str, ...]] = ()     # keys of MatchOutput.unit_scores, in display order

    def __init__(self, config: MelModelConfig):
        super().__init__()
        self.config = config

    # --- what the model reads and stores ----------------------------------------------------
    def feature_views(self) -> FeatureViews:
        """The named text views this model reads (default: MIMIC's `mention [SEP] sentence` / `name [SEP] attr`)."""
        return FeatureViews()

    def cache_sizes(self, text_length: int, image_tokens: int) -> dict[str, int]:
        """Sizes of the shape letters in this model's cache fields, for features of that length / token count."""
        return {"L": text_length, "P": image_tokens, "Dt": self.config.text_dim,
                "Dg": self.config.image_global_dim, "Dp": self.config.image_patch_dim}

    def entity_cache_layout(self, text_length: int, image_tokens: int) -> dict[str, CacheShape]:
        """The layout of `encode_entities`' output, known before anything is encoded."""
        return self.entity_cache_class.layout(self.cache_sizes(text_length, image_tokens))

    def check_widths(self, batch: FeatureBatch) -> None:
        """Refuse features whose widths differ from the config's, naming both."""
        found = {**batch.dims, "text_global_dim": batch.text_global.shape[-1]}
        expected = {**self.config.widths, "text_global_dim": self.config.text_dim}
        if found != expected:
            raise MismatchError(f"features have widths {found} but this {type(self).__name__} expects {expected}; "
                                "use features from the backbone the model was trained with")

    # --- optional: a dual encoder's vectors ------------------------------------------------------
    def retrieval_vectors(self, entities: RowCache) -> torch.Tensor | None:
        """[N, D] vectors whose inner product with `query_vectors` is `match`'s score, or None (default).

        A model whose score is one inner product per pair (DIM's cosine) returns them, so an index
        can search the model's own scores exactly with FAISS and skip reranking.
        """
        return None

    def query_vectors(self, mentions: RowCache) -> torch.Tensor | None:
        """[B, D] the mention side of `retrieval_vectors`, or None (default)."""
        return None

    # --- scoring contract -------------------------------------------------------------------
    def encode_entities(self, entities: FeatureBatch) -> RowCache:
        """Everything about the N entities that does not depend on a mention."""
        raise NotImplementedError

    def encode_mentions(self, mentions: FeatureBatch) -> RowCache:
        """Everything about the B mentions that does not depend on an entity."""
        raise NotImplementedError

    def match(self, mentions: RowCache, entities: RowCache) -> MatchOutput:
        """Score encoded mentions [B] against encoded entities [N] -> MatchOutput with [B, N] scores."""
        raise NotImplementedError

    def match_candidates(self, mentions: RowCache, entities: RowCache, candidates: torch.Tensor) -> MatchOutput:
        """Scores [B, K]: encoded mention b against its own candidates, the entity rows `candidates[b]` ([B, K]).

        This generic version scores one mention at a time; models override it with a batched one.
        """
        rows = [self.match(mentions.select([b]), entities.select(torch.as_tensor(candidates[b])))
                for b in range(len(candidates))]
        return MatchOutput(scores=torch.cat([row.scores for row in rows]),
                           unit_scores={name: torch.cat([row.unit_scores[name] for row in rows])
                                        for name in rows[0].unit_scores})

    def forward(self, mentions: FeatureBatch, entities: FeatureBatch, labels: torch.Tensor | None = None,
                entity_ids: torch.Tensor | None = None, rows: slice | None = None) -> MatchOutput:
        """Scores, plus the training loss when `labels` [B] (gold column per row) are given.

        `entity_ids` [N] names the entity of each column (e.g. its KB row), so a model can tell
        a duplicate of a row's gold entity from a true negative.

        `rows` is for data-parallel training, where each process owns a share of the batch: the
        inputs and labels still describe the whole batch (so in-batch negatives and the means' row
        counts are the batch's), but only the mentions `rows` are scored, [b, N], and the loss is
        their share of the batch loss, such that the shares of all processes sum to it. A model
        without this parameter trains on one device only.
        """
        raise NotImplementedError

    # --- persistence ------------------------------------------------------------------------
    def save_pretrained(self, directory: Path, *, metadata: dict[str, Any] | None = None,
                        card: str | None = None, extra_files: dict[str, bytes] | None = None) -> Path:
        return save_checkpoint(directory, model_type=self.config_class.model_type, config=self.config.to_dict(),
                               state_dict=self.state_dict(), metadata=metadata, card=card, extra_files=extra_files)

    @classmethod
    def from_pretrained(cls: type[M], directory: Path) -> M:
        header = read_checkpoint_header(directory, expected_model_type=cls.config_class.model_type)
        model = cls(cls.config_class.from_dict(header["config"]))
        model.load_weights(read_checkpoint_weights(directory), source=directory)
        model.checkpoint_header = header
        return model.eval()

    def load_weights(self, state: dict[str, torch.Tensor], *, source: object = "weights") -> None:
        """Strict load that reports missing, unexpected and mis-shaped keys in one message."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        misshaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                           for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or misshaped:
            raise MismatchError(f"{source}: weights do not fit {type(self).__name__}; missing: {missing or 'none'}; "
                                f"unexpected: {unexpected or 'none'}; shape mismatches: {misshaped or 'none'}")
        self.load_state_dict(state, strict=True)
