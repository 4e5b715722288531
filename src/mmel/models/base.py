"""MelModel: the save/load contract every published model implements.

A model reads `FeatureBatch`es (never a backbone), so one class runs on any backbone whose
widths match its config. Entity-side work that does not depend on the mention is split out
(`encode_entities`) so that ranking a whole KB computes it once per KB, not once per batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from mmel.core.checkpoint import read_checkpoint_header, read_checkpoint_weights, save_checkpoint
from mmel.core.config import ConfigBase
from mmel.core.errors import MismatchError
from mmel.core.features import FeatureBatch
from mmel.models.outputs import MatchOutput

M = TypeVar("M", bound="MelModel")


class MelModel(nn.Module):
    config_class: ClassVar[type[ConfigBase]]

    def __init__(self, config: ConfigBase):
        super().__init__()
        self.config = config

    # --- scoring contract -------------------------------------------------------------------
    def encode_entities(self, entities: FeatureBatch) -> Any:
        """Everything about the N entities that does not depend on a mention (a model-specific cache)."""
        raise NotImplementedError

    def encode_mentions(self, mentions: FeatureBatch) -> Any:
        """Everything about the B mentions that does not depend on an entity."""
        raise NotImplementedError

    def match(self, mentions: Any, entities: Any) -> MatchOutput:
        """Score encoded mentions [B] against encoded entities [N] -> MatchOutput with [B, N] scores."""
        raise NotImplementedError

    def match_candidates(self, mentions: Any, entities: Any, candidates: torch.Tensor) -> MatchOutput:
        """Scores [B, K]: encoded mention b against its own candidates, the entity rows `candidates[b]` ([B, K]).

        This generic version scores one mention at a time; models override it with a batched one.
        """
        rows = [self.match(mentions.select([b]), entities.select(torch.as_tensor(candidates[b])))
                for b in range(len(candidates))]
        return MatchOutput(scores=torch.cat([row.scores for row in rows]),
                           unit_scores={name: torch.cat([row.unit_scores[name] for row in rows])
                                        for name in rows[0].unit_scores})

    def forward(self, mentions: FeatureBatch, entities: FeatureBatch, labels: torch.Tensor | None = None,
                entity_ids: torch.Tensor | None = None) -> MatchOutput:
        """Scores, plus the training loss when `labels` [B] (gold column per row) are given.

        `entity_ids` [N] names the entity of each column (e.g. its KB row), so a model can tell
        a duplicate of a row's gold entity from a true negative.
        """
        raise NotImplementedError

    # --- persistence ------------------------------------------------------------------------
    def save_pretrained(self, directory: Path, *, metadata: dict[str, Any] | None = None,
                        card: str | None = None) -> Path:
        return save_checkpoint(directory, model_type=self.config_class.model_type, config=self.config.to_dict(),
                               state_dict=self.state_dict(), metadata=metadata, card=card)

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
