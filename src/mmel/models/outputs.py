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
