"""MIMIC's and M3EL's visual units really work (issues 4 and 10): a short run on the synthetic generator.

Entities come in groups of four that share one name; each member has its own picture (colour,
shape, texture) and occupation. A test mention with the `image` cue names its group in a neutral
sentence and shows a jittered, noisy picture of its gold entity, so its text narrows the KB down
to the group and no further: any text-only model ranks the gold first in about 1 / 4 of them. The
MIMIC head, trained briefly on real MiniLM + EfficientNet-Lite0 features of the rendered images
with the entry point of `mmel train`, must link most of them, and its vision unit (VDLU) must be
what tells group members apart, not its text unit (TGLU).

Measured (seed 0, 96 image-cue mentions against all 40 entities): MIMIC Hits@1 0.93; the same
MIMIC with images ignored 0.25, the zero-shot dense text baseline 0.23; VDLU alone 0.78, TGLU
alone 0.21. Dataset seeds 1 and 2 give 0.95 / 0.96 against at most 0.32 for text only. M3EL is
held to the same bars with its units: `image` (IIMM) must tell group members apart, `text` (TIMM)
must not.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from mmel.core.features import FeatureBatch, FeatureTable, InMemoryFeatureTable
from mmel.core.types import Dataset, Mention
from mmel.data.synthetic import TOPICS, CueMix, generate_dataset
from mmel.evaluation import ScoreBlock, gold_rows_for, rank_full_kb
from mmel.experiments.ranking import ModelScorer
from mmel.features.store import build_features
from mmel.models import load_model
from mmel.models.base import MelModel
from mmel.retrieval.dense import DenseScorer
from mmel.training.recipe import load_recipe
from mmel.training.run import train

pytestmark = pytest.mark.slow  # about 30-45 s on a shared 2-core machine: image encoding and training

GROUP_SIZE = 4
CHANCE = 1 / GROUP_SIZE
NUM_ENTITIES = 40
MENTIONS_PER_SPLIT = {"train": 200, "dev": 60, "test": 160}
CUE_MIX = CueMix(image=0.6, text=0.2, both=0.2)   # the test split's image-cue share gives 96 mentions
SEED = 0
RECIPES = {"mimic": "mimic-synthetic-small-cpu", "m3el": "m3el-synthetic-small-cpu"}
UNITS = {"mimic": ("tglu", "vdlu"), "m3el": ("text", "image")}   # (text unit, image unit)
CUE_WORDS = {word for topic, keywords in TOPICS.items() for word in (topic, *keywords)}


def image_cue_rows(dataset: Dataset, split: str) -> np.ndarray:
    """Rows of `split` whose only cue is the picture; checks that their text cannot tell group members apart."""
    mentions = dataset.split(split)
    rows = np.array([row for row, mention in enumerate(mentions) if mention.extra["cue"] == "image"])
    for row in rows:
        check_only_the_image_decides(dataset, mentions[row])
    return rows


def check_only_the_image_decides(dataset: Dataset, mention: Mention) -> None:
    gold = dataset.kb[dataset.kb.row_of(mention.gold_qid)]
    namesakes = [entity for entity in dataset.kb if entity.name == gold.name]
    assert len(namesakes) == GROUP_SIZE and mention.surface == gold.name
    assert mention.image is not None and (dataset.root / mention.image).is_file()
    assert not CUE_WORDS & set(mention.sentence.lower().rstrip(".").replace(",", "").split()), mention.sentence


def without_images(table: FeatureTable) -> InMemoryFeatureTable:
    """The same features with `has_image` all False: the model then scores with its text paths only."""
    batch = table.gather(np.arange(len(table)))
    return InMemoryFeatureTable(dataclasses.replace(batch, has_image=torch.zeros_like(batch.has_image)))


def unit_score_block(model: MelModel, entities: FeatureBatch, mentions: FeatureBatch, unit: str) -> ScoreBlock:
    """Scores of one unit alone (the small [M, N] matrix, computed once)."""
    with torch.inference_mode():
        model.eval()
        scores = model.match(model.encode_mentions(mentions), model.encode_entities(entities)).unit_scores[unit]

    def score_rows(mention_rows: np.ndarray, start: int, stop: int) -> torch.Tensor:
        return scores[torch.as_tensor(mention_rows), start:stop]   # [b, n]

    return score_rows


def hits_at_1(score_block: ScoreBlock, gold_rows: np.ndarray, num_entities: int) -> float:
    """Full-KB Hits@1, ties counted against the gold entity."""
    return rank_full_kb(score_block, gold_rows, num_entities, progress=False).metrics()["hits@1"]


@pytest.mark.parametrize("model_type", ["mimic", "m3el"])
def test_the_model_links_by_the_picture_where_text_alone_stays_at_chance(model_type, linker_backbone,
                                                                         tmp_path: Path) -> None:
    dataset = generate_dataset(NUM_ENTITIES, group_size=GROUP_SIZE, mentions_per_split=MENTIONS_PER_SPLIT,
                               cue_mix=CUE_MIX, seed=SEED, out_dir=tmp_path / "data")
    recipe = load_recipe(RECIPES[model_type], ["trainer.progress=false", "trainer.num_threads=1"])
    features = build_features(dataset, linker_backbone, tmp_path / "features", template=recipe.backbone.template,
                              max_text_length=recipe.backbone.max_text_length, num_threads=1, progress=False)
    result = train(recipe, data_dir=tmp_path / "data", out_dir=tmp_path / "run", features_dir=tmp_path / "features")
    assert result.best_mrr is not None and result.counts.dev["ranked"] == MENTIONS_PER_SPLIT["dev"]
    model = load_model(result.best_dir)

    rows = image_cue_rows(dataset, "test")
    gold = gold_rows_for([dataset.split("test")[row] for row in rows], dataset.kb)
    num_entities = len(dataset.kb)
    entities = features.entities
    mentions = InMemoryFeatureTable(features.mentions["test"].gather(rows))
    text_unit, image_unit = UNITS[model_type]
    measured = {
        "model": hits_at_1(ModelScorer(model, entities, mentions, progress=False).score_block, gold, num_entities),
        "model_without_images": hits_at_1(ModelScorer(model, without_images(entities), without_images(mentions),
                                                      progress=False).score_block, gold, num_entities),
        "dense_text": hits_at_1(DenseScorer(entities).rows_scorer(mentions), gold, num_entities),
        **{unit: hits_at_1(unit_score_block(model, entities.gather(np.arange(num_entities)),
                                            mentions.gather(np.arange(len(rows))), unit), gold, num_entities)
           for unit in (text_unit, image_unit)},
    }
    assert len(rows) == 96, measured
    assert measured["model"] >= 0.8, measured
    assert measured["model_without_images"] <= 1.5 * CHANCE, measured
    assert measured["dense_text"] <= 1.5 * CHANCE, measured
    assert measured[text_unit] <= 1.5 * CHANCE, measured
    assert measured[image_unit] >= 0.6 and measured[image_unit] - measured[text_unit] >= 0.4, measured
