"""Scenes as the pipeline sees them: JPEG on the wire, then decoded and resized by `PreprocessStage`.

Training, serving and the benchmark all go through these two functions, so the models are trained on
exactly the pixels the pipeline will feed them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from pipeline.curate.preprocess import PreprocessStage
from pipeline.synthetic.world import Scene, render

IMAGE_SIZE = 64  # served at the size the download stage and the models use: no resize in between
JPEG_QUALITY = 90


def scene_jpeg(scene: Scene) -> bytes:
    buf = io.BytesIO()
    render(scene, IMAGE_SIZE).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def stored_pixels(scenes: Sequence[Scene]) -> np.ndarray:
    """uint8 NHWC pixels of the scenes after the JPEG round trip and the pipeline's CPU decode."""
    pre = PreprocessStage(IMAGE_SIZE, IMAGE_SIZE)
    out = np.empty((len(scenes), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        out[i] = pre.decode(scene_jpeg(scene))
    return out
