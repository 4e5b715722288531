"""Training on small synthetic features: batches, a run that learns, resume, export."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

from mmel.core.config import ConfigError
from mmel.core.features import FeatureBatch, InMemoryFeatureTable, PooledView
from mmel.evaluation import MISSING_GOLD_ROW, NIL_ROW
from mmel.lexical.name_match import NameMatchIndex
from mmel.models import load_model
from mmel.models.mimic import MIMICConfig, MIMICModel
from mmel.training.datamodule import LinkedSplit, MelDataModule, nearest_entities
from mmel.training.export import ExportInfo, export_checkpoint
from mmel.training.recipe import load_recipe
from mmel.training.run import build_model, fit

WIDTHS = {"text_dim": 16, "image_global_dim": 12, "image_patch_dim": 10}
NUM_ENTITIES = 40


def entity_features(generator: torch.Generator) -> FeatureBatch:
    return FeatureBatch(text_global=torch.randn(NUM_ENTITIES, 16, generator=generator),
                        text_tokens=torch.randn(NUM_ENTITIES, 6, 16, generator=generator),
                        text_mask=torch.ones(NUM_ENTITIES, 6, dtype=torch.bool),
                        image_global=torch.randn(NUM_ENTITIES, 12, generator=generator),
                        image_patches=torch.randn(NUM_ENTITIES, 5, 10, generator=generator),
                        has_image=torch.arange(NUM_ENTITIES) % 3 != 0)


def mention_split(name: str, entities: FeatureBatch, gold: np.ndarray, generator: torch.Generator) -> LinkedSplit:
    """Mentions that are noisy copies of their gold entity's features (NIL / missing rows: random gold)."""
    source = entities.select(torch.as_tensor(np.where(gold >= 0, gold, 0)))
    noisy = {field: getattr(source, field) + 0.8 * torch.randn(getattr(source, field).shape, generator=generator)
             for field in ("text_global", "text_tokens", "image_global", "image_patches")}
    has_image = torch.rand(len(gold), generator=generator) > 0.5
    batch = FeatureBatch(**noisy, text_mask=source.text_mask, has_image=has_image)
    return LinkedSplit(name, InMemoryFeatureTable(batch), gold)


def synthetic_datamodule(recipe, *, seed: int = 0) -> MelDataModule:
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    entities = entity_features(generator)
    train_gold = rng.integers(0, NUM_ENTITIES, size=96)
    train_gold[[5, 50]] = NIL_ROW
    train_gold[7] = MISSING_GOLD_ROW
    dev_gold = rng.integers(0, NUM_ENTITIES, size=30)
    dev_gold[3] = NIL_ROW
    return MelDataModule(InMemoryFeatureTable(entities), mention_split("train", entities, train_gold, generator),
                         mention_split("dev", entities, dev_gold, generator), data=recipe.data,
                         validation=recipe.validation)


def small_recipe(*overrides: str):
    return load_recipe("mimic-synthetic-cpu", ["data.batch_size=16", "data.hard_negatives=0", "trainer.progress=false",
                                               "validation.max_mentions=20", "validation.entity_chunk_size=16",
                                               "validation.entity_batch_size=16", "model.options.hidden_dim=8",
                                               "trainer.log_every_n_steps=1", "trainer.check_val_every_n_epoch=1",
                                               *overrides])


def export_info(recipe) -> ExportInfo:
    return ExportInfo(backbone={"name": "random", "fingerprint": "random-0", **WIDTHS},
                      preprocess={"template": "mimic", "max_text_length": 6}, data={"dataset": "synthetic"},
                      recipe=recipe)


def read_rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_batches_pair_mentions_with_gold_entities_and_count_skips() -> None:
    recipe = small_recipe("data.train_fraction=0.5", "validation.max_mentions=10")
    datamodule = synthetic_datamodule(recipe)
    datamodule.setup("fit")
    assert datamodule.counts.train == {"in_file": 96, "mentions": 48, "nil": 1, "gold_not_in_kb": 1, "usable": 46}
    assert datamodule.train_rows.max() < 48 and 5 not in datamodule.train_rows and 7 not in datamodule.train_rows
    assert datamodule.counts.dev["nil"] == 1 and datamodule.counts.dev["ranked"] == 10
    first_subset = datamodule.dev_rows.copy()
    datamodule.setup("fit")
    np.testing.assert_array_equal(datamodule.dev_rows, first_subset)
    batch = datamodule.collate_train([0, 1, 2])
    entities = datamodule.entities.gather(datamodule.train_split.gold_rows[[0, 1, 2]])
    torch.testing.assert_close(batch.entities.text_tokens, entities.text_tokens)
    assert batch.entity_ids.tolist() == datamodule.train_split.gold_rows[[0, 1, 2]].tolist()
    with pytest.raises(ValueError, match="train_fraction"):
        MelDataModule(datamodule.entities, datamodule.train_split, None,
                      data=small_recipe("data.train_fraction=0").data)


