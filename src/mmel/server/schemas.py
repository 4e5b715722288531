"""Request and response bodies of the REST API (pydantic), and their conversion from library types.

Limits that depend on the server's settings (batch size, top k, image bytes) are checked in the
routers; the limits here are fixed sanity bounds that no sensible request exceeds. Integers are
strict (`StrictInt`): JSON `true` is not a `top_k` of 1, nor `"3"` a 3; form fields, which are
all text, are turned into integers by the router before validation.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from mmel.core.types import Candidate, Entity, LinkResult

MAX_SENTENCE_CHARS = 5_000
MAX_MENTION_CHARS = 500
ENTITY_TEXT_PREVIEW_CHARS = 600


class LinkQuery(BaseModel):
    """One mention: a sentence plus either the mention text or its [start, end) character span."""

    model_config = ConfigDict(extra="forbid")

    sentence: str = Field(min_length=1, max_length=MAX_SENTENCE_CHARS, description="the text around the mention")
    mention: str | None = Field(default=None, min_length=1, max_length=MAX_MENTION_CHARS,
                                description="the mention's surface form, found in the sentence")
    span: tuple[StrictInt, StrictInt] | None = Field(default=None,
                                                     description="[start, end) character offsets in the sentence")
    image_base64: str | None = Field(default=None, description="optional mention image (JPEG/PNG/...), base64")

    @model_validator(mode="after")
    def _exactly_one_mention_form(self) -> LinkQuery:
        if (self.mention is None) == (self.span is None):
            raise ValueError("give exactly one of 'mention' (text) or 'span' ([start, end))")
        return self


_TOP_K_DOC = "how many ranked entities to return (unset: 10, or the server's limit when lower)"
_CANDIDATES_K_DOC = "how many first-stage candidates to rerank (unset: 100, or the server's limit when lower)"


_EXAMPLE_QUERY = {"sentence": "Mercury sang Bohemian Rhapsody with Queen.", "mention": "Mercury"}


class LinkRequest(LinkQuery):
    """Shown with an example in the API docs (which API fuzzers also start from)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{**_EXAMPLE_QUERY, "top_k": 3}]})

    top_k: StrictInt = Field(default=10, ge=1, description=_TOP_K_DOC)
    candidates_k: StrictInt = Field(default=100, ge=1, description=_CANDIDATES_K_DOC)


class LinkBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"queries": [_EXAMPLE_QUERY, {"sentence": "We flew to Paris.", "span": [11, 16]}], "top_k": 3}]})

    queries: list[LinkQuery] = Field(min_length=1)
    top_k: StrictInt = Field(default=10, ge=1, description=_TOP_K_DOC)
    candidates_k: StrictInt = Field(default=100, ge=1, description=_CANDIDATES_K_DOC)


class CandidateOut(BaseModel):
    rank: int
    qid: str
    name: str
    score: float = Field(description="the model's final score (what the ranking uses)")
    unit_scores: dict[str, float] = Field(
        description="per-unit scores under the model's unit names (MIMIC: tglu, vdlu, cmfu; M3EL: text, image, "
                    "cross; plus name_match with the name prior)")
    retrieval_score: float | None = Field(description="first-stage similarity")
    text: str = Field(description="the entity's text (attributes or description), shortened")
    image_count: int


class MentionOut(BaseModel):
    sentence: str
    surface: str
    span: tuple[StrictInt, StrictInt] | None


class LinkResponse(BaseModel):
    mention: MentionOut
    nil: bool = Field(description="true when the NIL statistic is under the calibrated NIL threshold")
    nil_threshold: float | None
    nil_statistic: str | None = Field(description="what the threshold applies to: the top-1 'score', "
                                                  "or its 'margin' over the runner-up")
    candidates: list[CandidateOut]


class LinkBatchResponse(BaseModel):
    results: list[LinkResponse]


class EntityOut(BaseModel):
    qid: str
    name: str
    attributes: str
    description: str
    image_count: int


class HealthResponse(BaseModel):
    status: Literal["ok"]
    version: str
    auth_required: bool
    index: dict[str, object] | None = Field(
        default=None, description="index facts (model, backbone, entity count); omitted for callers without the token")
    link_calls_by_batch_size: dict[int, int] | None = Field(
        default=None, description="POST /link dynamic batching so far: linker calls per number of requests joined; "
                                  "omitted for callers without the token")


class ErrorResponse(BaseModel):
    detail: str | list[dict[str, object]]


# What every operation behind the bearer token may answer before it looks at the request.
AUTH_ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorResponse, "description": "bearer token missing"},
    403: {"model": ErrorResponse, "description": "bearer token wrong"},
}


def shorten(text: str, limit: int = ENTITY_TEXT_PREVIEW_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def candidate_out(candidate: Candidate, entity: Entity | None) -> CandidateOut:
    return CandidateOut(rank=candidate.rank, qid=candidate.qid, name=candidate.name, score=candidate.score,
                        unit_scores=candidate.unit_scores, retrieval_score=candidate.retrieval_score,
                        text=shorten(entity.text()) if entity else "", image_count=len(entity.images) if entity else 0)


def link_response(result: LinkResult, entities: dict[str, Entity]) -> LinkResponse:
    mention = MentionOut(sentence=result.mention.sentence, surface=result.mention.surface, span=result.mention.span)
    return LinkResponse(mention=mention, nil=result.nil, nil_threshold=result.nil_threshold,
                        nil_statistic=result.nil_statistic,
                        candidates=[candidate_out(c, entities.get(c.qid)) for c in result.candidates])


def entity_out(entity: Entity) -> EntityOut:
    return EntityOut(qid=entity.qid, name=entity.name, attributes=entity.attributes,
                     description=entity.description, image_count=len(entity.images))
