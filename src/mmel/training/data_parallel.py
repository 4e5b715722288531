"""Data-parallel training: one global batch spread over processes, gathered back for in-batch negatives.

The models train with in-batch negatives: every mention of a batch is scored against the gold
entities of all the others. Split naively over P processes, each mention would meet only the
entities of its own process's share, a batch P times smaller, and the objective would change with
the number of devices. Instead:

1. each process loads its share of the global batch (`datamodule.GlobalBatchSampler`) and
   featurizes it (for a trainable backbone, most of the work of a step);
2. the shares' features are gathered across processes, with their gradients, into the whole
   batch in the order one process would hold it: all B mentions, their B gold entities, then every
   hard negative (`gather_train_batch`);
3. the model scores only this process's mentions against all of the batch's entities and returns
   their share of the batch loss (`MelModel.forward(..., rows=)`): the shares of all processes sum
   to the loss of the whole batch.

Why the gradient is the one-process gradient: let L = sum_p share_p. Process p backpropagates
P * share_p. Backward through the gather sums, into each process's own features, what every
process's loss sends them; Lightning's DDP then averages the parameter gradients over the P
processes. The factor P cancels that average: the result is dL/dtheta, for the head (used on every
process) and for a trainable backbone (used on each share) alike.

Letters: P processes, B mentions of the global batch, b of them in this process's share, k hard
negatives per mention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmel.core.features import FeatureBatch

Gather = Callable[[torch.Tensor], torch.Tensor]
"""Lightning's all_gather: a tensor of the same shape on every process -> [P, *shape], in process order."""


@dataclass
class GlobalBatch:
    """The whole global batch, as gathered by one process, and which of its mentions this process scores."""

    mentions: FeatureBatch     # [B] every process's mentions, in process order
    entities: FeatureBatch     # [N] their B gold entities in the same order, then every hard negative
    entity_ids: torch.Tensor   # [N] int64 KB row of each entity column
    rows: slice                # this process's mentions among `mentions`
    weight: float              # 1, or 0 for a padding share (its loss must not count)


def gather_rows(gather: Gather, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every process's rows, joined in process order: [sum(sizes), ...]; this process holds `tensor`.

    `sizes` [P] are the row counts of all processes (this one's is len(tensor)). All-gather needs
    one shape everywhere, so each share is zero-padded to the largest first. Gradients flow back to
    each process's own rows when `gather` synchronises them. Booleans travel as uint8, which every
    backend can gather.
    """
    if tensor.dtype == torch.bool:
        return gather_rows(gather, tensor.to(torch.uint8), sizes).bool()
    padded = torch.cat([tensor, tensor.new_zeros((max(sizes) - tensor.shape[0], *tensor.shape[1:]))])
    stacked = gather(padded)                                                  # [P, max(sizes), ...]
    return torch.cat([stacked[process, :size] for process, size in enumerate(sizes)])


def gather_sizes(gather: Gather, size: int, device: torch.device) -> list[int]:
    """The row count of every process, in process order."""
    return [int(count) for count in gather(torch.tensor([size], device=device)).view(-1)]


def gather_varying_rows(gather: Gather, tensor: torch.Tensor) -> torch.Tensor:
    """`gather_rows` for shares whose sizes this process does not know yet (one more all-gather)."""
    return gather_rows(gather, tensor, gather_sizes(gather, tensor.shape[0], tensor.device))


def gather_train_batch(gather: Gather, rank: int, mentions: FeatureBatch, entities: FeatureBatch,
                       entity_ids: torch.Tensor, *, padding: bool = False) -> GlobalBatch:
    """The global batch from every process's share: b mentions and their b * (1 + k) entity columns.

    A share's columns are its b gold entities, then its b * k hard negatives (k per mention, in
    mention order). Joined, the columns are put back in one process's order: all B golds (so the
    label of mention i is column i), then all hard negatives. A padding share contributes no row.
    """
    share = 0 if padding else len(mentions)
    columns_per_mention = len(entities) // len(mentions)                     # 1 + k
    sizes = gather_sizes(gather, share, entity_ids.device)
    whole_mentions = mentions.select(slice(0, share)).map_tensors(lambda tensor: gather_rows(gather, tensor, sizes))
    column_sizes = [size * columns_per_mention for size in sizes]
    own_columns = slice(0, share * columns_per_mention)
    whole_entities = entities.select(own_columns).map_tensors(
        lambda tensor: gather_rows(gather, tensor, column_sizes))
    whole_ids = gather_rows(gather, entity_ids[own_columns], column_sizes)
    order = _one_process_column_order(sizes, columns_per_mention, entity_ids.device)
    start = sum(sizes[:rank])
    rows = slice(0, 1) if padding else slice(start, start + share)
    return GlobalBatch(whole_mentions, whole_entities.select(order), whole_ids[order], rows,
                       weight=0.0 if padding else 1.0)


def _one_process_column_order(sizes: list[int], columns_per_mention: int, device: torch.device) -> torch.Tensor:
    """[N] positions in the gathered columns (per process: golds, then negatives) of golds first, then negatives."""
    golds, negatives, start = [], [], 0
    for size in sizes:
        golds.append(torch.arange(start, start + size, device=device))
        negatives.append(torch.arange(start + size, start + size * columns_per_mention, device=device))
        start += size * columns_per_mention
    return torch.cat(golds + negatives)


__all__ = ["Gather", "GlobalBatch", "gather_rows", "gather_sizes", "gather_train_batch", "gather_varying_rows"]
