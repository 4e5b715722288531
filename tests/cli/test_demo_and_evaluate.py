"""`mmel demo` and `mmel evaluate` end to end on the tiny real pipeline of tests/conftest.py."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mmel.cli.main import app
from mmel.core.types import Dataset
from mmel.data.jsonl_format import write_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dataset_dir(tiny_index, tmp_path_factory):
    """The tiny dataset on disk, with its queries as the test split."""
    dataset = Dataset(name="tiny", kb=tiny_index.dataset.kb, root=tiny_index.root,
                      splits={"test": tiny_index.dataset.split("train")})
    out = tmp_path_factory.mktemp("tiny-data") / "tiny"
    write_dataset(dataset, out)
    return out


def test_demo_links_example_mentions_and_evaluates_bm25(tiny_index, tiny_dataset_dir, tmp_path):
    result = runner.invoke(app, ["demo", "--dataset", str(tiny_dataset_dir), "--model", str(tiny_index.checkpoint),
                                 "--work", str(tmp_path / "work"), "--mentions", "2"])
    assert result.exit_code == 0, result.output
    assert "Noel Harrison" in result.output and "✓ gold" in result.output
    assert "MIMIC linker on tiny test:" in result.output
    assert "bm25-name" in result.output and "full-kb" in result.output
    assert list((tmp_path / "work").glob("index-*")), "the demo index is built once under --work"


def test_evaluate_writes_reports_for_a_baseline(tiny_dataset_dir, tmp_path):
    result = runner.invoke(app, ["evaluate", str(tiny_dataset_dir), "--model", "bm25", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "tiny-test-bm25-name-full-kb.json").read_text())
    assert report["kb_size"] == 8 and report["mention_count"] == 9 and report["protocol"] == "full-kb"
    assert report["tie_policy"] == "against-gold"
    assert (tmp_path / "tiny-test-bm25-name-full-kb.md").read_text().startswith("| Dataset |")


def test_evaluate_ranks_with_a_trained_model_exhaustively_and_two_stage(tiny_index, tiny_dataset_dir, tmp_path,
                                                                         linker_backbone):
    from mmel.data import load_dataset
    from mmel.experiments.evaluate import evaluate
    from mmel.features.store import build_features

    dataset = load_dataset(tiny_dataset_dir)
    features = build_features(dataset, linker_backbone, tmp_path / "store", progress=False)
    exhaustive = evaluate(dataset, "test", str(tiny_index.checkpoint), features=features, progress=False)
    two_stage = evaluate(dataset, "test", str(tiny_index.checkpoint), features=features, first_stage="hybrid",
                         num_candidates=8, progress=False)
    assert exhaustive.metrics["hits@1"] >= 8 / 9   # the head was trained on these very queries
    assert two_stage.metrics == exhaustive.metrics  # K = the whole KB: identical ranking
    assert two_stage.model.endswith("+hybrid@8")


def test_evaluate_refuses_a_model_without_features(tiny_index, tiny_dataset_dir):
    result = runner.invoke(app, ["evaluate", str(tiny_dataset_dir), "--model", str(tiny_index.checkpoint)])
    assert result.exit_code == 1
    assert "pass --features" in result.output


def test_evaluate_ranks_a_seeded_sample_of_the_split(tiny_index, tiny_dataset_dir, tmp_path, linker_backbone):
    from mmel.data import load_dataset
    from mmel.experiments.evaluate import evaluate
    from mmel.features.store import build_features

    dataset = load_dataset(tiny_dataset_dir)
    features = build_features(dataset, linker_backbone, tmp_path / "store", progress=False)
    first = evaluate(dataset, "test", str(tiny_index.checkpoint), features=features, sample=4, seed=1, progress=False)
    again = evaluate(dataset, "test", str(tiny_index.checkpoint), features=features, sample=4, seed=1, progress=False)
    assert first.mention_count == 4 and first.split == "test (sample of 4, seed 1)"
    assert first.metrics == again.metrics
    assert evaluate(dataset, "test", "bm25", sample=4, seed=1, progress=False).mention_count == 4


def test_evaluate_refuses_features_made_with_other_preprocessing(tiny_index, tiny_dataset_dir, tmp_path,
                                                                  linker_backbone):
    from mmel.core.errors import MismatchError
    from mmel.data import load_dataset
    from mmel.experiments.evaluate import evaluate
    from mmel.features.store import build_features

    dataset = load_dataset(tiny_dataset_dir)
    features = build_features(dataset, linker_backbone, tmp_path / "store", max_text_length=16, progress=False)
    with pytest.raises(MismatchError, match="max text length 16 \\(model: 40\\)"):
        evaluate(dataset, "test", str(tiny_index.checkpoint), features=features, progress=False)


def test_name_match_baseline_and_model_with_a_name_prior(tiny_index, tiny_dataset_dir, tmp_path, linker_backbone):
    from mmel.data import load_dataset
    from mmel.experiments.evaluate import evaluate
    from mmel.features.store import build_features

    dataset = load_dataset(tiny_dataset_dir)
    features = build_features(dataset, linker_backbone, tmp_path / "store", progress=False)
    baseline = evaluate(dataset, "test", "name-match", features=features, progress=False)
    assert baseline.model == "name-match+dense-ties" and 0.0 < baseline.metrics["hits@1"] <= 1.0
    plain = evaluate(dataset, "test", "name-match", progress=False)
    assert plain.model == "name-match" and plain.metrics["hits@1"] <= baseline.metrics["hits@1"]
    for first_stage in (None, "hybrid"):
        prior = evaluate(dataset, "test", str(tiny_index.checkpoint), features=features, first_stage=first_stage,
                         num_candidates=8, name_prior_weight=1e6, progress=False)
        assert "+name-prior" in prior.model and prior.extra["name_prior_weight"] == 1e6
        # a huge weight makes the name match decide and the model only break its ties
        assert prior.metrics["hits@1"] >= baseline.metrics["hits@1"] - 1e-9
    with pytest.raises(ValueError, match="trained models only"):
        evaluate(dataset, "test", "bm25", name_prior_weight=2.0, progress=False)


def test_tune_name_prior_writes_the_best_weight_into_the_checkpoint(tiny_index, tiny_dataset_dir, tmp_path,
                                                                     linker_backbone):
    import shutil

    from mmel.data import load_dataset
    from mmel.features.store import build_features
    from mmel.retrieval.index_build import ModelSpec

    checkpoint = shutil.copytree(tiny_index.checkpoint, tmp_path / "ckpt")
    build_features(load_dataset(tiny_dataset_dir), linker_backbone, tmp_path / "store", progress=False)
    result = runner.invoke(app, ["tune-name-prior", str(checkpoint), "--dataset", str(tiny_dataset_dir), "--features",
                                 str(tmp_path / "store"), "--split", "test", "--weight", "0", "--weight", "3",
                                 "--candidates", "8", "--write"])
    assert result.exit_code == 0, result.output
    assert "| weight | H@1 |" in result.output and "(best)" in result.output
    best_row = next(line for line in result.output.splitlines() if "(best)" in line)
    assert ModelSpec.read(checkpoint).name_prior_weight == float(best_row.split("|")[1].split()[0])
    header = json.loads((checkpoint / "config.json").read_text())
    assert header["inference"]["tuned_on"].startswith("tiny test")


def test_fit_prior_writes_the_context_prior_that_evaluate_and_the_index_serve(tiny_index, tiny_dataset_dir, tmp_path,
                                                                             linker_backbone):
    import shutil

    from mmel.core.checkpoint import update_checkpoint_header
    from mmel.data import load_dataset
    from mmel.features.store import build_features
    from mmel.retrieval.index_build import ModelSpec, build_index
    from mmel.retrieval.linker import Linker

    checkpoint = shutil.copytree(tiny_index.checkpoint, tmp_path / "ckpt")
    build_features(load_dataset(tiny_dataset_dir), linker_backbone, tmp_path / "store", progress=False)
    common = ["--dataset", str(tiny_dataset_dir), "--features", str(tmp_path / "store"), "--split", "test",
              "--candidates", "8"]
    result = runner.invoke(app, ["fit-prior", str(checkpoint), *common, "--folds", "2", "--feature", "name_match",
                                 "--feature", "shared_words", "--ablation", "--write"])
    assert result.exit_code == 0, result.output
    assert "| context prior (fitted) |" in result.output and "| shared_words |" in result.output
    assert "| context prior without name_match |" in result.output
    assert set(ModelSpec.read(checkpoint).prior.weights) == {"name_match", "shared_words"}
    assert json.loads((checkpoint / "config.json").read_text())["inference"]["tuned_on"].startswith("tiny test")
    # the tiny model ranks its split alone (the fit gives ~0 weights): serve a prior that matters
    update_checkpoint_header(checkpoint, "inference", {"prior_weights": {"name_match": 1.0, "shared_words": 0.5}})
    prior = ModelSpec.read(checkpoint).prior
    build_index(load_dataset(tiny_dataset_dir), checkpoint, tmp_path / "index", backbone=linker_backbone,
                progress=False)
    with Linker.load(tmp_path / "index", backbone=linker_backbone) as linker:
        assert linker.prior == prior   # the index serves the checkpoint's prior
    evaluated = runner.invoke(app, ["evaluate", str(tiny_dataset_dir), "--model", str(checkpoint), "--features",
                                    str(tmp_path / "store"), "--first-stage", "hybrid", "--candidates", "8",
                                    "--fitted-prior", "--index", str(tmp_path / "index"), "--out",
                                    str(tmp_path / "reports")])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(next((tmp_path / "reports").glob("*.json")).read_text())
    assert report["model"].endswith(f"+context-prior-{prior.fingerprint()}+hybrid@8")
    assert report["extra"]["prior"] == prior.to_dict()
    refused = runner.invoke(app, ["evaluate", str(tiny_dataset_dir), "--model", str(checkpoint), "--features",
                                  str(tmp_path / "store"), "--fitted-prior"])
    assert refused.exit_code == 1 and "first stage" in refused.output


def test_evaluate_under_dims_candidate_protocol_is_labelled_and_counts_gold_wins_ties(tiny_index, tiny_dataset_dir,
                                                                                      tmp_path, linker_backbone):
    from mmel.data import load_dataset
    from mmel.experiments.evaluate import evaluate
    from mmel.features.store import build_features

    dataset = load_dataset(tiny_dataset_dir)
    features = build_features(dataset, linker_backbone, tmp_path / "store", progress=False)
    full = evaluate(dataset, "test", str(tiny_index.checkpoint), features=features, progress=False)
    dim = evaluate(dataset, "test", str(tiny_index.checkpoint), features=features, protocol="dim-candidates",
                   num_candidates=3, progress=False)
    assert dim.protocol == "dim-candidates-3" and dim.tie_policy == "gold-wins"
    assert dim.extra["protocol_label"].startswith("candidate-limited (DIM protocol")
    assert set(dim.extra["dim_top_k"]) == {"top@1", "top@5", "top@10", "top@20"}
    assert dim.extra["dim_top_k"]["top@1"] == pytest.approx(dim.metrics["hits@1"])   # no NIL: same denominator
    # among at most 4 entities (3 candidates + the gold) the gold can only do as well as over the whole KB
    assert dim.metrics["hits@1"] >= full.metrics["hits@1"] and dim.metrics["mr"] <= 4


def test_unit_analysis_ranks_the_served_shortlist_by_each_unit(tiny_index, tiny_dataset_dir, tmp_path,
                                                               linker_backbone):
    from mmel.data import load_dataset
    from mmel.experiments.evaluate import evaluate, link_split_once
    from mmel.experiments.units import MODEL, unit_analysis
    from mmel.features.store import build_features

    dataset = load_dataset(tiny_dataset_dir)
    features = build_features(dataset, linker_backbone, tmp_path / "store", progress=False)
    analysis = unit_analysis(dataset, "test", tiny_index.checkpoint, features, num_candidates=8, progress=False)
    served = evaluate(dataset, "test", str(tiny_index.checkpoint), features=features, first_stage="hybrid",
                      num_candidates=8, progress=False)
    assert analysis.metrics[MODEL] == pytest.approx(served.metrics)   # the model row is the served linker's
    _, linked = link_split_once(dataset, "test", tiny_index.checkpoint, features, num_candidates=8, progress=False)
    units = list(linked[0].candidates[0].unit_scores)
    assert list(analysis.metrics) == [MODEL, *units] and len(units) >= 2
    mentions = analysis.mentions
    for unit in units:
        # by hand: the gold is first by the unit when its unit score beats every other candidate's
        wins = 0
        for result, mention in zip(linked, dataset.split("test"), strict=True):
            scores = {c.qid: c.unit_scores[unit] for c in result.candidates}
            gold = scores.get(mention.gold_qid)
            wins += gold is not None and all(score < gold for qid, score in scores.items() if qid != mention.gold_qid)
        assert analysis.metrics[unit]["hits@1"] == pytest.approx(wins / mentions)
        moved = analysis.unit_right_model_wrong[unit] - analysis.model_right_unit_wrong[unit]
        assert moved == round(mentions * (analysis.metrics[unit]["hits@1"] - analysis.metrics[MODEL]["hits@1"]))
        assert 0.0 <= analysis.scored_pairs[unit] <= 1.0

    out = tmp_path / "units.json"
    result = runner.invoke(app, ["unit-analysis", str(tiny_index.checkpoint), "--dataset", str(tiny_dataset_dir),
                                 "--features", str(tmp_path / "store"), "--candidates", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| unit | H@1 |" in result.output and f"| {units[0]} |" in result.output
    assert json.loads(out.read_text())["metrics"][MODEL]["hits@1"] == pytest.approx(served.metrics["hits@1"])
