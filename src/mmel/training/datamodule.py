"""Training and validation batches for any MelModel: B mentions with their B gold entities.

Inputs come from a table with `gather(rows)`: a `FeatureTable` (frozen backbone, the feature
store) or an `ItemTable` (texts and images, encoded on the fly by a trainable backbone). A
training batch pairs B mentions with the KB rows of their gold entities; the other B - 1 gold
entities are the negatives (in-batch negatives, models.md §1.7). NIL mentions and mentions whose
gold entity is not in the KB cannot be trained or ranked: they are skipped and counted.

On several processes (data-parallel training), `GlobalBatchSampler` cuts the same global batches
as one process would and gives each process a contiguous share; `MelSystem` gathers the shares
back into the whole batch, so the in-batch negatives do not depend on the number of processes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler

from mmel.core.errors import UsageError
from mmel.core.features import FeatureBatch, unit_rows
from mmel.core.images import ImageReport, load_image
from mmel.core.types import Dataset
from mmel.evaluation import MISSING_GOLD_ROW, NIL_ROW, ScoreBlock, gold_rows_for
from mmel.features.templates import TextTemplate
from mmel.lexical.name_match import NameMatchIndex
from mmel.training.negatives import TfidfNegativeSampler
from mmel.training.recipe import DataSection, ValidationSection

# Name-mined hard negatives rank by prior * this + cosine: a cosine (in [-1, 1]) can then only break
# ties of the prior, whose steps are at least 1 / (tokens in a surface form).
PRIOR_OVER_COSINE = 1000.0

logger = logging.getLogger(__name__)


# --- inputs: features, or items to encode ------------------------------------------------------


@dataclass
class ItemBatch:
    """Raw inputs of B items for a trainable backbone: rendered texts and images (None = no image)."""

    texts: list[str]
    images: list[Image.Image | None]

    def __len__(self) -> int:
        return len(self.texts)

    def to(self, device: torch.device | str) -> ItemBatch:
        return self  # the backbone moves what it encodes


ModelInput = FeatureBatch | ItemBatch


class InputTable(Protocol):
    """Rows of a KB or a split, gathered into a model input (`FeatureTable` or `ItemTable`)."""

    def __len__(self) -> int: ...

    def gather(self, rows: Sequence[int] | np.ndarray) -> ModelInput: ...


class ItemTable:
    """Texts and image paths of a KB (row order) or a split (file order), loaded when gathered.

    Entities have several images: evaluation uses the first, training a random one (§1.1), chosen
    by `image_choice`. Unusable image files become "no image" and are counted in `image_report`
    (in the process that loads them: with DataLoader workers, each worker counts its own).
    """

    def __init__(self, texts: list[str], image_options: list[tuple[str, ...]], root: Path, *,
                 image_choice: str = "first"):
        if image_choice not in ("first", "random"):
            raise UsageError(f"image_choice must be 'first' or 'random', got {image_choice!r}")
        if len(texts) != len(image_options):
            raise UsageError(f"{len(texts)} texts but {len(image_options)} image lists")
        self.texts = texts
        self.image_options = image_options
        self.root = Path(root)
        self.image_choice = image_choice
        self.image_report = ImageReport()

    @classmethod
    def for_kb(cls, dataset: Dataset, template: TextTemplate, *, image_choice: str = "first") -> ItemTable:
        return cls([template.entity_text(entity) for entity in dataset.kb],
                   [tuple(entity.images) for entity in dataset.kb], dataset.root, image_choice=image_choice)

    @classmethod
    def for_split(cls, dataset: Dataset, split: str, template: TextTemplate) -> ItemTable:
        mentions = dataset.split(split)
        return cls([template.mention_text(mention) for mention in mentions],
                   [(mention.image,) if mention.image else () for mention in mentions], dataset.root)

    def __len__(self) -> int:
        return len(self.texts)

    def gather(self, rows: Sequence[int] | np.ndarray) -> ItemBatch:
        rows = [int(row) for row in rows]
        return ItemBatch(texts=[self.texts[row] for row in rows], images=[self._image(row) for row in rows])

    def _image(self, row: int) -> Image.Image | None:
        options = self.image_options[row]
        if not options:
            return None
        chosen = random.choice(options) if self.image_choice == "random" else options[0]
        return load_image(self.root, chosen, self.image_report)


# --- splits and batches ------------------------------------------------------------------------


@dataclass
class LinkedSplit:
    """One split's inputs with the KB row of each mention's gold entity (NIL_ROW / MISSING_GOLD_ROW if none)."""

    name: str
    table: InputTable
    gold_rows: np.ndarray  # [M] int64
    surfaces: list[str] | None = None   # surface forms in row order (name-mined hard negatives need them)

    def __post_init__(self) -> None:
        self.gold_rows = np.asarray(self.gold_rows, dtype=np.int64)
        if len(self.gold_rows) != len(self.table):
            raise UsageError(f"split {self.name!r}: {len(self.gold_rows)} gold rows for {len(self.table)} mentions")

    @classmethod
    def from_dataset(cls, dataset: Dataset, split: str, table: InputTable) -> LinkedSplit:
        mentions = dataset.split(split)
        return cls(split, table, gold_rows_for(mentions, dataset.kb), [mention.surface for mention in mentions])

    def counts(self, rows: np.ndarray | None = None) -> dict[str, int]:
        gold = self.gold_rows if rows is None else self.gold_rows[rows]
        return {"mentions": len(gold), "nil": int((gold == NIL_ROW).sum()),
                "gold_not_in_kb": int((gold == MISSING_GOLD_ROW).sum()), "usable": int((gold >= 0).sum())}


@dataclass
class TrainBatch:
    mentions: ModelInput      # B mentions
    entities: ModelInput      # their B gold entities in the same order (labels = arange(B)), then any hard negatives
    entity_ids: torch.Tensor  # [N] int64 KB row of each entity column (tells duplicates apart)
    padding: bool = False     # a stand-in share of a process that the last global batch left without a row
    name_match: torch.Tensor | None = None   # [B, N] surface-name match of each pair (model.name_signal)

    def __len__(self) -> int:
        return len(self.mentions)

    def to(self, device: torch.device | str) -> TrainBatch:
        return TrainBatch(self.mentions.to(device), self.entities.to(device), self.entity_ids.to(device),
                          self.padding, None if self.name_match is None else self.name_match.to(device))


@dataclass
class DevBatch:
    mentions: ModelInput      # b mentions
    gold_rows: np.ndarray     # [b] int64 KB rows of their gold entities
    surfaces: list[str] | None = None   # their surface forms (the name signal ranks with them)

    def to(self, device: torch.device | str) -> DevBatch:
        return DevBatch(self.mentions.to(device), self.gold_rows, self.surfaces)


@dataclass(frozen=True)
class BatchShare:
    """One process's share of a global training batch: positions in the data module's training rows."""

    positions: np.ndarray     # [b] int64
    padding: bool = False     # True: a stand-in row that only lets the process take part in the step


class GlobalBatchSampler(Sampler[BatchShare]):
    """The same global batches on any number of processes, each process drawing a contiguous share.

    Every epoch shuffles the `num_rows` training rows with a generator seeded by `seed + epoch`
    (Lightning calls `set_epoch`), cuts that order into global batches of `batch_size` (the last
    one may be shorter) and gives process `rank` the rank-th of `num_processes` contiguous, nearly
    equal parts of each. Joined in process order the parts are the batch one process draws, so the
    batches are the same whatever the number of processes, and a resumed epoch repeats its order.

    Every process gets the same number of batches, because each step waits for all of them. When
    a last batch has fewer rows than there are processes, a process left without a row gets the
    batch's first row marked as padding: it takes part in the step and contributes nothing.
    """

    def __init__(self, num_rows: int, batch_size: int, *, num_processes: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True):
        if batch_size < num_processes:
            raise UsageError(f"data.batch_size ({batch_size}) is the global batch and must hold at least one "
                             f"mention per process ({num_processes} processes)")
        if not 0 <= rank < num_processes:
            raise UsageError(f"process rank {rank} is outside 0..{num_processes - 1}")
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_rows // self.batch_size)

    def __iter__(self) -> Iterator[BatchShare]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_rows, generator=generator).numpy()
        else:
            order = np.arange(self.num_rows)
        for start in range(0, self.num_rows, self.batch_size):
            batch = order[start:start + self.batch_size]
            share = np.array_split(batch, self.num_processes)[self.rank]
            yield BatchShare(share) if len(share) else BatchShare(batch[:1], padding=True)


class _ShareRows(torch.utils.data.Dataset):
    """Maps a BatchShare to the training-file rows it stands for (the loader's 'dataset')."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, share: BatchShare) -> tuple[np.ndarray, bool]:
        return self.rows[share.positions], share.padding


@dataclass
class DataCounts:
    """What the data module used and skipped; written to the run summary and the model card."""

    train: dict[str, int] = field(default_factory=dict)
    dev: dict[str, int] = field(default_factory=dict)


class MelDataModule(L.LightningDataModule):
    """Batches of (mentions, gold entities) for training and dev mention batches for full-KB ranking.

    `train_fraction` keeps the first fraction of the training file, in file order, as the MIMIC
    authors built their low-resource subsets (§1.10). The dev subset (`validation.max_mentions`)
    is drawn once with its own seed, so every validation run ranks the same mentions.
    """

    def __init__(self, entities: InputTable, train: LinkedSplit, dev: LinkedSplit | None, *,
                 data: DataSection | None = None, validation: ValidationSection | None = None,
                 train_entities: InputTable | None = None, entity_names: Sequence[str] | None = None,
                 entity_texts: Sequence[str] | None = None, seed: int = 0, name_signal: bool = False):
        """`entity_names` / `entity_texts` (KB row order) are needed by name-mined / TF-IDF negatives and
        the name signal only; `name_signal` puts each training pair's surface-name match in the batch.

        `seed` fixes the training order (shuffled afresh every epoch from seed + epoch).
        """
        super().__init__()
        self.seed = seed
        self.entity_names = entity_names
        self.entity_texts = entity_texts
        self.tfidf_sampler: TfidfNegativeSampler | None = None
        self.name_index: NameMatchIndex | None = None
        if name_signal:
            if entity_names is None or train.surfaces is None:
                raise UsageError("model.name_signal needs the KB's entity names (entity_names) and the train "
                                 "mentions' surface forms (LinkedSplit.from_dataset)")
            self.name_index = NameMatchIndex(entity_names)
        self.entities = entities
        self.train_entities = train_entities if train_entities is not None else entities
        self.train_split = train
        self.dev_split = dev
        self.data_config = data or DataSection()
        self.validation_config = validation or ValidationSection()
        _check_fraction(self.data_config.train_fraction)
        if not 0 <= self.data_config.hard_negatives <= self.data_config.hard_negative_pool:
            raise UsageError(f"data.hard_negatives must be between 0 and data.hard_negative_pool "
                             f"({self.data_config.hard_negative_pool}), got {self.data_config.hard_negatives}")
        self.train_rows = np.zeros(0, dtype=np.int64)
        self.dev_rows = np.zeros(0, dtype=np.int64)
        self.hard_negative_pools: np.ndarray | None = None   # [M_train, pool] KB rows per train-file row
        self.counts = DataCounts()

    def setup(self, stage: str | None = None) -> None:
        self.train_rows, self.counts.train = self._select_train_rows()
        if self.dev_split is not None:
            self.dev_rows, self.counts.dev = self._select_dev_rows(self.dev_split)
        if self.data_config.hard_negatives == 0:
            return
        if self.data_config.hard_negative_source == "tfidf":
            if self.tfidf_sampler is None:
                if self.entity_texts is None:
                    raise UsageError("data.hard_negative_source 'tfidf' needs the KB's entity texts (entity_texts)")
                self.tfidf_sampler = TfidfNegativeSampler().fit(list(self.entity_texts))
        elif self.hard_negative_pools is None:
            self.hard_negative_pools = self._mine_hard_negative_pools()

    def _mine_hard_negative_pools(self) -> np.ndarray:
        """[M_train, pool] the KB rows nearest to each train mention by global text vector (gold excluded)."""
        tables = (self.train_split.table, self.train_entities)
        if not all(hasattr(table, "text_global_matrix") for table in tables):
            raise UsageError("data.hard_negatives needs features from the store (text_global_matrix); "
                             "set it to 0 when the backbone is trained end to end")
        prior = None
        if self.data_config.hard_negative_source == "name":
            if self.entity_names is None or self.train_split.surfaces is None:
                raise UsageError("data.hard_negative_source 'name' needs the KB's entity names (entity_names) "
                                 "and the train mentions' surface forms (LinkedSplit.from_dataset)")
            prior = NameMatchIndex(self.entity_names).score_block(self.train_split.surfaces)
        return nearest_entities(self.train_split.table.text_global_matrix(), self.train_entities.text_global_matrix(),
                                self.train_split.gold_rows, self.data_config.hard_negative_pool, prior=prior)

    def _select_train_rows(self) -> tuple[np.ndarray, dict[str, int]]:
        split = self.train_split
        kept = int(len(split.gold_rows) * self.data_config.train_fraction)
        prefix = np.arange(kept)
        counts = {"in_file": len(split.gold_rows), **split.counts(prefix)}
        _warn_skipped(split.name, counts)
        rows = prefix[split.gold_rows[prefix] >= 0]
        if len(rows) == 0:
            raise UsageError(f"split {split.name!r} has no mention with a gold entity in the KB to train on "
                             f"({counts})")
        return rows, counts

    def _select_dev_rows(self, split: LinkedSplit) -> tuple[np.ndarray, dict[str, int]]:
        counts = split.counts()
        _warn_skipped(split.name, counts)
        usable = np.flatnonzero(split.gold_rows >= 0)
        limit = self.validation_config.max_mentions
        if 0 < limit < len(usable):
            generator = np.random.default_rng(self.validation_config.subset_seed)
            usable = np.sort(generator.choice(usable, size=limit, replace=False))
        return usable, {**counts, "ranked": len(usable)}

    def _processes(self) -> tuple[int, int]:
        """(number of processes, this process's rank): (1, 0) outside a distributed trainer."""
        trainer = self.trainer
        return (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)

    def train_dataloader(self) -> DataLoader:
        """This process's shares of the global batches (`GlobalBatchSampler`), one share per step."""
        workers = self.data_config.num_workers
        num_processes, rank = self._processes()
        sampler = GlobalBatchSampler(len(self.train_rows), self.data_config.batch_size, num_processes=num_processes,
                                     rank=rank, seed=self.seed)
        return DataLoader(_ShareRows(self.train_rows), sampler=sampler, batch_size=None,
                          collate_fn=self._collate_share, num_workers=workers, persistent_workers=workers > 0)

    @property
    def dev_split_across_processes(self) -> bool:
        """Whether each process ranks its own part of the dev mentions (else every process ranks them all).

        Only when every process gets at least one: a process without a dev batch would skip the
        validation hooks and leave the others waiting for its ranks.
        """
        num_processes = self._processes()[0]
        return 1 < num_processes <= len(self.dev_rows)

    def val_dataloader(self) -> DataLoader:
        """This process's contiguous part of the dev mentions (see `dev_split_across_processes`)."""
        if self.dev_split is None:
            return []
        rows = self.dev_rows
        if self.dev_split_across_processes:
            num_processes, rank = self._processes()
            rows = np.array_split(rows, num_processes)[rank]
        return DataLoader(rows.tolist(), batch_size=self.validation_config.mention_batch_size,
                          shuffle=False, collate_fn=self.collate_dev, num_workers=self.data_config.num_workers)

    def transfer_batch_to_device(self, batch: TrainBatch | DevBatch, device: torch.device,
                                 dataloader_idx: int) -> TrainBatch | DevBatch:
        return batch.to(device)

    def _collate_share(self, item: tuple[np.ndarray, bool]) -> TrainBatch:
        rows, padding = item
        return self.collate_train(rows, padding=padding)

    def collate_train(self, rows: Sequence[int] | np.ndarray, *, padding: bool = False) -> TrainBatch:
        """Training-file rows -> their mentions, gold entities (and hard negatives) as one batch."""
        columns = self.train_split.gold_rows[rows]
        if self.tfidf_sampler is not None:
            # drawn from torch's generator, so Lightning's seed (and its worker seeding) decides them
            generator = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ())))
            golds = np.repeat(columns[:, None], self.data_config.hard_negatives, axis=1)       # [B, k]
            columns = np.concatenate([columns, self.tfidf_sampler.sample(golds, generator).ravel()])
        elif self.hard_negative_pools is not None:
            pools = self.hard_negative_pools[rows]                                          # [B, pool]
            picks = torch.rand(pools.shape).argsort(dim=1)[:, :self.data_config.hard_negatives].numpy()
            columns = np.concatenate([columns, np.take_along_axis(pools, picks, axis=1).ravel()])
        return TrainBatch(mentions=self.train_split.table.gather(rows), entities=self.train_entities.gather(columns),
                          entity_ids=torch.from_numpy(columns), padding=padding,
                          name_match=self._name_match(rows, columns))

    def _name_match(self, rows: Sequence[int] | np.ndarray, columns: np.ndarray) -> torch.Tensor | None:
        """[B, N] name_match of each batch mention's surface against each entity column, or None."""
        if self.name_index is None:
            return None
        surfaces = self.train_split.surfaces
        scores = self.name_index.candidate_scores([surfaces[row] for row in rows],
                                                  np.broadcast_to(columns, (len(rows), len(columns))))
        return torch.from_numpy(scores.astype(np.float32))

    def collate_dev(self, rows: list[int]) -> DevBatch:
        split = self.dev_split
        if split is None:
            raise RuntimeError("this data module has no dev split to collate")
        surfaces = None if split.surfaces is None else [split.surfaces[row] for row in rows]
        return DevBatch(mentions=split.table.gather(rows), gold_rows=split.gold_rows[rows], surfaces=surfaces)


