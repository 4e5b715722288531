"""Queries: what a user asks the linker, checked before anything is encoded.

A query is a sentence, the mention as text or as a [start, end) span, and an optional image (a
path, encoded bytes or a PIL image). `prepare_query` turns it into a `Mention` with its span
resolved and its image decoded, or raises `QueryError` saying what is wrong.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from PIL import Image

from mmel.core.errors import MmelError
from mmel.core.images import MAX_IMAGE_BYTES, decode_image
from mmel.core.paths import open_regular_file
from mmel.core.types import Mention, locate_span

ImageInput = Union[str, os.PathLike, bytes, Image.Image, None]  # noqa: UP007  (a runtime alias for py3.10)
MAX_K = 10_000


class QueryError(MmelError, ValueError):
    """A query the linker cannot answer as asked (empty sentence, span out of range, unknown mention...)."""


@dataclass(frozen=True)
class MentionQuery:
    """One mention to link: the sentence, the mention as text or as a [start, end) span, an optional image."""

    sentence: str
    mention: str | None = None
    span: tuple[int, int] | None = None
    image: ImageInput = None
    id: str = "query"


@dataclass
class PreparedQuery:
    mention: Mention
    image: Image.Image | None


def prepare_query(query: MentionQuery, position: int) -> PreparedQuery:
    """Validate a query and resolve its mention span and image; QueryError says what is wrong."""
    where = f"query {position}: " if position else ""
    sentence = query.sentence
    if not isinstance(sentence, str) or is_blank(sentence):
        raise QueryError(f"{where}the sentence is empty")
    if (query.mention is None) == (query.span is None):
        raise QueryError(f"{where}give exactly one of mention (text) or span ([start, end))")
    span = _checked_span(sentence, query.span, where) if query.span is not None else \
        _located_mention(sentence, query.mention, where)
    mention = Mention(id=query.id, sentence=sentence, surface=sentence[span[0]:span[1]], span=span,
                      image=str(query.image) if isinstance(query.image, (str, os.PathLike)) else None)
    return PreparedQuery(mention=mention, image=_as_image(query.image, where))


def is_blank(text: str) -> bool:
    """Whether `text` shows nothing: only whitespace and format characters (zero-width space, joiners, BOM).

    `str.strip` keeps U+200B and its kin, so "\u200b\u200b" would otherwise be linked as a mention.
    """
    return all(char.isspace() or unicodedata.category(char) == "Cf" for char in text)


def _checked_span(sentence: str, span: Any, where: str) -> tuple[int, int]:
    if not (isinstance(span, (tuple, list)) and len(span) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in span)):
        raise QueryError(f"{where}span must be two integers [start, end), got {span!r}")
    start, end = span
    if not 0 <= start < end <= len(sentence):
        raise QueryError(f"{where}span [{start}, {end}) is out of range for a sentence of {len(sentence)} characters")
    if is_blank(sentence[start:end]):
        raise QueryError(f"{where}span [{start}, {end}) holds only whitespace or invisible characters")
    return start, end


def _located_mention(sentence: str, mention: Any, where: str) -> tuple[int, int]:
    if not isinstance(mention, str) or is_blank(mention):
        raise QueryError(f"{where}the mention is empty")
    span = locate_span(sentence, mention.strip())
    if span is None:
        raise QueryError(f"{where}the mention {mention!r} does not occur in the sentence")
    return span


def _as_image(image: ImageInput, where: str) -> Image.Image | None:
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        data, source = bytes(image), "the image bytes"
    elif isinstance(image, (str, os.PathLike)):
        source = str(image)
        try:
            with open_regular_file(Path(image)) as handle:
                data = handle.read(MAX_IMAGE_BYTES + 1)
        except OSError as error:
            raise QueryError(f"{where}cannot read image {source}: {error.strerror or error}") from None
    else:
        raise QueryError(f"{where}image must be a path, bytes or a PIL image, got {type(image).__name__}")
    try:
        return decode_image(data)
    except ValueError as error:
        raise QueryError(f"{where}{source} is not a usable image: {error}") from None


def check_k(top_k: int, candidates_k: int) -> None:
    for name, value in (("top_k", top_k), ("candidates_k", candidates_k)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_K:
            raise QueryError(f"{name} must be an integer from 1 to {MAX_K}, got {value!r}")




__all__ = ["MAX_K", "ImageInput", "MentionQuery", "PreparedQuery", "QueryError", "check_k", "is_blank", "prepare_query"]
