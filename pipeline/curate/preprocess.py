"""CPU step: JPEG bytes to uint8 pixels at the captioner's input size.

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
        errors = []
        with stopwatch(timing, "preprocess_s"):
            for i, data in enumerate(chunk.pop("jpegs")):
                try:
                    pixels[i] = self.decode(data)
                    errors.append("")
                except Exception as err:  # any decoder failure is this row's fate, not the job's
                    errors.append(f"decode: {type(err).__name__}: {err}")
        return {**chunk, "pixels": pixels, "decode_errors": errors, **timing}

    def decode(self, data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB").resize((self.width, self.height), Image.Resampling.BICUBIC)
            return np.asarray(rgb, dtype=np.uint8)
