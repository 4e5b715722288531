"""DIM's TF-IDF negative sampler (models.md §4.4): exact distribution on a tiny KB, fallbacks, seeding."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from mmel.training.negatives import TfidfNegativeSampler, uniform_other_rows

TEXTS = [
    "zebra zebra lion",      # 0: the gold of the distribution test
    "zebra",                 # 1
    "zebra zebra zebra",     # 2
    "lion",                  # 3
    "apple",                 # 4: shares nothing with 0
    "banana apple",          # 5
    "the of and",            # 6: stop words only, no sampling word
    "xylophone",             # 7: a word no other entity has
]


def frequencies(values: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(values.ravel(), minlength=size) / values.size


def test_word_draws_follow_tfidf_weights_then_term_counts_and_never_return_the_gold() -> None:
    sampler = TfidfNegativeSampler(word_probability=1.0).fit(TEXTS)
    negatives = sampler.sample(np.zeros(40_000, dtype=np.int64), np.random.default_rng(0))
    # independent expectation: P(word) from the gold's TF-IDF row, then P(entity | word) ∝ its count, gold excluded
    vectorizer = TfidfVectorizer(stop_words="english")
    gold_row = vectorizer.fit_transform(TEXTS)[0].toarray().ravel()
    vocabulary = vectorizer.vocabulary_
    zebra, lion = gold_row[vocabulary["zebra"]], gold_row[vocabulary["lion"]]
    p_zebra, p_lion = zebra / (zebra + lion), lion / (zebra + lion)
    expected = np.zeros(len(TEXTS))
    expected[1], expected[2], expected[3] = p_zebra * 1 / 4, p_zebra * 3 / 4, p_lion
    np.testing.assert_allclose(frequencies(negatives, len(TEXTS)), expected, atol=0.01)
    assert p_zebra > p_lion      # the repeated word weighs more


def test_golds_without_sampling_words_fall_back_to_uniform_over_the_others() -> None:
    sampler = TfidfNegativeSampler().fit(TEXTS)
    assert sampler.has_words.tolist() == [True, True, True, True, True, True, False, False]
    for gold in (6, 7):   # stop words only; a word unique to the gold
        negatives = sampler.sample(np.full(21_000, gold), np.random.default_rng(gold))
        expected = np.full(len(TEXTS), 1 / (len(TEXTS) - 1))
        expected[gold] = 0.0
        np.testing.assert_allclose(frequencies(negatives, len(TEXTS)), expected, atol=0.01)


def test_the_uniform_share_follows_word_probability() -> None:
    sampler = TfidfNegativeSampler(word_probability=0.95).fit(TEXTS)
    negatives = sampler.sample(np.full(40_000, 3), np.random.default_rng(1))   # "lion": its word leads to 0 only
    counts = frequencies(negatives, len(TEXTS))
    assert counts[3] == 0.0
    np.testing.assert_allclose(counts[0], 0.95 + 0.05 / 7, atol=0.01)
    np.testing.assert_allclose(counts[[1, 2, 4, 5, 6, 7]], np.full(6, 0.05 / 7), atol=0.005)
    uniform = TfidfNegativeSampler(word_probability=0.0).fit(TEXTS).sample(np.full(7_000, 3), np.random.default_rng(2))
    assert frequencies(uniform, len(TEXTS))[0] < 0.2


def test_sampling_is_seeded_vectorised_and_keeps_the_shape_on_a_larger_kb() -> None:
    generator = np.random.default_rng(3)
    words = [f"w{i}" for i in range(500)]
    texts = [" ".join(generator.choice(words, size=8)) for _ in range(5_000)]
    sampler = TfidfNegativeSampler().fit(texts)
    golds = generator.integers(0, 5_000, size=(2_000, 3))
    first = sampler.sample(golds, np.random.default_rng(7))
    assert first.shape == golds.shape and first.dtype == np.int64
    assert np.array_equal(first, sampler.sample(golds, np.random.default_rng(7)))
    assert not np.array_equal(first, sampler.sample(golds, np.random.default_rng(8)))
    assert not np.any(first == golds)
    token_sets = [set(text.split()) for text in texts]
    shares_a_word = np.mean([bool(token_sets[g] & token_sets[n]) for g, n in zip(golds.ravel(), first.ravel(),
                                                                                   strict=True)])
    assert shares_a_word > 0.94


def test_uniform_other_rows_never_returns_the_gold() -> None:
    golds = np.array([0, 1, 2] * 1000)
    draws = uniform_other_rows(golds, 3, np.random.default_rng(4))
    assert not np.any(draws == golds) and set(draws.tolist()) == {0, 1, 2}


def test_misuse_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="at least 2 entities"):
        TfidfNegativeSampler().fit(["one"])
    with pytest.raises(ValueError, match="no entity text has a word"):
        TfidfNegativeSampler().fit(["", "the"])
    with pytest.raises(ValueError, match="word_probability"):
        TfidfNegativeSampler(word_probability=1.5)
    with pytest.raises(RuntimeError, match="fit"):
        TfidfNegativeSampler().sample([0], np.random.default_rng(0))
    with pytest.raises(ValueError, match="gold rows must lie"):
        TfidfNegativeSampler().fit(TEXTS).sample([8], np.random.default_rng(0))
