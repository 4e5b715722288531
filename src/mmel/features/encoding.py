"""Encoding texts and images with a backbone: the calls the feature store makes, and the on-the-fly path.

The linker, index builds of a KB without a store and end-to-end training encode with `encode_items`,
the very calls the store makes, so an item gets the same features either way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from PIL import Image

from mmel.backbones.base import Backbone, ImageFeatures, TextFeatures
from mmel.core.errors import UsageError
from mmel.core.features import FeatureBatch, PooledView


def encode_text_batches(backbone: Backbone, texts: Sequence[str], max_text_length: int,
                        batch_size: int) -> Iterator[TextFeatures]:
    """Encode `texts` in order, `batch_size` at a time (grad mode is the caller's choice)."""
    for start in range(0, len(texts), batch_size):
        yield backbone.encode_texts(list(texts[start:start + batch_size]), max_text_length)


def encode_image_batches(backbone: Backbone, images: Sequence[Image.Image], batch_size: int) -> Iterator[ImageFeatures]:
    for start in range(0, len(images), batch_size):
        yield backbone.encode_images(list(images[start:start + batch_size]))


def resolve_image_batch_size(backbone: Backbone, requested: int | None, batch_size: int) -> int:
    """`requested`, or by default 1 on CPU and `batch_size` on an accelerator.

    On CPU a batch of images is slower than a loop over them (measured 0.8x for EfficientNet-Lite0 at
    8 images per call, see bench/bench_encode.py): the activations of several images leave the cache.
    """
    if requested is not None:
        return requested
    device = getattr(backbone, "device", None)
    return batch_size if device is not None and torch.device(device).type != "cpu" else 1


def encode_items(backbone: Backbone, texts: Sequence[str], images: Sequence[Image.Image | None], *,
                 max_text_length: int = 40, batch_size: int = 64, image_batch_size: int | None = None,
                 extra_texts: dict[str, Sequence[str | None]] | None = None) -> FeatureBatch:
    """Encode items on the fly (fine-tuning path): the same calls the store makes, without the cache.

    `images[i] is None` means no image: that row gets the blank-image features and has_image False.
    `extra_texts` maps a further view's name to each item's text in it (None: absent), pooled.
    """
    if len(texts) != len(images):
        raise UsageError(f"encode_items needs one image (or None) per text: {len(texts)} texts, {len(images)} images")
    if not texts:
        raise UsageError("encode_items needs at least one item")
    text_parts = list(encode_text_batches(backbone, texts, max_text_length, batch_size))
    has_image = torch.tensor([image is not None for image in images], dtype=torch.bool)   # [B]
    blank = backbone.encode_blank_images(1)
    image_global = blank.global_.expand(len(texts), -1).clone()                         # [B, Dg]
    image_patches = blank.patches.expand(len(texts), -1, -1).clone()                    # [B, P, Dp]
    present = [image for image in images if image is not None]
    if present:
        parts = list(encode_image_batches(backbone, present, resolve_image_batch_size(backbone, image_batch_size,
                                                                                      batch_size)))
        rows = has_image.nonzero().squeeze(1).to(image_global.device)
        image_global[rows] = torch.cat([p.global_ for p in parts])
        image_patches[rows] = torch.cat([p.patches for p in parts])
    text_global = torch.cat([p.global_ for p in text_parts])                             # [B, Dt]
    views = {name: _encode_pooled_view(backbone, view_texts, text_global, max_text_length, batch_size)
             for name, view_texts in (extra_texts or {}).items()}
    return FeatureBatch(text_global=text_global, text_tokens=torch.cat([p.tokens for p in text_parts]),
                        text_mask=torch.cat([p.mask for p in text_parts]),
                        image_global=image_global, image_patches=image_patches,
                        has_image=has_image.to(image_global.device), views=views)


def _encode_pooled_view(backbone: Backbone, texts: Sequence[str | None], like: torch.Tensor, max_text_length: int,
                        batch_size: int) -> PooledView:
    """Pooled vectors [B, Dt] of the present texts, zero rows where a text is None."""
    present = torch.tensor([text is not None for text in texts], dtype=torch.bool)
    vectors = torch.zeros_like(like)
    given = [text for text in texts if text is not None]
    if given:
        encoded = torch.cat([p.global_ for p in encode_text_batches(backbone, given, max_text_length, batch_size)])
        vectors[present.nonzero().squeeze(1).to(vectors.device)] = encoded.to(vectors.dtype)
    return PooledView(global_=vectors, present=present.to(vectors.device))


__all__ = ["encode_image_batches", "encode_items", "encode_text_batches", "resolve_image_batch_size"]
