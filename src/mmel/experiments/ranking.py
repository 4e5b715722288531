"""Exhaustive ranking of mentions against a whole KB with a trained model (the papers' protocol).

`ModelScorer` computes everything that depends on the entity alone once per KB
(`MelModel.encode_entities`) and only the mention-entity interaction per block, unlike the
published evaluation, which re-runs every unit for every mention batch (`NaiveModelScorer`
keeps that behaviour as the reference for benchmarks and equivalence tests). Two-stage ranking
is not here: it is the served linker's (`mmel.retrieval.linker.Linker.rank_features`).

Letters: M mentions, N entities, b mentions in a block, n entities in a block.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmel.core.features import FeatureTable
from mmel.models.base import MelModel


class ModelScorer:
    """Scores with a MelModel; the entity side is encoded once, the mention side once per block of rows."""

    def __init__(self, model: MelModel, entities: FeatureTable, mentions: FeatureTable, *,
                 encode_batch_size: int = 1024, progress: bool = True, entity_cache: Any = None):
        """`entity_cache`: the model's cache of `entities`, when already computed (e.g. for another split)."""
        self.model = model.eval()
        self.entities = entities
        self.mentions = mentions
        self.encode_batch_size = encode_batch_size
        self.progress = progress
        self._entity_cache = entity_cache
        self._mention_rows: np.ndarray | None = None
        self._mention_cache = None

    @property
    def entity_cache(self):
        """The model's per-entity cache for the whole KB, computed on first use."""
        if self._entity_cache is None:
            self._entity_cache = self._encode_all_entities()
        return self._entity_cache

    @torch.inference_mode()
    def _encode_all_entities(self):
        starts = range(0, len(self.entities), self.encode_batch_size)
        parts = [self.model.encode_entities(self.entities.gather(np.arange(s, min(s + self.encode_batch_size,
                                                                                   len(self.entities)))))
                 for s in tqdm(starts, desc="encoding KB (entity side)", unit="batch", disable=not self.progress)]
        return self.model.entity_cache_class.concat(parts)

    @torch.inference_mode()
    def encoded_mentions(self, mention_rows: np.ndarray):
        """The model's mention cache for `mention_rows` (kept for the next call with the same rows)."""
        if self._mention_rows is None or not np.array_equal(self._mention_rows, mention_rows):
            self._mention_cache = self.model.encode_mentions(self.mentions.gather(mention_rows))
            self._mention_rows = np.array(mention_rows, copy=True)
        return self._mention_cache

    @torch.inference_mode()
    def score_block(self, mention_rows: np.ndarray, start: int, stop: int) -> torch.Tensor:
        """[b, n] scores of mentions `mention_rows` against entity rows [start, stop)."""
        mentions = self.encoded_mentions(mention_rows)
        return self.model.match(mentions, self.entity_cache.select(slice(start, stop))).scores


class NaiveModelScorer:
    """The published evaluation's cost model: every block re-encodes its entities and mentions (reference)."""

    def __init__(self, model: MelModel, entities: FeatureTable, mentions: FeatureTable):
        self.model = model.eval()
        self.entities = entities
        self.mentions = mentions

    @torch.inference_mode()
    def score_block(self, mention_rows: np.ndarray, start: int, stop: int) -> torch.Tensor:
        mentions = self.mentions.gather(mention_rows)
        entities = self.entities.gather(np.arange(start, stop))
        return self.model(mentions, entities).scores


__all__ = ["ModelScorer", "NaiveModelScorer"]