def test_hard_negatives_are_the_nearest_other_entities() -> None:
    entities = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7]])
    mentions = np.array([[1.0, 0.05], [0.1, 1.0]])
    pools = nearest_entities(mentions, entities, np.array([0, NIL_ROW]), pool=2, block_size=1)
    np.testing.assert_array_equal(pools, [[1, 3], [2, 3]])

    recipe = small_recipe("data.hard_negatives=2", "data.hard_negative_pool=5")
    datamodule = synthetic_datamodule(recipe)
    datamodule.setup("fit")
    batch = datamodule.collate_train([0, 1, 2])
    gold = datamodule.train_split.gold_rows[[0, 1, 2]]
    assert len(batch) == 3 and batch.entity_ids.shape == (9,) and batch.entity_ids[:3].tolist() == gold.tolist()
    extra = batch.entity_ids[3:].view(3, 2).numpy()
    for row, negatives in enumerate(extra):
        assert gold[row] not in negatives and set(negatives) <= set(datamodule.hard_negative_pools[row])
    with pytest.raises(ValueError, match="hard_negatives must be between"):
        synthetic_datamodule(small_recipe("data.hard_negatives=6", "data.hard_negative_pool=5"))


def test_name_mined_hard_negatives_are_namesakes_before_dense_neighbours() -> None:
    entities = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7]])
    mentions = np.array([[1.0, 0.05]])
    names = NameMatchIndex(["Phil McGraw", "Ali MacGraw", "Tim McGraw", "Ali Khan"])
    pools = nearest_entities(mentions, entities, np.array([0]), pool=3, prior=names.score_block(["McGraw"]))
    np.testing.assert_array_equal(pools, [[2, 1, 3]])   # the namesake first, then by cosine

    recipe = small_recipe("data.hard_negatives=1", "data.hard_negative_source=name")
    plain = synthetic_datamodule(recipe)
    with pytest.raises(ValueError, match="entity names"):
        plain.setup("fit")
    with pytest.raises(ConfigError, match="hard_negative_source"):
        small_recipe("data.hard_negative_source=bm25")


def test_a_short_run_learns_and_exports_the_best_checkpoint(tmp_path) -> None:
    recipe = small_recipe("trainer.max_epochs=6", "optimizer.lr=3e-3", "trainer.early_stopping_patience=10")
    torch.manual_seed(0)
    model = build_model(recipe.model, WIDTHS)
    result = fit(model, synthetic_datamodule(recipe), recipe, tmp_path / "run", export_info(recipe))
    rows = read_rows(tmp_path / "run" / "logs" / "session-1" / "metrics.csv")
    epoch_losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    dev_mrr = [float(r["val/mrr"]) for r in rows if r.get("val/mrr")]
    assert len(epoch_losses) == 6 and epoch_losses[-1] < 0.6 * epoch_losses[0]
    assert len(dev_mrr) == 6 and max(dev_mrr) > 0.5
    assert result.best_mrr == pytest.approx(max(dev_mrr)) and result.best_epoch == 1 + dev_mrr.index(max(dev_mrr))
    assert result.counts.train["usable"] == 93 and result.counts.dev["ranked"] == 20
    exported = load_model(result.best_dir)
    header = exported.checkpoint_header
    assert header["backbone"]["fingerprint"] == "random-0" and header["preprocess"]["max_text_length"] == 6
    assert header["training"]["dev_metrics"]["mrr"] == pytest.approx(result.best_mrr)
    assert "Full-KB ranking of 20 dev mentions" in (result.best_dir / "README.md").read_text()
    assert (tmp_path / "run" / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_mrr"] == pytest.approx(result.best_mrr) and summary["counts"]["train"]["nil"] == 2


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path) -> None:
    recipe = small_recipe("trainer.max_epochs=1", "data.hard_negatives=1")
    torch.manual_seed(0)
    fit(build_model(recipe.model, WIDTHS), synthetic_datamodule(recipe), recipe, tmp_path / "run", export_info(recipe))
    checkpoint_state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint_state["epoch"] == 0 and checkpoint_state["global_step"] == 6  # 93 usable / 16 per batch
    with pytest.raises(Exception, match="already holds a run"):
        fit(build_model(recipe.model, WIDTHS), synthetic_datamodule(recipe), recipe, tmp_path / "run",
            export_info(recipe))

    longer = small_recipe("trainer.max_epochs=3", "data.hard_negatives=1")
    result = fit(build_model(longer.model, WIDTHS), synthetic_datamodule(longer), longer, tmp_path / "run",
                 export_info(longer), resume=True)
    resumed_rows = read_rows(tmp_path / "run" / "logs" / "session-2" / "metrics.csv")
    assert sorted({int(r["epoch"]) for r in resumed_rows}) == [1, 2]
    assert max(int(r["step"]) for r in resumed_rows) == 17 and result.epochs_run == 3
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 18
    with pytest.raises(Exception, match="nothing to resume"):
        fit(build_model(longer.model, WIDTHS), synthetic_datamodule(longer), longer, tmp_path / "other",
            export_info(longer), resume=True)


