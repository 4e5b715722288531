"""`POST /link` (JSON or multipart with an image upload) and `POST /link/batch`."""

from __future__ import annotations

import base64
import binascii
from http import HTTPStatus
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import ValidationError

from mmel.core.images import ImageTooLargeError, decode_image
from mmel.retrieval.queries import MentionQuery, prepare_query
from mmel.server.deps import BatcherDep, LinkerDep, SettingsDep, await_with_timeout, require_token, run_with_timeout
from mmel.server.schemas import (
    AUTH_ERROR_RESPONSES,
    MAX_SENTENCE_CHARS,
    ErrorResponse,
    LinkBatchRequest,
    LinkBatchResponse,
    LinkQuery,
    LinkRequest,
    LinkResponse,
    link_response,
)
from mmel.server.settings import ServerSettings

RequestModel = TypeVar("RequestModel", LinkRequest, LinkBatchRequest)

FORM_FIELDS = ("sentence", "mention", "span_start", "span_end", "top_k", "candidates_k")
INTEGER_FORM_FIELDS = frozenset(("span_start", "span_end", "top_k", "candidates_k"))
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {**AUTH_ERROR_RESPONSES, **{
    code: {"model": ErrorResponse, "description": description} for code, description in (
        (400, "unreadable body"), (408, "body did not arrive within the server's time limit"),
        (413, "body, image or batch over the server's limits"), (415, "neither JSON nor multipart"),
        (422, "invalid request (message says what)"), (504, "took longer than the server's time limit"))
}}
_FORM_SCHEMA = {
    "type": "object",
    "required": ["sentence"],
    "properties": {
        "sentence": {"type": "string", "maxLength": MAX_SENTENCE_CHARS},
        "mention": {"type": "string", "description": "mention text (or give span_start and span_end)"},
        "span_start": {"type": "integer"},
        "span_end": {"type": "integer"},
        "top_k": {"type": "integer", "default": 10},
        "candidates_k": {"type": "integer", "default": 100},
        "image": {"type": "string", "format": "binary", "description": "optional mention image"},
    },
}
_LINK_BODY_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": LinkRequest.model_json_schema()},
    "multipart/form-data": {"schema": _FORM_SCHEMA},
}}}


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its `$defs` put in place: OpenAPI resolves `#/$defs/...` from the document root."""
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        return [inline(item) for item in node] if isinstance(node, list) else node

    return inline(schema)


_BATCH_BODY_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _inlined(LinkBatchRequest.model_json_schema())},
}}}

router = APIRouter(tags=["link"], dependencies=[Depends(require_token)], responses=ERROR_RESPONSES)


@router.post("/link", response_model=LinkResponse, openapi_extra=_LINK_BODY_DOC,
             summary="Link one mention (JSON body, or multipart form with an image file)")
async def link(request: Request, linker: LinkerDep, batcher: BatcherDep, settings: SettingsDep) -> LinkResponse:
    payload, image_bytes = await _read_link_request(request)
    top_k, candidates_k = _ranking_sizes(payload, settings)
    image_bytes = image_bytes if image_bytes is not None else _base64_image(payload.image_base64, settings)

    async def work() -> LinkResponse:
        query = await run_in_threadpool(lambda: _valid_query(payload, _decoded_image(image_bytes, settings)))
        result = await batcher.link(query, top_k=top_k, candidates_k=candidates_k)
        return await run_in_threadpool(
            lambda: link_response(result, linker.entities([c.qid for c in result.candidates])))

    return await await_with_timeout(work(), settings.request_timeout_s)


@router.post("/link/batch", response_model=LinkBatchResponse, openapi_extra=_BATCH_BODY_DOC,
             summary="Link several mentions in one call")
async def link_batch(request: Request, linker: LinkerDep, settings: SettingsDep) -> LinkBatchResponse:
    if _content_type(request) != "application/json":
        raise _unsupported_media_type(request)
    payload = _parsed_json(LinkBatchRequest, await request.body())
    if len(payload.queries) > settings.max_batch:
        raise HTTPException(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"batch of {len(payload.queries)} queries is over this server's limit of "
                            f"{settings.max_batch}; split it")
    top_k, candidates_k = _ranking_sizes(payload, settings)
    images = [_base64_image(query.image_base64, settings) for query in payload.queries]

    def work() -> LinkBatchResponse:
        queries = [_mention_query(query, _decoded_image(data, settings))
                   for query, data in zip(payload.queries, images, strict=True)]
        results = linker.link_batch(queries, top_k=top_k, candidates_k=candidates_k)
        entities = linker.entities([c.qid for result in results for c in result.candidates])
        return LinkBatchResponse(results=[link_response(result, entities) for result in results])

    return await run_with_timeout(work, settings.request_timeout_s)


async def _read_link_request(request: Request) -> tuple[LinkRequest, bytes | None]:
    """The validated request and the raw bytes of an uploaded image (multipart only)."""
    content_type = _content_type(request)
    if content_type == "application/json":
        return _parsed_json(LinkRequest, await request.body()), None
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _read_link_form(request)
    raise _unsupported_media_type(request, "or a form (multipart/form-data)")


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _unsupported_media_type(request: Request, alternative: str = "") -> HTTPException:
    sent = _content_type(request) or "no content type"
    return HTTPException(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                         f"send application/json{' ' + alternative if alternative else ''}, not {sent!r}")


def _parsed_json(model: type[RequestModel], body: bytes) -> RequestModel:
    """`body` parsed and validated by pydantic in one pass (422 naming the problem).

    pydantic's own JSON parser reports integers too large, nesting too deep and broken escapes as
    validation errors; parsed first with `json.loads` (FastAPI's body parameters), those were a
    bare 400.
    """
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None


async def _read_link_form(request: Request) -> tuple[LinkRequest, bytes | None]:
    form = await request.form(max_files=1, max_fields=len(FORM_FIELDS), max_part_size=4 * MAX_SENTENCE_CHARS)
    values: dict[str, Any] = {}
    upload: UploadFile | None = None
    for key, value in form.multi_items():
        if key == "image" and not isinstance(value, str):
            upload = value
        elif key not in FORM_FIELDS or not isinstance(value, str):
            raise HTTPException(HTTPStatus.UNPROCESSABLE_ENTITY,
                                f"unexpected form field {key!r}; expected {', '.join(FORM_FIELDS)} and 'image'")
        else:
            values[key] = _form_value(key, value)
    start, end = values.pop("span_start", None), values.pop("span_end", None)
    if (start is None) != (end is None):
        raise HTTPException(HTTPStatus.UNPROCESSABLE_ENTITY, "give both span_start and span_end, or neither")
    if start is not None:
        values["span"] = (start, end)
    try:
        payload = LinkRequest.model_validate(values)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None
    image = await upload.read() if upload is not None else None
    return payload, image or None


def _form_value(key: str, value: str) -> str | int:
    """A form field as the JSON body would carry it: the schema's integers are strict, and a form holds only text.

    Text that is not a decimal integer stays text, so validation reports it against its field.
    """
    if key in INTEGER_FORM_FIELDS:
        try:
            return int(value)
        except ValueError:
            return value
    return value


def _ranking_sizes(payload: LinkRequest | LinkBatchRequest, settings: ServerSettings) -> tuple[int, int]:
    """(top_k, candidates_k) for this request: 422 when the client asks for more than the server's limit.

    A size the client did not send is the schema's default, lowered to the server's limit when that
    is smaller: a server run with a small limit still answers requests that do not set the size.
    """
    sizes = []
    for name, limit in (("top_k", settings.max_top_k), ("candidates_k", settings.max_candidates_k)):
        value = getattr(payload, name)
        if name not in payload.model_fields_set:
            value = min(value, limit)
        elif value > limit:
            raise HTTPException(HTTPStatus.UNPROCESSABLE_ENTITY,
                                f"{name} {value} is over this server's limit of {limit}")
        sizes.append(value)
    return sizes[0], sizes[1]


def _base64_image(encoded: str | None, settings: ServerSettings) -> bytes | None:
    if encoded is None:
        return None
    if len(encoded) > 4 * (settings.max_image_bytes // 3 + 1) + 4:
        raise _image_too_large(f"more than {settings.max_image_bytes} bytes once decoded")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise HTTPException(HTTPStatus.UNPROCESSABLE_ENTITY, f"image_base64 is not valid base64: {error}") from None


def _decoded_image(data: bytes | None, settings: ServerSettings) -> Image.Image | None:
    """Decode an uploaded image within the server's byte and pixel limits (413 when over, 422 when broken)."""
    if data is None:
        return None
    if len(data) > settings.max_image_bytes:
        raise _image_too_large(f"{len(data)} bytes, the limit is {settings.max_image_bytes}")
    try:
        return decode_image(data, max_pixels=settings.max_image_pixels)
    except ImageTooLargeError as error:
        raise _image_too_large(str(error)) from None
    except ValueError as error:
        raise HTTPException(HTTPStatus.UNPROCESSABLE_ENTITY, f"the image cannot be used: {error}") from None


def _image_too_large(reason: str) -> HTTPException:
    return HTTPException(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"image too large: {reason}")


def _mention_query(query: LinkQuery, image: Image.Image | None) -> MentionQuery:
    return MentionQuery(sentence=query.sentence, mention=query.mention, span=query.span, image=image)


def _valid_query(query: LinkQuery, image: Image.Image | None) -> MentionQuery:
    """The query, checked by the Linker's own rules before it joins a batch (QueryError, 422, when invalid).

    A bad query inside a joint linker call would fail the whole call; checked here, it never joins one.
    """
    mention_query = _mention_query(query, image)
    prepare_query(mention_query, 0)
    return mention_query
