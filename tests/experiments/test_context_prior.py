"""Fitting the context prior: the conditional logit recovers planted weights, and `mmel fit-prior` writes them."""

from __future__ import annotations

import numpy as np
import pytest

from mmel.core.errors import UsageError
from mmel.experiments.context_prior import fit_weights
from mmel.lexical.context_features import FEATURE_NAMES


def planted_choices(model_weight: float, feature_weights: dict[str, float], mentions: int = 3000, candidates: int = 6,
                    seed: int = 0):
    """Shortlists whose gold is drawn from softmax(a * model + sum_f b_f * f): what the fit must recover."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(mentions, candidates))
    features = rng.integers(0, 2, size=(mentions, candidates, len(FEATURE_NAMES))).astype(float)
    logits = model_weight * scores + sum(weight * features[:, :, FEATURE_NAMES.index(name)]
                                         for name, weight in feature_weights.items())
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    gold = [int(rng.choice(candidates, p=row)) for row in probabilities]
    return scores.tolist(), features.tolist(), gold


def test_the_fit_recovers_planted_weights_relative_to_the_model():
    scores, features, gold = planted_choices(2.0, {"name_match": 3.0, "year_before_birth": -2.0})
    model_weight, weights = fit_weights(scores, features, gold, ["name_match", "year_before_birth", "shared_words"])
    assert model_weight == pytest.approx(2.0, rel=0.15)
    assert weights["name_match"] == pytest.approx(1.5, rel=0.15)
    assert weights["year_before_birth"] == pytest.approx(-1.0, rel=0.15)
    assert abs(weights["shared_words"]) < 0.1   # a feature the choices ignore gets about 0


def test_mentions_without_their_gold_are_left_out_and_shortlists_may_be_short():
    scores, features, gold = planted_choices(2.0, {"name_match": 3.0}, mentions=2000)
    scores[0], features[0] = scores[0][:3], features[0][:3]
    gold[0] = min(gold[0], 2)
    gold[1] = -1
    _, weights = fit_weights(scores, features, gold, ["name_match"])
    assert weights["name_match"] == pytest.approx(1.5, rel=0.15)
    with pytest.raises(UsageError, match="nothing to fit"):
        fit_weights(scores, features, [-1] * len(gold), ["name_match"])