def test_export_round_trip_keeps_scores_and_provenance(tmp_path) -> None:
    recipe = small_recipe()
    model = MIMICModel(MIMICConfig(**WIDTHS, hidden_dim=8)).eval()
    entities = entity_features(torch.Generator().manual_seed(3))
    export_checkpoint(model, tmp_path / "best", export_info(recipe), metrics={"mrr": 0.5}, selection="test")
    loaded = load_model(tmp_path / "best")
    with torch.no_grad():
        torch.testing.assert_close(loaded(entities, entities).scores, model(entities, entities).scores, atol=0, rtol=0)
    assert loaded.checkpoint_header["training"]["recipe"]["name"] == "mimic-synthetic-cpu"
    assert loaded.checkpoint_header["backbone"]["name"] == "random"


def _with_pooled_views(batch: FeatureBatch, generator: torch.Generator) -> FeatureBatch:
    """DIM's further mention views: the surface alone (always there) and a caption (every other row)."""
    count = len(batch)
    return dataclasses.replace(batch, views={
        "mention": PooledView(batch.text_global + 0.1 * torch.randn(count, 16, generator=generator),
                              torch.ones(count, dtype=torch.bool)),
        "caption": PooledView(torch.randn(count, 16, generator=generator), torch.arange(count) % 2 == 0)})


def dim_datamodule(recipe, texts: list[str]) -> MelDataModule:
    generator = torch.Generator().manual_seed(0)
    plain = synthetic_datamodule(recipe)
    splits = [LinkedSplit(split.name, InMemoryFeatureTable(_with_pooled_views(split.table.batch, generator)),
                          split.gold_rows) for split in (plain.train_split, plain.dev_split)]
    return MelDataModule(plain.entities, splits[0], splits[1], data=recipe.data, validation=recipe.validation,
                         entity_texts=texts)


def test_dim_trains_with_tfidf_negatives_and_a_warmed_up_linear_schedule(tmp_path) -> None:
    texts = [f"entity {row} works as a {['singer', 'painter', 'pilot', 'chemist'][row % 4]} in town {row % 7}"
             for row in range(NUM_ENTITIES)]
    recipe = load_recipe("dim-wikimel-cpu", ["data.batch_size=16", "trainer.progress=false", "trainer.max_epochs=30",
                                             "trainer.log_every_n_steps=1", "trainer.check_val_every_n_epoch=2",
                                             "optimizer.lr=3e-3", "optimizer.warmup_steps=5",
                                             "validation.mention_batch_size=16", "trainer.early_stopping_patience=10"])
    datamodule = dim_datamodule(recipe, texts)
    datamodule.setup("fit")
    batch = datamodule.collate_train([0, 1, 2, 3])
    gold = datamodule.train_split.gold_rows[[0, 1, 2, 3]]
    assert batch.entity_ids.shape == (8,) and batch.entity_ids[:4].tolist() == gold.tolist()
    assert all(int(negative) != int(g) for negative, g in zip(batch.entity_ids[4:], gold, strict=True))
    assert set(batch.mentions.views) == {"mention", "caption"}

    torch.manual_seed(0)
    model = build_model(recipe.model, WIDTHS)
    result = fit(model, dim_datamodule(recipe, texts), recipe, tmp_path / "run", export_info(recipe))
    rows = read_rows(tmp_path / "run" / "logs" / "session-1" / "metrics.csv")
    epoch_losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert epoch_losses[-1] < 0.7 * epoch_losses[0]
    assert result.best_mrr > 0.3 and {"train/loss_npair", "train/loss_l2"} <= set(rows[-1])


def test_the_linear_schedule_warms_up_then_decays_to_zero() -> None:
    from mmel.training.system import MelSystem

    recipe = load_recipe("dim-wikimel-cpu", ["optimizer.warmup_steps=4"])
    system = MelSystem(build_model(recipe.model, WIDTHS), recipe.optimizer)
    system.trainer = type("FakeTrainer", (), {"estimated_stepping_batches": 20})()
    configured = system.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = recipe.optimizer.lr
    assert rates[:4] == pytest.approx([peak * k / 4 for k in (1, 2, 3, 4)])
    assert rates[4] == pytest.approx(peak) and rates[-1] == pytest.approx(peak / 16) and rates == sorted(rates[:4]) + \
        sorted(rates[4:], reverse=True)
