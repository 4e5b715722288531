"""M3EL and DIM checkpoints link through the index, the CLI and the server, like MIMIC's.

Each head is trained for a few seconds on the tiny real pipeline of tests/conftest.py (offline
MiniLM + EfficientNet features of the very queries it then links), with the text views its model
declares: M3EL reads `name [SEP] description`, DIM the description alone plus the pooled
`mention` and `caption` views of every query.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmel.cli.main import app
from mmel.features.store import build_features
from mmel.features.templates import template_for_views
from mmel.models import MODELS
from mmel.retrieval.index_build import build_index
from mmel.retrieval.linker import Linker

pytestmark = pytest.mark.slow
runner = CliRunner()
UNITS = {"m3el": {"text", "image", "cross"}, "dim": set()}
STEPS = {"m3el": 40, "dim": 150}


def _trained_head(model_type: str, tiny_index, linker_backbone, store):
    model_class = MODELS.get(model_type)
    probe = model_class(model_class.config_class.from_dict({"text_dim": 384, "image_global_dim": 1280,
                                                             "image_patch_dim": 1280}))
    views = probe.feature_views()
    dataset = tiny_index.dataset
    features = build_features(dataset, linker_backbone, store, template=template_for_views(views).name,
                              extra_views=views.mention_extra + views.entity_extra, progress=False, num_threads=1)
    entities = features.entities.gather(np.arange(len(dataset.kb))).map_tensors(torch.clone)
    mentions = features.mentions["train"].gather(np.arange(len(dataset.split("train")))).map_tensors(torch.clone)
    labels = torch.tensor([dataset.kb.row_of(mention.gold_qid) for mention in dataset.split("train")])
    torch.manual_seed(0)
    model = probe
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(STEPS[model_type]):
        optimizer.zero_grad()
        model(mentions, entities, labels, entity_ids=torch.arange(len(dataset.kb))).loss.backward()
        optimizer.step()
    return model.eval(), views


@pytest.mark.parametrize("model_type", ["m3el", "dim"])
def test_a_checkpoint_links_through_index_cli_and_server(model_type, tiny_index, linker_backbone, serve_app,
                                                        tmp_path):
    from mmel.server.app import create_app
    from mmel.server.settings import ServerSettings

    model, views = _trained_head(model_type, tiny_index, linker_backbone, tmp_path / "store")
    checkpoint = tmp_path / model_type
    model.save_pretrained(checkpoint, metadata={
        "backbone": {"name": linker_backbone.name, "fingerprint": linker_backbone.fingerprint, "num_patches": 49},
        "preprocess": {"template": template_for_views(views).to_dict(), "max_text_length": 40}})
    build_index(tiny_index.dataset, checkpoint, tmp_path / "index", features_store=tmp_path / "store",
                backbone=linker_backbone, progress=False)

    with Linker.load(tmp_path / "index", backbone=linker_backbone) as linker:
        results = linker.link_mentions(tiny_index.dataset.split("train"), tiny_index.root, top_k=3)
        correct = sum(r.best.qid == m.gold_qid for r, m in zip(results, tiny_index.dataset.split("train"),
                                                                 strict=True))
        assert correct >= 7, f"{model_type} links {correct}/9 of the sentences it was trained on"
        assert set(results[0].best.unit_scores) == UNITS[model_type]
        sentence, surface, gold = next(q for q, r in zip(tiny_index.queries, results, strict=True)
                                       if r.best.qid == q[2])
        with serve_app(create_app(ServerSettings(index_dir=tmp_path / "index"), linker=linker)) as url:
            answer = httpx.post(f"{url}/link", json={"sentence": sentence, "mention": surface, "top_k": 3},
                                timeout=30).json()
        assert answer["candidates"][0]["qid"] == gold

    shell = runner.invoke(app, ["link", str(tmp_path / "index"), "--sentence", sentence, "--mention", surface,
                                "--top-k", "3", "--json"])
    assert shell.exit_code == 0, shell.output
    assert json.loads(shell.stdout)["candidates"][0]["qid"] == gold


def test_a_dual_encoder_index_ranks_the_whole_kb_by_the_models_own_scores(tiny_index, linker_backbone, tmp_path):
    """DIM's score is one cosine per pair: FAISS over its own vectors, no reranking, is exact full-KB ranking."""
    from mmel.core.errors import UsageError
    from mmel.retrieval.index_build import IndexBuildConfig

    model, views = _trained_head("dim", tiny_index, linker_backbone, tmp_path / "store")
    checkpoint = tmp_path / "dim"
    model.save_pretrained(checkpoint, metadata={
        "backbone": {"name": linker_backbone.name, "fingerprint": linker_backbone.fingerprint, "num_patches": 49},
        "preprocess": {"template": template_for_views(views).to_dict(), "max_text_length": 40}})
    config = IndexBuildConfig(first_stage="dense", reranker="none", vectors="model")
    build_index(tiny_index.dataset, checkpoint, tmp_path / "index", config=config, features_store=tmp_path / "store",
                backbone=linker_backbone, progress=False)
    dataset = tiny_index.dataset
    features = build_features(dataset, linker_backbone, tmp_path / "store", template=template_for_views(views).name,
                              extra_views=views.mention_extra, progress=False, num_threads=1)
    with torch.inference_mode():
        exact = model.match(model.encode_mentions(features.mentions["train"].gather(np.arange(9))),
                            model.encode_entities(features.entities.gather(np.arange(len(dataset.kb))))).scores
    with Linker.load(tmp_path / "index", backbone=linker_backbone) as linker:
        assert linker.info()["vectors"] == "model" and linker.info()["reranker"] == "none"
        results = linker.link_mentions(dataset.split("train"), tiny_index.root, top_k=len(dataset.kb),
                                       candidates_k=len(dataset.kb))
    for row, result in enumerate(results):
        order = torch.argsort(exact[row], descending=True, stable=True)
        assert [c.qid for c in result.candidates] == [dataset.kb.qids[i] for i in order.tolist()]
        # queries are encoded on the fly (float32), the reference reads them from the float16 store
        np.testing.assert_allclose([c.score for c in result.candidates], exact[row][order].numpy(), atol=1e-4)

    mimic_config = IndexBuildConfig(first_stage="dense", reranker="none", vectors="model")
    with pytest.raises(UsageError, match="cannot search its scores"):
        build_index(dataset, tiny_index.checkpoint, tmp_path / "mimic-index", config=mimic_config,
                    features_store=tmp_path / "store-mimic", backbone=linker_backbone, progress=False)
