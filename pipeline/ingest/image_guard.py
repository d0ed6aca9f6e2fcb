"""What img2dataset's decoder is given: refused when its size is too big, unknown or outside the job's
size rules, normalised where OpenCV gets it wrong.

img2dataset decodes with `cv2.imdecode(..., IMREAD_UNCHANGED)`, which
- decodes a decompression bomb (a few kB of PNG declaring 40,000 x 40,000 pixels) in full before its
  own area check, gigabytes per download thread: here the header is read first (Pillow reads headers
  lazily) and an image declaring more than `max_pixels` is refused before anything is decoded. An
  image whose header Pillow cannot read is refused too: its size cannot be known before decoding, and
  OpenCV decodes formats (Radiance HDR, PAM, …) that no web page serves as an image;
- ignores the EXIF orientation, so a phone photo stored sideways stays sideways (and the re-encoded
  JPEG has no EXIF left to fix it later): here it is turned upright, once;
- keeps 16-bit PNGs at 16 bits and its JPEG encoder saturates them to white: here they become 8-bit.
Everything else reaches OpenCV as it came. Fixing an image decodes it with Pillow; should that fail
(a truncated file), the original bytes go to OpenCV, whose verdict the row then gets.
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
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"}  # what a PNG holds at 8 bits or fewer


# The start of the message of an image the size rules refuse: the writer gives such a row its own fate.
SIZE_RULES = "size rules: "


class ImageRefused(ValueError):
    """An image not decoded at all; its message is the row's `error`."""


@dataclass(frozen=True)
class ImageGuard:
    max_pixels: int
    min_side: int = 0  # download.min_image_size: the shorter side, in pixels
    max_aspect_ratio: float | None = None  # download.max_aspect_ratio: longer side over shorter

    @classmethod
    def of(cls, download: Any) -> ImageGuard:
        """The guard of a job's `DownloadSpec`."""
        return cls(download.max_image_pixels, download.min_image_size, download.max_aspect_ratio)

    def prepare(self, data: bytes) -> bytes:
        """The bytes to decode: `data` itself, or an upright 8-bit PNG of it. ImageRefused when the
        header declares more than `max_pixels` pixels or cannot be read."""
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:  # only outside `installed()`: Pillow's own limit
            raise ImageRefused(f"image over download.max_image_pixels ({self.max_pixels}): {err}") from None
        except Image.UnidentifiedImageError:  # its message names the stream object: not reproducible
            raise ImageRefused("not an image format whose size can be read before decoding") from None
        except Exception as err:
            raise ImageRefused(f"the image header cannot be read: {err}") from None
        width, height = image.size
        if width * height > self.max_pixels:
            raise ImageRefused(
                f"image over download.max_image_pixels ({self.max_pixels}), not decoded: "
                f"it declares {width}x{height} = {width * height} pixels"
            )
        self._check_size_rules(width, height)
        # `info["exif"]` is what the header held; `getexif()` alone would decode a PNG to look after it.
        turned = "exif" in image.info and image.getexif().get(_ORIENTATION, 1) not in (1, None)
        if not (turned or _is_16_bit_png(data)):
            return data
        try:
            return _upright_8_bit_png(image, turned)
        except Exception:  # Pillow cannot decode it (truncated…): OpenCV decides, as for any image
            return data

    def _check_size_rules(self, width: int, height: int) -> None:
        """img2dataset's `min_image_size` and `max_aspect_ratio`, read from the header (before any
        decoding) and worded with the image's size and the setting that refused it."""
        short, long = min(width, height), max(width, height)
        if short < self.min_side:
            raise ImageRefused(
                f"{SIZE_RULES}{width}x{height}: its shorter side is under download.min_image_size "
                f"({self.min_side})"
            )
        if self.max_aspect_ratio is not None and long > self.max_aspect_ratio * short:
            ratio = long / short if short else float("inf")
            raise ImageRefused(
                f"{SIZE_RULES}{width}x{height}: aspect ratio {ratio:.2f} over download.max_aspect_ratio "
                f"({self.max_aspect_ratio:g})"
            )

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


def _upright_8_bit_png(image: Image.Image, turned: bool) -> bytes:
    if turned:
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):  # 16-bit gray: keep the top 8 bits (convert("L") clips to the low)
        wide = np.asarray(image).astype(np.uint32).clip(0, 65535)
        image = Image.fromarray((wide >> 8).astype(np.uint8))
    elif image.mode not in _PNG_MODES:  # CMYK, YCbCr, float… as PNG cannot hold them
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


@dataclass(frozen=True)
class GuardedResizer:
    """img2dataset's `Resizer`, given what `ImageGuard.prepare` makes of each download. Nothing may
    raise out of here: img2dataset drops a sample whose resizer raises, row and all."""

    resizer: Any
    guard: ImageGuard

    def __call__(self, img_stream: io.BytesIO, blurring_bbox_list: Any = None) -> tuple[Any, ...]:
        img_stream.seek(0)
        data = img_stream.read()
        try:
            data = self.guard.prepare(data)
        except ImageRefused as err:
            return None, None, None, None, None, str(err)
        except Exception:  # a guard bug must not cost the row: the image goes to OpenCV as it came
            pass
        return self.resizer(io.BytesIO(data), blurring_bbox_list)


def _is_16_bit_png(data: bytes) -> bool:
    """The PNG header's bit depth (byte 24: after the signature and IHDR's length, type, width, height)."""
    return data.startswith(_PNG_SIGNATURE) and len(data) > 24 and data[24] == 16
