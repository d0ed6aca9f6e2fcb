"""GPU check of the CapFilt actor: the same stage on CUDA (bf16) and on the CPU (fp32), then the engine.

1. Tiny checkpoints: captions come back per image, and CUDA/bf16 ITM probabilities match the CPU/fp32
   ones within bf16 rounding.
2. bf16 drift where it matters: the same check at BLIP-large sizes (`model_cost.write_architecture`:
   the real sizes, random weights), ITM probabilities of the same images and texts on CUDA/bf16 and on
   the CPU/fp32.
3. Throughput of one actor at BLIP-large sizes: 1 caption of 20 new tokens + 2 ITM pairs per image,
   the chunks prepared before the clock starts, so only model work is timed.
4. With --engine, `capfilt bench engine` on this GPU (FLOPs vs the minimum, vs the matmul rate, vs
   the plain loop in the same dtype, own decoder vs generate).

    python benchmarks/gpu_check.py [--images 256] [--batch 64] [--models DIR] [--engine] [--compile]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.curate.capfilt_stage import CapFiltStage
from pipeline.curate.tiny_models import write_tiny_models
from pipeline.perf.engine_bench import EngineSettings, format_engine_report, run_engine_bench
from pipeline.perf.model_cost import capfilt_stage, chunk, load_stage, pixel_batches, write_architecture
from pipeline.spec.config import CaptionerSpec, FilterSpec

NEW_TOKENS = 20


def _stage(paths, batch: int, device: str, **captioner_args) -> CapFiltStage:
    captioner = CaptionerSpec(model=str(paths.captioner), **captioner_args)
    return load_stage(captioner, FilterSpec(model=str(paths.itm), batch_size=4 * batch), device)


def itm_drift(paths, images: int, size: int) -> float:
    """Max |CUDA/bf16 - CPU/fp32| of ITM probabilities, same images and texts."""
    pixels = torch.from_numpy(pixel_batches(1, images, size, seed=5)[0])
    texts = [f"a red circle number {i}" for i in range(images)]
    gpu, cpu = (
        _stage(paths, images, device).itm(pixels, texts, list(range(images))) for device in ("cuda", "cpu")
    )
    return float(np.abs(np.array(gpu) - np.array(cpu)).max())


def check_tiny(tmp: Path) -> None:
    paths = write_tiny_models(tmp / "tiny")
    gpu = _stage(paths, 16, "cuda", num_captions=3)
    assert gpu.device == "cuda" and gpu.models.dtype == torch.bfloat16
    out = gpu(chunk(pixel_batches(1, 16, 64)[0]))
    assert all(len(c) == 3 and all(t for t in c) for c in out["synthetic_captions"])
    assert all(0 <= s <= 1 for row in out["synthetic_itm"] for s in row)
    drift = itm_drift(paths, 16, 64)
    print(f"tiny: cuda/bf16 vs cpu/fp32 ITM max |diff| = {drift:.4f} (bf16 rounding: < 0.02 expected)")
    print(f"tiny: sample caption on cuda: {out['synthetic_captions'][0][0]!r}")
    assert drift < 0.02


def bench_large(models: Path, images: int, batch: int, compile_step: bool) -> None:
    paths = write_architecture("large", models / "architectures" / "large")  # where the engine bench looks
    print(f"large: cuda/bf16 vs cpu/fp32 ITM max |diff| = {itm_drift(paths, 8, 384):.4f}")
    # Exactly NEW_TOKENS sampled tokens per caption: random weights must cost what real ones do.
    stage = capfilt_stage(paths, NEW_TOKENS, "cuda")
    if compile_step:
        stage.models.decoder.compile_step()
    chunks = [chunk(pixels) for pixels in pixel_batches(images // batch, batch, 384)]  # prepared untimed
    stage(chunks[0])  # warm-up, same shapes
    torch.cuda.synchronize()
    start = time.perf_counter()
    for work in chunks:
        stage(work)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    n = len(chunks) * batch
    how = f"chunk {batch}, 1 caption of {NEW_TOKENS} new tokens + 2 ITM pairs per image"
    how += ", compiled decode step" if compile_step else ""
    print(f"large: {n} images, {how}: {n / elapsed:.1f} images/s on {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--models", type=Path, help="keep the large checkpoints under here (default: a temp dir)"
    )
    parser.add_argument("--engine", action="store_true", help="also run `capfilt bench engine` here")
    parser.add_argument("--compile", action="store_true", help="time the large actor with the compiled step")
    parser.add_argument("--json", type=Path, help="write the engine figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        check_tiny(Path(tmp))
        models = args.models or Path(tmp)
        bench_large(models, args.images, args.batch, args.compile)
        if args.engine:
            report = run_engine_bench(EngineSettings(work=models))
            print(format_engine_report(report))
            if args.json:
                args.json.write_text(json.dumps(report, indent=2) + "\n")
