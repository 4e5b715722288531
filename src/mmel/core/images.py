"""Safe image loading for every image the toolkit touches.

Limits: decompression bombs (pixel count), file size, and paths confined to the data root.
Images are EXIF-transposed and converted to RGB. A missing, corrupt, truncated or oversized
file is "no image": `load_image` returns None and records the reason in an `ImageReport`,
so callers count problems instead of crashing or dropping records silently.
"""

from __future__ import annotations

import io
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from mmel.core.errors import PathEscapeError, UsageError
from mmel.core.paths import NotRegularFileError, open_regular_file, resolve_in_root

MAX_IMAGE_PIXELS = 40_000_000    # above this, PIL's bomb check refuses the image
MAX_IMAGE_BYTES = 50 * 1024 * 1024
MAX_IMAGE_SIDE = 1024            # larger images are downscaled on load (encoders use 224 px)


class ImageTooLargeError(ValueError):
    """An image over a size limit (bytes, pixels, or a decompression bomb): the input is too big, not broken."""


@dataclass
class ImageReport:
    """Counts of images that could not be used, by reason, with a few example paths each."""

    loaded: int = 0
    problems: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add_problem(self, reason: str, where: str) -> None:
        self.problems[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(where)

    def merge(self, other: ImageReport) -> None:
        """Add another report's counts (and examples, up to five per reason) to this one."""
        self.loaded += other.loaded
        for reason, count in other.problems.items():
            self.problems[reason] += count
            examples = self.examples.setdefault(reason, [])
            examples.extend(other.examples.get(reason, [])[:max(0, 5 - len(examples))])

    @property
    def failed(self) -> int:
        return sum(self.problems.values())

    def summary(self) -> str:
        if not self.problems:
            return f"{self.loaded} images loaded, no problems"
        parts = ", ".join(f"{count} {reason}" for reason, count in sorted(self.problems.items()))
        return f"{self.loaded} images loaded; unusable (treated as no image): {parts}"


def decode_image(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS, max_side: int = MAX_IMAGE_SIDE) -> Image.Image:
    """Decode bytes into an RGB, EXIF-upright image no larger than `max_side`; raises ValueError if unusable."""
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageTooLargeError(f"image file too large ({len(data)} bytes > {MAX_IMAGE_BYTES})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLargeError(f"image has {width}x{height} pixels, more than the limit of {max_pixels}")
            image.draft("RGB", (max_side, max_side))  # JPEG: decode at reduced scale when possible
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLargeError(f"image too large (decompression bomb check): {error}") from None
    except UnidentifiedImageError as error:
        raise UsageError(f"not a usable image: {error}") from None
    except (OSError, SyntaxError) as error:
        raise UsageError(f"corrupt or truncated image: {error}") from None
    image = ImageOps.exif_transpose(image).convert("RGB")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def load_image(root: Path, relative: str | None, report: ImageReport | None = None) -> Image.Image | None:
    """Load `root/relative` safely, or return None (counted in `report`) when it cannot be used.

    A path that escapes `root` is an error in the data, not a missing image: it raises.
    """
    data = read_image_bytes(root, relative, report)
    return None if data is None else decode_image_bytes(data, str(relative), report)


def read_image_bytes(root: Path, relative: str | None, report: ImageReport | None = None) -> bytes | None:
    """The raw bytes of `root/relative` (root-confined, size-capped), or None counted in `report`.

    Callers that key caches on image content hash these bytes before deciding to decode them. Only
    regular files are opened: a FIFO named as an image would block the reader forever.
    """
    if not relative:
        return None
    path = resolve_in_root(root, relative)
    try:
        with open_regular_file(path) as handle:
            if os.fstat(handle.fileno()).st_size > MAX_IMAGE_BYTES:
                return _fail(report, "image file too large", str(relative))
            return handle.read(MAX_IMAGE_BYTES + 1)
    except FileNotFoundError:
        return _fail(report, "missing", str(relative))
    except NotRegularFileError:
        return _fail(report, "not a regular file", str(relative))
    except OSError as error:
        return _fail(report, f"unreadable ({error.strerror})", str(relative))


def decode_image_bytes(data: bytes, where: str, report: ImageReport | None = None) -> Image.Image | None:
    """`decode_image`, with an unusable image counted in `report` under `where` and returned as None."""
    try:
        image = decode_image(data)
    except ValueError as error:
        reason = str(error).split(":")[0]
        return _fail(report, reason, where)
    if report is not None:
        report.loaded += 1
    return image


def _fail(report: ImageReport | None, reason: str, where: str) -> None:
    if report is not None:
        report.add_problem(reason, where)
    return None


__all__ = ["MAX_IMAGE_PIXELS", "ImageReport", "ImageTooLargeError", "PathEscapeError", "decode_image",
           "decode_image_bytes", "load_image", "read_image_bytes"]
