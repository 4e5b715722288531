"""MelSystem: the LightningModule that trains any MelModel; the model itself stays a plain nn.Module.

Three ways to get features, one system:
- frozen backbone: batches carry `FeatureBatch`es read from the feature store, only the model trains;
- top text layers (`backbone.train_text_layers`): the stored features hold the token states of a lower
  text layer, and `TopTextLayers` runs the layers above them, trained with the model;
- end to end (the paper's recipe, models.md §1.2): batches carry texts and images (`ItemBatch`),
  which `BackboneEncoder` turns into features with gradients, so the backbone trains with the model.

Validation is the release's protocol (§1.9): encode the whole KB once per validation run (the
entity-side cache of the model), then rank each dev mention against every entity and log dev
MRR and Hits@k (`val/mrr`, `val/hits@1`, ...), with ties counted against the gold entity.

On several processes, each trains on its share of every global batch against the whole batch's
entities (`mmel.training.data_parallel`), and ranks its part of the dev mentions; the ranks are
gathered before the metrics, so both the objective and the dev metrics are those of one process.
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mmel.backbones.base import Backbone
from mmel.backbones.text_layers import TopTextLayers
from mmel.core.errors import UsageError
from mmel.core.features import FeatureBatch
from mmel.evaluation import rank_full_kb, ranking_metrics, ranks_from_counts
from mmel.features.encoding import encode_items
from mmel.models.base import MelModel
from mmel.models.losses import masked_cross_entropy, usable_columns
from mmel.models.outputs import MatchOutput
from mmel.training.data_parallel import gather_train_batch, gather_varying_rows
from mmel.training.datamodule import DevBatch, InputTable, ItemBatch, ModelInput, TrainBatch
from mmel.training.recipe import OptimizerSection, ValidationSection

MONITOR = "val/mrr"


class BackboneEncoder(nn.Module):
    """A trainable backbone as a feature function: ItemBatch -> FeatureBatch, with gradients.

    It makes the same calls as the feature store (`mmel.features.store.encode_items`), so a frozen
    run and an end-to-end run see identical features for identical inputs; rows without an image
    get the backbone's encoding of the all-zero pixel tensor, as in the release (§1.1).
    """

    def __init__(self, backbone: Backbone, max_text_length: int):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone {getattr(backbone, 'name', backbone)!r} is not an nn.Module, so it cannot be "
                            "fine-tuned; train it frozen from the feature store instead")
        self.backbone = backbone
        self.max_text_length = max_text_length

    def forward(self, items: ItemBatch) -> FeatureBatch:
        return encode_items(self.backbone, items.texts, items.images, max_text_length=self.max_text_length,
                            batch_size=max(len(items), 1))


class NameSignal(nn.Module):
    """The surface-name match as a learned signal: score + w * name_match, w = exp(log_weight) > 0, learned.

    Its loss is a cross-entropy over the combined scores (copies of a row's gold left out), added to
    the model's own: where the name already tells the gold apart the term is small, so what it
    teaches is the namesakes (same name, different entity) that only the model's context can rank.
    Validation ranks dev mentions by the same sum, so the exported checkpoint is the best one as served.
    """

    def __init__(self, initial_weight: float = 8.0):
        super().__init__()
        self.log_weight = nn.Parameter(torch.tensor(float(initial_weight)).log())

    @property
    def weight(self) -> float:
        return float(self.log_weight.detach().exp())

    def loss(self, scores: torch.Tensor, name_match: torch.Tensor, labels: torch.Tensor,
             entity_ids: torch.Tensor) -> torch.Tensor:
        """scores, name_match [B, N]; labels [B]; entity_ids [N] -> the CE of scores + w * name_match."""
        combined = scores + self.log_weight.exp() * name_match.to(scores.dtype)
        return masked_cross_entropy(combined, labels, usable_columns(labels, scores.shape[1], entity_ids))


class MelSystem(L.LightningModule):
    """Unit-consistency training (§1.7) and full-KB dev ranking (§1.9) for any MelModel.

    The KB is encoded in batches into the model's entity `RowCache` and scored in chunks.
    """

    def __init__(self, model: MelModel, optimizer: OptimizerSection | None = None, *,
                 validation: ValidationSection | None = None, encoder: BackboneEncoder | TopTextLayers | None = None,
                 name_signal: NameSignal | None = None, progress: bool = True):
        """`encoder` turns a batch's inputs into features with gradients: raw items (`BackboneEncoder`, end to
        end) or cached lower-layer states (`TopTextLayers`, partial fine-tuning); None: features as stored."""
        super().__init__()
        self.model = model
        self.encoder = encoder
        self.name_signal = name_signal
        self.optimizer_config = optimizer or OptimizerSection()
        self.validation_config = validation or ValidationSection()
        self.progress = progress
        self._entity_cache: Any = None
        self._rank_counts: list[tuple[np.ndarray, np.ndarray]] = []

    # --- features -------------------------------------------------------------------------------
    def featurize(self, inputs: ModelInput) -> FeatureBatch:
        if self.encoder is not None:
            return self.encoder(inputs)
        if not isinstance(inputs, FeatureBatch):
            raise TypeError("this system has no backbone to encode raw items; give it FeatureBatch inputs "
                            "or an encoder (BackboneEncoder)")
        return inputs

    # --- training -------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Backbones load in eval mode; training mode is what the release trains in (Lightning's model.train())."""
        if self.trainer.world_size > 1:
            if self.name_signal is not None:
                raise UsageError("model.name_signal trains on one device only (trainer.devices=1, trainer.num_nodes=1)")
            if "rows" not in inspect.signature(self.model.forward).parameters:
                raise UsageError(f"{type(self.model).__name__}.forward takes no `rows`, so it cannot score a share "
                                 "of a batch: train it on one device (trainer.devices=1, trainer.num_nodes=1)")
            # Every process was seeded alike (the same initial weights); from here on their random draws
            # (dropout, hard negatives, image choice) must differ, or each share would repeat the others' draws.
            L.seed_everything(torch.initial_seed() + self.global_rank, workers=True, verbose=False)
        self.train()

    def training_step(self, batch: TrainBatch, batch_idx: int) -> torch.Tensor:
        mentions, entities = self.featurize(batch.mentions), self.featurize(batch.entities)
        if self.trainer.world_size == 1:
            labels = torch.arange(len(batch), device=batch.entity_ids.device)  # gold entity i is column i (§1.7)
            output = self.model(mentions, entities, labels=labels, entity_ids=batch.entity_ids)
            if self.name_signal is not None and batch.name_match is not None:
                name_loss = self.name_signal.loss(output.scores, batch.name_match, labels, batch.entity_ids)
                output.unit_losses = {**output.unit_losses, "name_signal": name_loss}
                output.loss = output.loss + name_loss
                self.log("train/name_weight", self.name_signal.weight, on_step=False, on_epoch=True,
                         batch_size=len(batch))
            return self._log_losses(output.loss, output.unit_losses, len(batch))
        output, batch_size = self._share_of_global_batch(mentions, entities, batch)
        return self._log_losses(output.loss, output.unit_losses, batch_size)

    def _share_of_global_batch(self, mentions: FeatureBatch, entities: FeatureBatch, batch: TrainBatch
                               ) -> tuple[MatchOutput, int]:
        """This process's mentions scored against the whole global batch's entities (several processes).

        The model returns this share's part of the batch loss; it is scaled by the number of
        processes because DDP averages their gradients (see `mmel.training.data_parallel`), and by
        0 for a padding share, which still runs the same collectives as the others.
        """
        whole = gather_train_batch(lambda tensor: self.all_gather(tensor, sync_grads=True), self.global_rank,
                                   mentions, entities, batch.entity_ids, padding=batch.padding)
        labels = torch.arange(len(whole.mentions), device=whole.entity_ids.device)
        output = self.model(whole.mentions, whole.entities, labels=labels, entity_ids=whole.entity_ids,
                            rows=whole.rows)
        scale = self.trainer.world_size * whole.weight
        output.loss = output.loss * scale
        output.unit_losses = {unit: value * scale for unit, value in output.unit_losses.items()}
        return output, len(whole.mentions)

    def _log_losses(self, loss: torch.Tensor, unit_losses: dict[str, torch.Tensor], batch_size: int
                    ) -> torch.Tensor:
        """Log the batch loss; on several processes, the mean of their scaled shares is the batch loss."""
        synced = self.trainer.world_size > 1
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size,
                 sync_dist=synced)
        for unit, value in unit_losses.items():
            self.log(f"train/loss_{unit}", value, on_step=False, on_epoch=True, batch_size=batch_size,
                     sync_dist=synced)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        """AdamW (§1.8); names containing a `no_decay` substring get weight decay 0.

        With `schedule: linear`, the learning rate rises from 0 over `warmup_steps` optimizer steps and
        then falls linearly to 0 at the last step of the run (DIM's schedule, §4.5).
        """
        config = self.optimizer_config
        groups = self._parameter_groups(config)
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
        if config.schedule == "constant" and config.warmup_steps == 0:
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = config.warmup_steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 1.0 if config.schedule == "constant" else max(0.0, (total - step) / max(total - warmup, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _parameter_groups(self, config: OptimizerSection) -> list[dict[str, Any]]:
        """(decayed, not decayed) for the model, and for trained text layers at `backbone_lr` when set;
        the name signal's one weight at `name_signal_lr`, without decay."""
        groups = []
        parts = [(self.model, config.lr), (self.encoder, config.backbone_lr or config.lr)]
        for module, lr in parts:
            if module is None:
                continue
            decay, no_decay = [], []
            for name, parameter in module.named_parameters():
                if parameter.requires_grad:
                    (no_decay if any(part in name for part in config.no_decay) else decay).append(parameter)
            groups += [{"params": decay, "weight_decay": config.weight_decay, "lr": lr},
                       {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
        if self.name_signal is not None:
            groups.append({"params": list(self.name_signal.parameters()), "weight_decay": 0.0,
                           "lr": config.name_signal_lr})
        return [group for group in groups if group["params"]]

    # --- validation: full-KB ranking ----------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._entity_cache = self.encode_table(self.trainer.datamodule.entities)
        self._rank_counts = []

    @torch.no_grad()
    def encode_table(self, table: InputTable) -> Any:
        """The model's entity cache for every row of `table`, encoded in batches."""
        size = self.validation_config.entity_batch_size
        caches = []
        for start in tqdm(range(0, len(table), size), desc="encoding KB", unit="batch", leave=False,
                          disable=not self.progress):
            rows = np.arange(start, min(start + size, len(table)))
            features = self.featurize(table.gather(rows).to(self.device))
            caches.append(self.model.encode_entities(features))
        return self.model.entity_cache_class.concat(caches)

    def validation_step(self, batch: DevBatch, batch_idx: int) -> None:
        mention_cache = self.model.encode_mentions(self.featurize(batch.mentions))
        entity_cache = self._entity_cache
        name_scores = self._dev_name_scores(batch)                                             # [b, N] or None

        def score_block(rows: np.ndarray, start: int, stop: int) -> torch.Tensor:
            selected = mention_cache.select(torch.as_tensor(rows, device=self.device))
            scores = self.model.match(selected, entity_cache.select(slice(start, stop))).scores  # [b, n]
            if name_scores is not None:
                scores = scores + self.name_signal.weight * name_scores[rows, start:stop].to(scores)
            return scores

        result = rank_full_kb(score_block, batch.gold_rows, len(entity_cache), mention_batch_size=len(batch.gold_rows),
                              entity_chunk_size=self.validation_config.entity_chunk_size, progress=False)
        self._rank_counts.append((result.num_greater, result.num_tied))

    def _dev_name_scores(self, batch: DevBatch) -> torch.Tensor | None:
        """[b, N] name_match of the dev mentions against the KB when the name signal trains: the dev metrics
        then rank by score + w * name_match, as linking with the exported weight does."""
        index = getattr(self.trainer.datamodule, "name_index", None)
        if self.name_signal is None or index is None or batch.surfaces is None:
            return None
        return torch.from_numpy(np.stack([index.scores(surface) for surface in batch.surfaces]))

    def on_validation_epoch_end(self) -> None:
        self._entity_cache = None
        greater, tied = self._all_rank_counts()
        if len(greater) == 0:
            return
        metrics = ranking_metrics(ranks_from_counts(greater, tied))
        for name, value in metrics.items():
            # every process holds the same metrics (all dev mentions' counts), so syncing them changes nothing
            self.log(f"val/{name}", value, prog_bar=name in ("mrr", "hits@1"), batch_size=len(greater),
                     sync_dist=self.trainer.world_size > 1)

    def _all_rank_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """[M] counts of entities scored above / tied with the gold, for the dev mentions of every process."""
        counts = [np.concatenate([pair[part] for pair in self._rank_counts]) if self._rank_counts
                  else np.zeros(0, dtype=np.int64) for part in (0, 1)]
        if not self.trainer.datamodule.dev_split_across_processes:
            return counts[0], counts[1]
        local = torch.as_tensor(np.stack(counts, axis=1).astype(np.int64), device=self.device)   # [m, 2]
        gathered = gather_varying_rows(self.all_gather, local).cpu().numpy()                        # [M, 2]
        return gathered[:, 0], gathered[:, 1]


__all__ = ["MONITOR", "BackboneEncoder", "MelSystem", "NameSignal"]
