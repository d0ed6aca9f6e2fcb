"""GPU check of the CapFilt actor: the same stage on CUDA (bf16) and on the CPU (fp32).

1. Tiny checkpoints: captions come back per image, and CUDA/bf16 ITM probabilities match the
   CPU/fp32 ones within bf16 rounding.
2. BLIP-large-sized models (BlipConfig with the real sizes, random weights: the FLOPs are the real
   ones) for a first throughput figure of one actor: images/s for caption + ITM.

    python benchmarks/gpu_check.py [--images 256] [--batch 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor

from pipeline.capfilt_stage import CapFiltStage
from pipeline.config import CaptionerSpec, FilterSpec
from pipeline.resources import Resources
from pipeline.tiny_models import write_tiny_models


def _chunk(n: int, size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"shard": "00000", "chunk": seed, "keys": [f"{i:05d}" for i in range(n)],
            "pixels": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "captions": [f"a photo of thing {i}" for i in range(n)], "decode_errors": [""] * n}  # fmt: skip


def _stage(captioner: Path, itm: Path, batch: int, device: str, **captioner_args) -> CapFiltStage:
    stage = CapFiltStage(CaptionerSpec(model=str(captioner), **captioner_args),
                         FilterSpec(model=str(itm), batch_size=4 * batch), Resources())  # fmt: skip
    if device == "cpu":
        real = torch.cuda.is_available
        torch.cuda.is_available = lambda: (
            False
        )  # load the same stage on the CPU, as on a machine without CUDA
        try:
            stage.setup()
        finally:
            torch.cuda.is_available = real
    else:
        stage.setup()
    return stage


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


def large_models(tmp: Path) -> tuple[Path, Path]:
    """ViT-L/16 at 384 + BERT-base text, the sizes of blip-image-captioning-large / blip-itm-large-coco."""
    tiny = write_tiny_models(tmp / "tok")
    processor = BlipProcessor.from_pretrained(tiny.captioner)
    processor.image_processor.size = {"height": 384, "width": 384}
    tok = processor.tokenizer
    config = BlipConfig(
        vision_config={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                       "intermediate_size": 4096, "image_size": 384, "patch_size": 16},
        text_config={"vocab_size": 30524, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
                     "sep_token_id": tok.sep_token_id, "eos_token_id": tok.sep_token_id},
    )  # fmt: skip
    paths = []
    for cls, name in ((BlipForConditionalGeneration, "captioner"), (BlipForImageTextRetrieval, "itm")):
        cls(config).save_pretrained(tmp / name)
        processor.save_pretrained(tmp / name)
        paths.append(tmp / name)
    return paths[0], paths[1]


def bench_large(tmp: Path, images: int, batch: int) -> None:
    captioner, itm = large_models(tmp)
    # min_length = max_length: random weights must cost what real ones do (a full-length caption).
    stage = _stage(captioner, itm, batch, "cuda", num_captions=1, min_length=20, max_length=20)
    stage(_chunk(batch, 384, seed=99))  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(images // batch):
        stage(_chunk(batch, 384, seed=i))
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    n = (images // batch) * batch
    print(f"large: {n} images, chunk {batch}, 1 caption of 20 tokens + 2 ITM pairs per image: "
          f"{n / elapsed:.1f} images/s on {torch.cuda.get_device_name()}")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        check_tiny(Path(tmp))
        bench_large(Path(tmp), args.images, args.batch)
