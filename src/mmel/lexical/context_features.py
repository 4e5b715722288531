"""Context features of a (mention, entity) pair: what the sentence and the entity's text say about each other.

The trained models rank most of a mention's namesakes right, but 507 of WikiMEL's 552 test errors
with the name prior are namesakes (docs/RESULTS.md, issue 16), and many of them are settled by facts a
small model reads badly from text: a photo "in 1966" cannot show a man born in 1962 as an adult, a
sentence about "her career" is not about a man, a biography naming the entity's spouse or birthplace
or its year of death points to it, a sentence that spells out the rest of the name ("Theodore II
Doukas Laskaris" for the surface "Laskaris") points to the namesake with that name, and of two
namesakes the one with the longer KB entry is usually the one a caption names. Each fact is one
number, so a linear prior over them can be fitted on a dev split (`mmel fit-prior`) and added to
the model's score at reranking (`retrieval.reranking`):

    score(m, e) = model(m, e) + sum_f w_f * f(m, e)        f in FEATURE_NAMES

The name prior (`name_match`, tuned alone by `mmel tune-name-prior`) is the one-feature case.
These are mmel additions, not part of any published model. Every feature is computed from the
mention and the entity alone (no statistics of a KB or a training split), so a prior fitted on one
KB applies unchanged after KB edits.

Entity facts are read from the "Key: value." attribute text of the WikiMEL / RichpediaMEL KBs
("Sex: male. Birth: 1900, Erie. Death: 1972, ..."); an entity without them gets 0 for the
year and pronoun features.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from mmel.core.types import Entity, Mention
from mmel.lexical.name_match import name_match, name_tokens

FEATURE_NAMES = (
    "name_match",            # name_match(surface, name), in [0, 2]
    "year_before_birth",     # 1: the sentence names a year before the entity was born
    "year_after_death",      # 1: ... a year after it died (posthumous mentions exist: a weak signal)
    "year_in_childhood",     # 1: ... a year within its first 16 years
    "year_in_adult_life",    # 1: ... a year from its 16th birthday to its death (or 100th birthday)
    "year_of_birth_or_death",  # 1: ... its year of birth or of death ("(1501 - 19 May 1536) was Queen of ...")
    "pronoun_agrees",        # 1: the sentence's gendered words agree with the entity's sex
    "pronoun_conflicts",     # 1: ... contradict it
    "shared_words",          # log(1 + content-word stems shared by the sentence and the entity text)
    "name_in_sentence",      # share of the entity name's tokens anywhere in the sentence ("Theodore II ... Laskaris")
    "entry_length",          # log(1 + characters of the entity's text): how much the KB knows of it
)

_YEAR = re.compile(r"(?<!\d)(1[0-9]{3}|20[0-9]{2})(?!\d)")
_BIRTH = re.compile(r"\bBirth:\s*(-?\d{1,4})")
_DEATH = re.compile(r"\bDeath:\s*(-?\d{1,4})")
_SEX = re.compile(r"\bSex:\s*(male|female)\b", re.IGNORECASE)
_LETTERS = re.compile(r"[^\W\d_]+")
CHILDHOOD_YEARS = 16
LIFESPAN_IF_ALIVE = 100
STEM_LENGTH = 5   # "footballer" and "football" share "footb"
_MALE_WORDS = frozenset({"he", "him", "his", "himself", "king", "prince", "mr", "sir"})
_FEMALE_WORDS = frozenset({"she", "her", "hers", "herself", "actress", "queen", "princess", "mrs", "ms", "miss",
                           "lady"})
# Function words and the attribute keys of the KB text ("Sex: ... Occupation: ..."), which every entry shares.
_STOP_WORDS = frozenset({
    "the", "a", "an", "of", "in", "on", "at", "to", "for", "and", "or", "with", "by", "from", "as", "is", "was",
    "be", "are", "were", "his", "her", "he", "she", "it", "its", "this", "that", "who", "which", "born", "death",
    "birth", "sex", "male", "female", "occupation", "languages", "alma", "mater", "spouse", "nickname", "work",
    "starts", "position", "held", "religion"})


def _words(text: str) -> list[str]:
    """Lower-cased, accent-free runs of letters."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return _LETTERS.findall("".join(char for char in decomposed if not unicodedata.combining(char)))


def content_stems(text: str, exclude: frozenset[str] = frozenset()) -> frozenset[str]:
    """Prefix stems of `text`'s content words (3+ letters, not stop words, not in `exclude`)."""
    return frozenset(word[:STEM_LENGTH] for word in _words(text)
                     if len(word) > 2 and word not in _STOP_WORDS and word not in exclude)


