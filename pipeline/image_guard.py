"""What img2dataset's decoder is given: refused when too big, normalised where OpenCV gets it wrong.

img2dataset decodes with `cv2.imdecode(..., IMREAD_UNCHANGED)`, which
- decodes a decompression bomb (a few kB of PNG declaring 40,000 x 40,000 pixels) in full before its
  own area check, gigabytes per download thread: here the header is read first and an image declaring
  more than `max_pixels` is refused before anything is decoded;
- ignores the EXIF orientation, so a phone photo stored sideways stays sideways (and the re-encoded
  JPEG has no EXIF left to fix it later): here it is turned upright, once;
- keeps 16-bit PNGs at 16 bits and its JPEG encoder saturates them to white: here they become 8-bit.
Everything else passes untouched (the bytes are only parsed, not decoded), and a header Pillow cannot
read is left to OpenCV, which knows formats Pillow does not.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

_ORIENTATION = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageRefused(ValueError):
    """An image not decoded at all; its message is the row's `error`."""


@dataclass(frozen=True)
class ImageGuard:
    max_pixels: int

    def prepare(self, data: bytes) -> bytes:
        """The bytes to decode: `data` itself, or an upright 8-bit re-encoding; ImageRefused when the
        header declares more than `max_pixels` pixels."""
        try:
            image = Image.open(io.BytesIO(data))
        except Exception:  # not a header Pillow knows: OpenCV decides, and fails it if it must
            return data
        width, height = image.size
        if width * height > self.max_pixels:
            raise ImageRefused(
                f"image over download.max_image_pixels ({self.max_pixels}), not decoded: "
                f"it declares {width}x{height} = {width * height} pixels"
            )
        turned = image.getexif().get(_ORIENTATION, 1) not in (1, None)
        deep = _is_16_bit_png(data)
        if not (turned or deep):
            return data
        if image.mode.startswith("I"):  # 16-bit gray: keep the top 8 bits (convert("L") clips to the low)
            wide = np.asarray(image).astype(np.uint32).clip(0, 65535)
            image = Image.fromarray((wide >> 8).astype(np.uint8))
        upright = ImageOps.exif_transpose(image) if turned else image
        out = io.BytesIO()
        upright.save(out, format="PNG", compress_level=1)
        return out.getvalue()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """While downloading, `max_pixels` is the one limit: Pillow's own (a warning above 89 M pixels,
        an error above twice that) would refuse below a larger one and word it differently."""
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


@dataclass(frozen=True)
class GuardedResizer:
    """img2dataset's `Resizer`, given what `ImageGuard.prepare` makes of each download."""

    resizer: Any
    guard: ImageGuard

    def __call__(self, img_stream: io.BytesIO, blurring_bbox_list: Any = None) -> tuple[Any, ...]:
        img_stream.seek(0)
        try:
            data = self.guard.prepare(img_stream.read())
        except ImageRefused as err:
            return None, None, None, None, None, str(err)
        return self.resizer(io.BytesIO(data), blurring_bbox_list)


def _is_16_bit_png(data: bytes) -> bool:
    """The PNG header's bit depth (byte 24: after the signature and IHDR's length, type, width, height)."""
    return data.startswith(_PNG_SIGNATURE) and len(data) > 24 and data[24] == 16
