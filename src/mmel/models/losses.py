"""Loss pieces every model's training objective shares (infrastructure, not any paper's unit).

Shapes: B rows (mentions), N columns (entities); `labels` [B] is each row's gold column.

Data-parallel training splits a batch's rows over processes (`MelModel.forward(..., rows=)`): a
process computes the terms of its rows only, and a mean over the batch becomes a sum over those
rows divided by the batch's count (`total`), so that the processes' shares add up to the mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmel.core.errors import UsageError


def same_entity_columns(labels: torch.Tensor, entity_ids: torch.Tensor, num_columns: int) -> torch.Tensor:
    """[B, N] bool: column n holds the same entity as row b's gold column (its own gold column included).

    `entity_ids` [N] names the entity of each column (e.g. its KB row): when two mentions of a
    batch share a gold entity, the other copy is not a true negative.
    """
    if entity_ids.shape != (num_columns,):
        raise UsageError(f"entity_ids must have shape ({num_columns},), got {tuple(entity_ids.shape)}")
    entity_ids = entity_ids.to(labels.device)
    return entity_ids[None, :] == entity_ids[labels][:, None]


def usable_columns(labels: torch.Tensor, num_columns: int, entity_ids: torch.Tensor | None) -> torch.Tensor:
    """[B, N] bool: the columns that may enter row b's softmax (copies of its gold left out when ids are given)."""
    usable = torch.ones((len(labels), num_columns), dtype=torch.bool, device=labels.device)
    if entity_ids is None:
        return usable
    is_label = torch.arange(num_columns, device=labels.device)[None, :] == labels[:, None]
    return ~same_entity_columns(labels, entity_ids, num_columns) | is_label


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, usable: torch.Tensor,
                         rows: torch.Tensor | None = None, *, total: int | torch.Tensor | None = None
                         ) -> torch.Tensor:
    """Mean CE over `rows` ([B] bool; all rows if None) with unusable columns removed; 0 when no row is left.

    With `total`, the CE summed over those rows and divided by `total` instead: the share of these
    rows in a mean over `total` rows of which they are a part (see the module docstring).
    """
    masked = logits.masked_fill(~usable, float("-inf"))
    if rows is not None:
        masked, labels = masked[rows], labels[rows]
    if total is None:
        total = len(labels)
    if len(labels) == 0 or not bool(total):
        return logits.sum() * 0.0  # a zero that stays in the graph, so backward works on any batch
    return F.cross_entropy(masked, labels, reduction="sum") / total


__all__ = ["masked_cross_entropy", "same_entity_columns", "usable_columns"]
