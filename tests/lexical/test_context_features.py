"""Context features of (mention, entity) pairs and the prior that weights them."""

from __future__ import annotations

import math

import pytest

from mmel.core.types import Entity, Mention
from mmel.lexical.context_features import (
    FEATURE_NAMES,
    NO_PRIOR,
    ContextPrior,
    EntityFacts,
    MentionFacts,
    candidate_features,
    pair_features,
)

CHRIS = Entity("Q1", "Chris Christie", "Sex: male. Birth: 1962, Newark. Occupation: lawyer, politician.")
JULIE = Entity("Q2", "Julie Christie", "Sex: female. Birth: 1940, Chabua. Occupation: actor, film actor. "
                                       "Spouse: Duncan Campbell.")
AGATHA = Entity("Q3", "Agatha Christie", "Sex: female. Birth: 1890-09-15, Torquay. Death: 1976-01-12, Wallingford. "
                                         "Occupation: novelist, writer.")
UNDATED = Entity("Q4", "Christie", "")


def features(sentence: str, surface: str, entity: Entity) -> dict[str, float]:
    return dict(zip(FEATURE_NAMES, pair_features(MentionFacts.of(Mention("m", sentence, surface)),
                                                 EntityFacts.of(entity)), strict=True))


def test_years_place_the_mention_in_the_entitys_life():
    in_1966 = "Christie in 1966"
    assert features(in_1966, "Christie", CHRIS)["year_in_childhood"] == 1.0          # aged 4
    assert features(in_1966, "Christie", CHRIS)["year_in_adult_life"] == 0.0
    assert features(in_1966, "Christie", JULIE)["year_in_adult_life"] == 1.0         # aged 26, alive
    assert features("Christie in 1950", "Christie", CHRIS)["year_before_birth"] == 1.0
    assert features("Christie's grave, 1990", "Christie", AGATHA)["year_after_death"] == 1.0
    assert features("Christie in 1930", "Christie", AGATHA)["year_in_adult_life"] == 1.0   # ISO dates read too
    for entity in (UNDATED, CHRIS):   # no birth year, or no year in the sentence: nothing fires
        dated = features("Christie on stage" if entity is CHRIS else in_1966, "Christie", entity)
        assert not any(dated[name] for name in FEATURE_NAMES if name.startswith("year_"))


def test_gendered_words_agree_or_conflict_with_the_entitys_sex():
    her = "Christie at an event honoring her career"
    assert features(her, "Christie", JULIE)["pronoun_agrees"] == 1.0
    assert features(her, "Christie", CHRIS)["pronoun_conflicts"] == 1.0
    assert features(her, "Christie", UNDATED)["pronoun_agrees"] == features(her, "Christie", UNDATED)[
        "pronoun_conflicts"] == 0.0
    both = features("He met her", "Christie", JULIE)   # he and she cancel out
    assert both["pronoun_agrees"] == both["pronoun_conflicts"] == 0.0


def test_shared_words_count_content_stems_beyond_the_name_and_length_reads_the_entry():
    sentence = "Christie with her husband Duncan Campbell, an actor"
    julie = features(sentence, "Christie", JULIE)
    assert julie["shared_words"] == pytest.approx(math.log1p(3))   # duncan, campb(ell), actor: not "christie"
    assert features(sentence, "Christie", CHRIS)["shared_words"] == 0.0
    assert julie["entry_length"] == pytest.approx(math.log1p(len(JULIE.attributes)))
    assert julie["name_match"] == 1.0 and features(sentence, "Julie Christie", JULIE)["name_match"] == 2.0


def test_candidate_features_are_one_row_per_candidate_in_feature_order():
    mention = Mention("m", "Christie in 1966", "Christie")
    rows = candidate_features(mention, [CHRIS, JULIE])
    assert len(rows) == 2 and all(len(row) == len(FEATURE_NAMES) for row in rows)
    assert rows[0] == pair_features(MentionFacts.of(mention), EntityFacts.of(CHRIS))


def test_the_prior_adds_weighted_features_to_the_model_scores():
    rows = candidate_features(Mention("m", "Christie in 1966", "Christie"), [CHRIS, JULIE])
    prior = ContextPrior({"name_match": 2.0, "year_in_childhood": -3.0})
    scores = prior.apply([0.5, 0.25], rows)
    assert scores == pytest.approx([0.5 + 2.0 - 3.0, 0.25 + 2.0])
    assert NO_PRIOR.apply([0.5, 0.25], rows) == [0.5, 0.25] and not NO_PRIOR
    assert ContextPrior.name_only(4.0).to_dict() == {"name_match": 4.0} and not ContextPrior.name_only(0.0)
    assert prior.beyond_name and not ContextPrior.name_only(4.0).beyond_name


@pytest.mark.parametrize("weights", [{"popularity": 1.0}, {"name_match": -1.0}, {"shared_words": math.nan}])
def test_the_prior_refuses_unknown_features_and_bad_weights(weights):
    with pytest.raises(ValueError, match=r"unknown context features|finite"):
        ContextPrior(weights)


def test_a_life_date_in_the_sentence_and_the_rest_of_the_name_point_to_the_entity():
    sentence = "Agatha Mary Clarissa Christie (15 September 1890 - 12 January 1976) was an English writer"
    agatha = features(sentence, "Christie", AGATHA)
    assert agatha["year_of_birth_or_death"] == 1.0 and features(sentence, "Christie", JULIE)[
        "year_of_birth_or_death"] == 0.0
    assert agatha["name_in_sentence"] == 1.0                        # "agatha" and "christie" both there
    assert features(sentence, "Christie", JULIE)["name_in_sentence"] == 0.5
    assert features("a photo", "Christie", UNDATED)["name_in_sentence"] == 0.0
