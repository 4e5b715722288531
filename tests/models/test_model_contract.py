"""The model contract: a model defined here, in one class pair plus a registry line, trains, evaluates,
indexes, links and serves with no other change to mmel; and every registered model keeps the contract."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import httpx
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from typer.testing import CliRunner

from mmel.cli.main import app
from mmel.core.features import FeatureBatch
from mmel.core.types import Dataset
from mmel.data import load_dataset
from mmel.data.jsonl_format import write_dataset
from mmel.experiments.evaluate import evaluate
from mmel.features.store import build_features
from mmel.models import MODELS, load_model
from mmel.models.base import MelModel, MelModelConfig, RowCache, cache_field
from mmel.models.outputs import MatchOutput
from mmel.retrieval.index_build import build_index
from mmel.retrieval.linker import Linker

runner = CliRunner()


# --- the whole model: a config, two caches, a class ---------------------------------------------

@dataclass
class TinyDotConfig(MelModelConfig):
    model_type: ClassVar[str] = "tinydot"
    hidden_dim: int = 8


@dataclass
class TinyDotCache(RowCache):
    vector: torch.Tensor = cache_field("D")        # projected global text vector


class TinyDotModel(MelModel):
    """Score = <W t_m, W t_e> / sqrt(D): a dual encoder over the global text vectors."""

    config_class = TinyDotConfig
    entity_cache_class = TinyDotCache
    mention_cache_class = TinyDotCache
    unit_names = ("dot",)

    def __init__(self, config: TinyDotConfig):
        super().__init__(config)
        self.project = nn.Linear(config.text_dim, config.hidden_dim)

    def cache_sizes(self, text_length: int, image_tokens: int) -> dict[str, int]:
        return {**super().cache_sizes(text_length, image_tokens), "D": self.config.hidden_dim}

    def _encode(self, batch: FeatureBatch) -> TinyDotCache:
        self.check_widths(batch)
        return TinyDotCache(vector=self.project(batch.text_global) / self.config.hidden_dim ** 0.25)

    encode_entities = _encode
    encode_mentions = _encode

    def match(self, mentions: TinyDotCache, entities: TinyDotCache) -> MatchOutput:
        scores = mentions.vector @ entities.vector.T                                      # [B, N]
        return MatchOutput(scores=scores, unit_scores={"dot": scores})

    def forward(self, mentions: FeatureBatch, entities: FeatureBatch, labels: torch.Tensor | None = None,
                entity_ids: torch.Tensor | None = None) -> MatchOutput:
        output = self.match(self.encode_mentions(mentions), self.encode_entities(entities))
        if labels is not None:
            output.loss = F.cross_entropy(output.scores, labels)
            output.unit_losses = {"dot": output.loss}
        return output


@pytest.fixture
def tinydot_registered(monkeypatch):
    """The one registry line (a test cannot edit mmel/models/__init__.py, so it patches the table)."""
    monkeypatch.setitem(MODELS._table, "tinydot", f"{__name__}:TinyDotModel")


@pytest.mark.slow
def test_a_model_defined_in_the_tests_trains_evaluates_indexes_links_and_serves(
        tinydot_registered, tiny_index, linker_backbone, serve_app, tmp_path):
    from mmel.server.app import create_app
    from mmel.server.settings import ServerSettings

    data_dir = tmp_path / "tiny"
    write_dataset(Dataset(name="tiny", kb=tiny_index.dataset.kb, root=tiny_index.root,
                          splits={"train": tiny_index.dataset.split("train"),
                                  "dev": tiny_index.dataset.split("train")}), data_dir)
    dataset = load_dataset(data_dir)
    store = tmp_path / "store"
    features = build_features(dataset, linker_backbone, store, progress=False, num_threads=1)
    recipe = {
        "name": "tinydot-test", "model": {"type": "tinydot", "options": {"hidden_dim": 8}},
        "backbone": {"template": "mimic"}, "data": {"batch_size": 9, "hard_negatives": 0},
        "optimizer": {"lr": 0.05, "eps": 1e-8},
        "trainer": {"max_epochs": 40, "check_val_every_n_epoch": 10, "accelerator": "cpu", "progress": False,
                    "log_every_n_steps": 1, "early_stopping_patience": 10},
        "validation": {"mention_batch_size": 9}}
    (tmp_path / "tinydot.yaml").write_text(yaml.safe_dump(recipe))

    trained = runner.invoke(app, ["train", "--recipe", str(tmp_path / "tinydot.yaml"), "--data", str(data_dir),
                                  "--features", str(store), "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    checkpoint = tmp_path / "run" / "best"
    assert isinstance(load_model(checkpoint), TinyDotModel)

    exhaustive = evaluate(dataset, "train", str(checkpoint), features=features, progress=False)
    served = evaluate(dataset, "train", str(checkpoint), features=features, first_stage="hybrid",
                      num_candidates=8, progress=False)
    assert exhaustive.metrics["hits@1"] >= 5 / 9          # it learned the training sentences, text alone
    assert served.metrics == exhaustive.metrics            # K = the whole KB: the linker ranks the same

    build_index(dataset, checkpoint, tmp_path / "index", features_store=store, backbone=linker_backbone,
                progress=False)
    sentence, surface, gold = tiny_index.queries[2]
    with Linker.load(tmp_path / "index", backbone=linker_backbone) as linker:
        result = linker.link(sentence, mention=surface, top_k=3)
        assert result.best.qid == gold and set(result.best.unit_scores) == {"dot"}
        settings = ServerSettings(index_dir=tmp_path / "index")
        with serve_app(create_app(settings, linker=linker)) as url:
            answer = httpx.post(f"{url}/link", json={"sentence": sentence, "mention": surface, "top_k": 3},
                                timeout=30).json()
    assert answer["candidates"][0]["qid"] == gold
    assert answer["candidates"][0]["unit_scores"].keys() == {"dot"}


# --- every registered model keeps the contract ----------------------------------------------------

WIDTHS = {"text_dim": 16, "image_global_dim": 12, "image_patch_dim": 10}
TEXT_LENGTH, IMAGE_TOKENS = 6, 5


def random_batch(count: int, seed: int) -> FeatureBatch:
    generator = torch.Generator().manual_seed(seed)
    from mmel.core.features import PooledView

    def pooled() -> PooledView:
        return PooledView(torch.randn(count, 16, generator=generator), torch.arange(count) % 2 == 0)

    return FeatureBatch(text_global=torch.randn(count, 16, generator=generator),
                        text_tokens=torch.randn(count, TEXT_LENGTH, 16, generator=generator),
                        text_mask=torch.ones(count, TEXT_LENGTH, dtype=torch.bool),
                        image_global=torch.randn(count, 12, generator=generator),
                        image_patches=torch.randn(count, IMAGE_TOKENS, 10, generator=generator),
                        has_image=torch.arange(count) % 3 != 0,
                        views={name: pooled() for name in ("mention", "caption")})


@pytest.mark.parametrize("model_type", MODELS.names())
def test_every_registered_model_keeps_the_contract(model_type, tmp_path):
    model_class = MODELS.get(model_type)
    model = model_class(model_class.config_class.from_dict(dict(WIDTHS))).eval()
    assert issubclass(model.config_class, MelModelConfig) and model.config_class.model_type == model_type
    entities, mentions = random_batch(7, 0), random_batch(3, 1)
    with torch.inference_mode():
        entity_cache, mention_cache = model.encode_entities(entities), model.encode_mentions(mentions)
        assert isinstance(entity_cache, model.entity_cache_class)
        assert isinstance(mention_cache, model.mention_cache_class)
        layout = model.entity_cache_layout(TEXT_LENGTH, IMAGE_TOKENS)
        assert {name: tuple(getattr(entity_cache, name).shape[1:]) for name in layout} == \
            {name: shape for name, (shape, _) in layout.items()}
        assert [f.name for f in dataclasses.fields(entity_cache)] == list(layout)
        full = model.match(mention_cache, entity_cache)
        assert full.scores.shape == (3, 7) and set(full.unit_scores) == set(model.unit_names)
        candidates = torch.tensor([[6, 0, 2], [1, 1, 5], [3, 4, 0]])
        per_mention = model.match_candidates(mention_cache, entity_cache, candidates)
        torch.testing.assert_close(per_mention.scores, full.scores.gather(1, candidates), rtol=1e-5, atol=1e-5)
        reloaded = type(model).from_pretrained(model.save_pretrained(tmp_path / "model"))
        torch.testing.assert_close(reloaded.match(reloaded.encode_mentions(mentions),
                                                  reloaded.encode_entities(entities)).scores, full.scores)
    output = model.train()(mentions, entities.select(slice(0, 3)), labels=torch.arange(3),
                           entity_ids=torch.arange(3))
    assert output.loss is not None and torch.isfinite(output.loss)
    output.loss.backward()