@dataclass(frozen=True)
class EntityFacts:
    """What the features read from an entity: life years, sex (+1 male, -1 female, 0 unknown), stems, length."""

    name: str
    name_tokens: frozenset[str]
    birth: int | None
    death: int | None
    sex: int
    stems: frozenset[str]
    text_length: int

    @staticmethod
    @lru_cache(maxsize=65_536)
    def of(entity: Entity) -> EntityFacts:
        """The facts of `entity` (cached: a served KB's shortlisted entities recur)."""
        text = f"{entity.attributes} {entity.description}"
        birth, death, sex = _BIRTH.search(text), _DEATH.search(text), _SEX.search(text)
        return EntityFacts(name=entity.name, name_tokens=name_tokens(entity.name),
                           birth=int(birth.group(1)) if birth else None,
                           death=int(death.group(1)) if death else None,
                           sex=0 if sex is None else (1 if sex.group(1).lower() == "male" else -1),
                           stems=content_stems(text, name_tokens(entity.name)),
                           text_length=len(entity.attributes) + len(entity.description))


@dataclass(frozen=True)
class MentionFacts:
    """What the features read from a mention: surface, sentence tokens, years named, gendered words (+1, -1, 0),
    stems."""

    surface: str
    tokens: frozenset[str]
    years: tuple[int, ...]
    gender: int
    stems: frozenset[str]

    @classmethod
    def of(cls, mention: Mention) -> MentionFacts:
        words = set(_words(mention.sentence))
        gender = int(bool(words & _MALE_WORDS)) - int(bool(words & _FEMALE_WORDS))
        return cls(surface=mention.surface, tokens=name_tokens(mention.sentence),
                   years=tuple(int(year) for year in _YEAR.findall(mention.sentence)),
                   gender=gender, stems=content_stems(mention.sentence, name_tokens(mention.surface)))


def pair_features(mention: MentionFacts, entity: EntityFacts) -> tuple[float, ...]:
    """The features of one (mention, entity) pair, in FEATURE_NAMES order."""
    years, birth = mention.years, entity.birth
    dated = bool(years) and birth is not None
    end = entity.death if entity.death is not None else birth + LIFESPAN_IF_ALIVE if birth is not None else None
    return (
        name_match(mention.surface, entity.name),
        float(dated and any(year < birth for year in years)),
        float(bool(years) and entity.death is not None and any(year > entity.death + 1 for year in years)),
        float(dated and any(birth <= year < birth + CHILDHOOD_YEARS for year in years)),
        float(dated and any(birth + CHILDHOOD_YEARS <= year <= end for year in years)),
        float(any(year in (birth, entity.death) for year in years)),
        float(mention.gender != 0 and entity.sex == mention.gender),
        float(mention.gender != 0 and entity.sex == -mention.gender),
        math.log1p(len(mention.stems & entity.stems)),
        len(mention.tokens & entity.name_tokens) / len(entity.name_tokens) if entity.name_tokens else 0.0,
        math.log1p(entity.text_length),
    )


def candidate_features(mention: Mention, entities: Sequence[Entity]) -> list[tuple[float, ...]]:
    """[K][F] features of `mention` against each of its K candidate entities (FEATURE_NAMES order)."""
    facts = MentionFacts.of(mention)
    return [pair_features(facts, EntityFacts.of(entity)) for entity in entities]


@dataclass(frozen=True)
class ContextPrior:
    """Weights of the features added to a model's score (feature name -> weight); empty: the model alone.

    The weights are relative to the model's score (its weight is 1), so `{"name_match": w}` is the
    name prior of weight w. Stored in a checkpoint's config.json "inference" block and an index's manifest.
    """

    weights: dict[str, float]

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(FEATURE_NAMES))
        if unknown:
            raise ValueError(f"unknown context features {', '.join(unknown)}; known: {', '.join(FEATURE_NAMES)}")
        bad = {name: weight for name, weight in self.weights.items() if not math.isfinite(weight)}
        if bad or ("name_match" in self.weights and self.weights["name_match"] < 0):
            raise ValueError(f"context prior weights must be finite and the name_match weight >= 0, got {self.weights}")

    @classmethod
    def name_only(cls, weight: float) -> ContextPrior:
        """The name prior: score + weight * name_match (nothing added when weight is 0)."""
        return cls({"name_match": float(weight)} if weight else {})

    @property
    def name_weight(self) -> float:
        return self.weights.get("name_match", 0.0)

    @property
    def beyond_name(self) -> bool:
        """Whether it weights a feature other than the name match (the name prior alone also works exhaustively)."""
        return any(weight for name, weight in self.weights.items() if name != "name_match")

    def __bool__(self) -> bool:
        return any(self.weights.values())

    def to_dict(self) -> dict[str, float]:
        return {name: self.weights[name] for name in FEATURE_NAMES if name in self.weights}

    def fingerprint(self) -> str:
        """8 hex digits naming these weights (report names, index directories)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]

    def apply(self, scores: Sequence[float], features: Sequence[Sequence[float]]) -> list[float]:
        """[K] score + sum_f w_f * feature_f, for K candidates with features [K][F] (FEATURE_NAMES order)."""
        used = [(FEATURE_NAMES.index(name), weight) for name, weight in self.to_dict().items() if weight]
        return [score + sum(weight * row[index] for index, weight in used)
                for score, row in zip(scores, features, strict=True)]


NO_PRIOR = ContextPrior({})
"""The model's scores alone."""

__all__ = ["FEATURE_NAMES", "NO_PRIOR", "ContextPrior", "EntityFacts", "MentionFacts", "candidate_features",
           "content_stems", "pair_features"]
