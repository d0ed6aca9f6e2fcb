"""CPU step: JPEG bytes to uint8 pixels at the captioner's input size, and each image's `pixel_hash`.

Runs on CPU workers so the GPU actor never waits on decoding. Pixels cross the process boundary
as uint8 (a quarter of float32); rescaling and normalisation happen on the device, inside the
CapFilt actor. The resize matches `BlipImageProcessor` (PIL, bicubic, RGB).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image

from pipeline.core.messages import one_line
from pipeline.core.resources import Resources
from pipeline.core.timings import stopwatch
from pipeline.curate.chunks import Chunk
from pipeline.curate.dedup import pixel_hash
from pipeline.spec.config import SpecError


@dataclass(frozen=True)
class PreprocessStage:
    height: int
    width: int
    resources: ClassVar[Resources] = Resources(cpus=1)

    @classmethod
    def for_model(cls, model: str) -> PreprocessStage:
        """The input size the captioner's image processor asks for (reads its config only). A model
        it cannot read (a hub name not found, no network, a size it does not state) is the spec's
        error, in one line, not a traceback from transformers."""
        from transformers import AutoImageProcessor

        try:
            size = AutoImageProcessor.from_pretrained(model).size
            return cls(height=int(size["height"]), width=int(size["width"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SpecError(
                f"captioner.model: cannot read the image processor of {model}: {one_line(err)}"
            ) from None

    def __call__(self, chunk: Chunk) -> Chunk:
        timing = {"preprocess_s": 0.0}
        pixels = np.zeros((len(chunk["keys"]), self.height, self.width, 3), dtype=np.uint8)
        errors, hashes = [], []
        with stopwatch(timing, "preprocess_s"):
            for i, data in enumerate(chunk.pop("jpegs")):
                try:
                    pixels[i], hashed = self._decode(data)
                    errors.append("")
                    hashes.append(hashed)
                except Exception as err:  # any decoder failure is this row's fate, not the job's
                    errors.append(f"decode: {type(err).__name__}: {err}")
                    hashes.append("")
        return {**chunk, "pixels": pixels, "decode_errors": errors, "pixel_hashes": hashes, **timing}

    def decode(self, data: bytes) -> np.ndarray:
        return self._decode(data)[0]

    def _decode(self, data: bytes) -> tuple[np.ndarray, str]:
        """The model's input pixels, and the `pixel_hash` of the image as stored (before that resize)."""
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
            resized = rgb.resize((self.width, self.height), Image.Resampling.BICUBIC)
            return np.asarray(resized, dtype=np.uint8), pixel_hash(np.asarray(rgb))
