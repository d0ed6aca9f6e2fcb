"""GPU check of the CapFilt actor: the same stage on CUDA (bf16) and on the CPU (fp32).

1. Tiny checkpoints: captions come back per image, and CUDA/bf16 ITM probabilities match the
   CPU/fp32 ones within bf16 rounding.
2. BLIP-large-sized models (`model_cost.write_architecture`: the real sizes, random weights, so the
   FLOPs are the real ones) for a first throughput figure of one actor: images/s for caption + ITM.
3. With --compare, the same against the plain Hugging Face loop (`model_cost.compare`).

    python benchmarks/gpu_check.py [--images 256] [--batch 64] [--models DIR] [--compare]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.curate.capfilt_stage import CapFiltStage
from pipeline.curate.tiny_models import write_tiny_models
from pipeline.perf.model_cost import capfilt_stage, compare, load_stage, write_architecture
from pipeline.spec.config import CaptionerSpec, FilterSpec

NEW_TOKENS = 20


def _chunk(n: int, size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"shard": "00000", "chunk": seed, "keys": [f"{i:05d}" for i in range(n)],
            "pixels": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "captions": [f"a photo of thing {i}" for i in range(n)], "decode_errors": [""] * n}  # fmt: skip


def _stage(captioner: Path, itm: Path, batch: int, device: str, **captioner_args) -> CapFiltStage:
    return load_stage(CaptionerSpec(model=str(captioner), **captioner_args),
                      FilterSpec(model=str(itm), batch_size=4 * batch), device)  # fmt: skip


def check_tiny(tmp: Path) -> None:
    paths = write_tiny_models(tmp / "tiny")
    chunk = _chunk(16, 64)
    gpu = _stage(paths.captioner, paths.itm, 16, "cuda", num_captions=3)
    cpu = _stage(paths.captioner, paths.itm, 16, "cpu", num_captions=3)
    assert gpu.device == "cuda" and gpu.models.dtype == torch.bfloat16 and cpu.device == "cpu"
    pixels = torch.from_numpy(chunk["pixels"])
    texts = [f"a red circle number {i}" for i in range(16)]
    diff = np.abs(
        np.array(gpu.itm(pixels, texts, list(range(16)))) - np.array(cpu.itm(pixels, texts, list(range(16))))
    )
    out = gpu(chunk)
    assert all(len(c) == 3 and all(t for t in c) for c in out["synthetic_captions"])
    assert all(0 <= s <= 1 for row in out["synthetic_itm"] for s in row)
    print(f"tiny: cuda/bf16 vs cpu/fp32 ITM max |diff| = {diff.max():.4f} (bf16 rounding: < 0.02 expected)")
    print(f"tiny: sample caption on cuda: {out['synthetic_captions'][0][0]!r}")
    assert diff.max() < 0.02


def bench_large(models: Path, images: int, batch: int) -> None:
    # Exactly NEW_TOKENS sampled tokens per caption: random weights must cost what real ones do.
    stage = capfilt_stage(write_architecture("large", models / "large"), NEW_TOKENS, "cuda")
    stage(_chunk(batch, 384, seed=99))  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(images // batch):
        stage(_chunk(batch, 384, seed=i))
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    n = (images // batch) * batch
    print(f"large: {n} images, chunk {batch}, 1 caption of {NEW_TOKENS} new tokens + 2 ITM pairs per image: "
          f"{n / elapsed:.1f} images/s on {torch.cuda.get_device_name()}")  # fmt: skip


def compare_plain(models: Path, images: int, batch: int) -> None:
    """Item 5 of the performance issue on this GPU: the actor against the plain HF loop (fp32)."""
    result = compare("large", images, batch, NEW_TOKENS, "cuda", cache_dir=models)
    print(f"large vs plain HF loop: plain {result['plain_images_per_s']:.1f} images/s, "
          f"capfilt {result['capfilt_images_per_s']:.1f} images/s, ratio {result['ratio']:.2f}")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--models", type=Path, help="keep the large checkpoints here (default: a temp dir)")
    parser.add_argument("--compare", action="store_true", help="also time the plain HF loop (item 5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        check_tiny(Path(tmp))
        models = args.models or Path(tmp)
        bench_large(models, args.images, args.batch)
        if args.compare:
            compare_plain(models, args.images, args.batch)
