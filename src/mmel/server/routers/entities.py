"""`GET /entities/{qid}` (metadata) and `GET /entities/{qid}/image/{k}` (a JPEG preview of the k-th image)."""

from __future__ import annotations

import io
from http import HTTPStatus

from fastapi import APIRouter, Depends, HTTPException, Path, Response

from mmel.server.deps import LinkerDep, SettingsDep, require_token, run_with_timeout
from mmel.server.schemas import AUTH_ERROR_RESPONSES, EntityOut, ErrorResponse, entity_out

PREVIEW_SIDE = 384      # px; the page shows entity images as thumbnails
PREVIEW_QUALITY = 85
MAX_QID_CHARS = 200

router = APIRouter(tags=["entities"], dependencies=[Depends(require_token)],
                   responses={**AUTH_ERROR_RESPONSES,
                              404: {"model": ErrorResponse, "description": "unknown QID or image"}})


@router.get("/entities/{qid}", response_model=EntityOut, summary="An entity's name, texts and image count")
async def get_entity(linker: LinkerDep, settings: SettingsDep,
                     qid: str = Path(min_length=1, max_length=MAX_QID_CHARS)) -> EntityOut:
    entity = await run_with_timeout(lambda: linker.entity(qid), settings.request_timeout_s)
    if entity is None:
        raise HTTPException(HTTPStatus.NOT_FOUND, f"no entity {qid!r} in this index")
    return entity_out(entity)


@router.get("/entities/{qid}/image/{k}", response_class=Response, summary="JPEG preview of an entity's k-th image",
            responses={200: {"content": {"image/jpeg": {}}}})
async def get_entity_image(linker: LinkerDep, settings: SettingsDep,
                           qid: str = Path(min_length=1, max_length=MAX_QID_CHARS),
                           k: int = Path(ge=0, le=1000)) -> Response:
    def preview() -> bytes | None:
        image = linker.entity_image(qid, k)
        if image is None:
            return None
        image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=PREVIEW_QUALITY)
        return buffer.getvalue()

    data = await run_with_timeout(preview, settings.request_timeout_s)
    if data is None:
        raise HTTPException(HTTPStatus.NOT_FOUND, f"entity {qid!r} has no usable image number {k}")
    return Response(content=data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})
