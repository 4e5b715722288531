"""Typed model outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MatchOutput:
    """Scores of B mentions against N entities.

    scores:      [B, N] the model's final score (what ranking uses)
    unit_scores: name -> [B, N] per-unit scores (e.g. MIMIC's "tglu", "vdlu", "cmfu")
    loss:        scalar training loss when labels were given, else None
    """

    scores: torch.Tensor
    unit_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    loss: torch.Tensor | None = None
    unit_losses: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def concat(parts: list[MatchOutput], dim: int) -> MatchOutput:
        """Scores and unit scores of chunks joined along `dim` (1: entity chunks, 0: mention chunks)."""
        if len(parts) == 1:
            return parts[0]
        return MatchOutput(scores=torch.cat([p.scores for p in parts], dim=dim),
                           unit_scores={name: torch.cat([p.unit_scores[name] for p in parts], dim=dim)
                                        for name in parts[0].unit_scores})