def nearest_entities(mention_vectors: np.ndarray, entity_vectors: np.ndarray, gold_rows: np.ndarray, pool: int,
                     *, prior: ScoreBlock | None = None, block_size: int = 1024) -> np.ndarray:
    """[M, pool] entity rows with the highest cosine to each mention, best first, its gold row excluded.

    With `prior` (a ScoreBlock over mention rows, e.g. the surface-name match), entities are ranked by
    the prior first and the cosine only breaks its ties (and fills the pool past the prior's matches).
    """
    entities = unit_rows(entity_vectors)                                               # [N, D]
    pool = min(pool, len(entities) - 1)
    if pool < 1:
        raise UsageError("hard negatives need a knowledge base of at least two entities")
    result = np.empty((len(mention_vectors), pool), dtype=np.int64)
    for start in range(0, len(mention_vectors), block_size):
        stop = min(start + block_size, len(mention_vectors))
        scores = unit_rows(mention_vectors[start:stop]) @ entities.T                  # [b, N]
        if prior is not None:
            scores = scores + PRIOR_OVER_COSINE * np.asarray(prior(np.arange(start, stop), 0, len(entities)))
        gold = gold_rows[start:stop]
        has_gold = gold >= 0
        scores[np.flatnonzero(has_gold), gold[has_gold]] = -np.inf
        best = np.argpartition(-scores, pool - 1, axis=1)[:, :pool]                     # [b, pool], unordered
        order = np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1, kind="stable")
        result[start:stop] = np.take_along_axis(best, order, axis=1)
    return result


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise UsageError(f"data.train_fraction must be in (0, 1], got {fraction}")


def _warn_skipped(split: str, counts: dict[str, int]) -> None:
    if counts["nil"] or counts["gold_not_in_kb"]:
        logger.warning("split %s: skipping %d NIL mentions and %d whose gold entity is not in the KB (of %d)",
                       split, counts["nil"], counts["gold_not_in_kb"], counts["mentions"])


__all__ = ["BatchShare", "DataCounts", "DevBatch", "GlobalBatchSampler", "InputTable", "ItemBatch", "ItemTable",
           "LinkedSplit", "MelDataModule", "ModelInput", "TrainBatch"]
