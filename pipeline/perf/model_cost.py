"""Model cost: the CapFilt actor's images/s against the plain Hugging Face loop, same device and images.

The plain loop is what a user writes from the model cards: `AutoProcessor` on the host, fp32 models,
`generate`, then `BlipForImageTextRetrieval` once per caption, so the ITM vision tower runs again for
every text. The actor normalises on the device, runs bf16 on CUDA and reuses one vision pass for all texts.
The ratio says what that design buys, apart from Ray and downloads.

The models are BLIP architectures with the real sizes and random weights: the FLOPs are the real ones.
Both loops are forced to the same number of new tokens (EOS is suppressed until then), so random weights
cost what real ones do, and the tokenizer has BERT's 30522 entries, so every sampled id decodes to a word
that tokenizes back to one token and the ITM texts are as long as a real caption's.
"""

from __future__ import annotations

import copy
import itertools
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoProcessor,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipProcessor,
)

from pipeline.core.resources import Resources
from pipeline.curate.capfilt_stage import CapFiltStage, actor_dtype
from pipeline.curate.chunks import Chunk
from pipeline.curate.dedup import pixel_hash
from pipeline.curate.tiny_models import (
    CAPTIONER_DIR,
    IMAGE_SIZE,
    ITM_DIR,
    TinyModelPaths,
    blip_processor,
    tiny_vocab,
)
from pipeline.spec.config import CaptionerSpec, FilterSpec

SAMPLING = CaptionerSpec(num_captions=1)  # prompt, top_p, repetition_penalty of both: the pipeline's
BERT_VOCAB = 30522  # Salesforce's tokenizer adds [DEC] and [ENC] after it: 30524 ids in all
MARKER = "architecture.json"  # written last, so a half-written directory is rebuilt


@dataclass(frozen=True)
class Tower:
    hidden: int
    layers: int
    heads: int
    mlp: int

    def config(self) -> dict[str, int]:
        return {"hidden_size": self.hidden, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "intermediate_size": self.mlp}  # fmt: skip


@dataclass(frozen=True)
class Architecture:
    """The sizes of one BLIP captioner + ITM pair (Salesforce's checkpoints of one size share them)."""

    vision: Tower
    text: Tower
    image_size: int = 384
    patch_size: int = 16
    vocab_size: int | None = BERT_VOCAB + 2  # None: the tiny tokenizer's own size


_BERT_BASE = Tower(hidden=768, layers=12, heads=12, mlp=3072)
ARCHITECTURES = {
    "tiny": Architecture(Tower(32, 2, 2, 64), Tower(32, 2, 2, 64), image_size=IMAGE_SIZE, vocab_size=None),
    # blip-image-captioning-base, blip-itm-base-coco: ViT-B/16 at 384, BERT-base text
    "base": Architecture(vision=Tower(hidden=768, layers=12, heads=12, mlp=3072), text=_BERT_BASE),
    # blip-image-captioning-large, blip-itm-large-coco: ViT-L/16 at 384, BERT-base text
    "large": Architecture(vision=Tower(hidden=1024, layers=24, heads=16, mlp=4096), text=_BERT_BASE),
}


def architecture_processor(name: str) -> BlipProcessor:
    """tiny_models' processor at the architecture's image size; for real sizes the vocabulary is padded
    with filler words to BERT's 30522, so [DEC]/[ENC] get ids 30522/30523 as in Salesforce's tokenizer."""
    arch, vocab = ARCHITECTURES[name], tiny_vocab()
    fillers = (f"w{i}" for i in itertools.count())
    while arch.vocab_size is not None and len(vocab) < arch.vocab_size - 2:
        vocab.setdefault(next(fillers), len(vocab))
    return blip_processor(vocab, arch.image_size)


def architecture_config(name: str, processor: BlipProcessor | None = None) -> BlipConfig:
    """The BlipConfig of an architecture, its special-token ids the tokenizer's (see `blip_config`).
    BlipConfig sets the text tower's encoder_hidden_size (cross-attention) to the vision width."""
    arch, tok = ARCHITECTURES[name], (processor or architecture_processor(name)).tokenizer
    ids = {"bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
           "sep_token_id": tok.sep_token_id, "eos_token_id": tok.sep_token_id}  # fmt: skip
    return BlipConfig(
        text_config={**arch.text.config(), **ids, "vocab_size": arch.vocab_size or len(tok)},
        # the 1e-10 default initializer would make every image look the same
        vision_config={**arch.vision.config(), "image_size": arch.image_size, "patch_size": arch.patch_size,
                       "initializer_range": 0.02},
    )  # fmt: skip


def write_architecture(name: str, out_dir: str | Path, seed: int = 0) -> TinyModelPaths:
    """Captioner and ITM checkpoints of an architecture, random weights, loadable with `from_pretrained`.
    Skipped when out_dir already holds them: large takes minutes to build and ~4 GB to write."""
    out = Path(out_dir)
    paths = TinyModelPaths(captioner=out / CAPTIONER_DIR, itm=out / ITM_DIR)
    wanted = {"architecture": name, "seed": seed, **asdict(ARCHITECTURES[name])}
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return paths
    marker.unlink(missing_ok=True)
    processor = architecture_processor(name)
    config = architecture_config(name, processor)
    for model_cls, path in ((BlipForConditionalGeneration, paths.captioner),
                            (BlipForImageTextRetrieval, paths.itm)):  # fmt: skip
        torch.manual_seed(seed)
        model_cls(config).save_pretrained(path)
        processor.save_pretrained(path)
    marker.write_text(json.dumps(wanted))
    return paths


class PlainLoop:
    """The model cards' code, batched: host preprocessing, default dtype (fp32), `generate` with
    `num_return_sequences` for k captions, then the ITM model called once per (image, text) pair. It runs
    under `no_grad`, so the ratio is not about a forgotten autograd graph."""

    def __init__(
        self,
        paths: TinyModelPaths,
        new_tokens: int,
        device: str,
        captions: int = 1,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """`dtype`: the models' and pixels' (a GPU comparison runs both loops in bfloat16)."""
        self.processor = AutoProcessor.from_pretrained(paths.captioner)
        self.itm_processor = AutoProcessor.from_pretrained(paths.itm)
        self.captioner = BlipForConditionalGeneration.from_pretrained(
            paths.captioner, dtype=dtype, use_safetensors=True
        )
        self.itm = BlipForImageTextRetrieval.from_pretrained(paths.itm, dtype=dtype, use_safetensors=True)
        self.dtype = dtype
        self.captioner, self.itm = self.captioner.to(device), self.itm.to(device)
        self.new_tokens, self.device, self.captions = new_tokens, device, captions

    def with_captions(self, captions: int) -> PlainLoop:
        """The same loop (the same loaded models) writing `captions` captions per image."""
        loop = copy.copy(self)
        loop.captions = captions
        return loop

    def generate(self, images: list[np.ndarray]) -> torch.Tensor:
        """Token ids, k rows per image: the prompt less its [SEP], then exactly `new_tokens` new tokens."""
        inputs = self.processor(images=images, text=[SAMPLING.prompt] * len(images), return_tensors="pt")
        n = self.new_tokens
        sampling = {
            "do_sample": True,
            "top_p": SAMPLING.top_p,
            "repetition_penalty": SAMPLING.repetition_penalty,
        }
        return self.captioner.generate(
            **self._on_device(inputs),
            **sampling,
            num_return_sequences=self.captions,
            min_new_tokens=n,
            max_new_tokens=n,
        )

    @torch.no_grad()
    def __call__(self, pixels: np.ndarray) -> list[list[float]]:
        """Match probabilities of the web captions, then of the synthetic ones (prompt cut, as BLIP does)."""
        images = list(pixels)
        captions = self.processor.batch_decode(self.generate(images), skip_special_tokens=True)
        synthetic = [c[len(SAMPLING.prompt) :] for c in captions]
        scores = []
        pairs = [
            (web_captions(len(images)), images),
            (synthetic, [i for i in images for _ in range(self.captions)]),
        ]
        for texts, owners in pairs:
            inputs = self.itm_processor(images=owners, text=texts, padding=True, return_tensors="pt")
            logits = self.itm(**self._on_device(inputs), use_itm_head=True).itm_score
            scores.append(logits.softmax(dim=1)[:, 1].tolist())
        return scores

    def _on_device(self, inputs: Any) -> dict[str, torch.Tensor]:
        """The processor's tensors on the device, the pixels in the models' dtype."""
        moved = dict(inputs.to(self.device))
        moved["pixel_values"] = moved["pixel_values"].to(self.dtype)
        return moved


def load_stage(captioner: CaptionerSpec, filter: FilterSpec, device: str) -> CapFiltStage:
    """A set-up CapFiltStage on `device`; for "cpu", CUDA is hidden while it loads (as on a CPU machine)."""
    stage, real = CapFiltStage(captioner, filter, Resources()), torch.cuda.is_available
    if device == "cpu":
        torch.cuda.is_available = lambda: False
    try:
        stage.setup()
    finally:
        torch.cuda.is_available = real
    if stage.device != device:
        raise RuntimeError(f"asked for {device}, the stage loaded on {stage.device}")
    return stage


def capfilt_stage(
    paths: TinyModelPaths, new_tokens: int, device: str, captions: int = 1, decoder: str = "own"
) -> CapFiltStage:
    """The actor with the pipeline's defaults and `captions` captions of exactly `new_tokens` tokens per
    image: min/max_length count what BLIP's `generate` returns before them, the prompt less its [SEP]."""
    prompt = AutoProcessor.from_pretrained(paths.captioner).tokenizer(SAMPLING.prompt).input_ids
    length = len(prompt) - 1 + new_tokens
    lengths = {"min_length": length, "max_length": length}
    captioner = replace(
        SAMPLING, model=str(paths.captioner), num_captions=captions, decoder=decoder, **lengths
    )
    return load_stage(captioner, FilterSpec(model=str(paths.itm)), device)


def pixel_batches(batches: int, batch: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Random uint8 NHWC images at the model's size; the same ones go to both loops."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8) for _ in range(batches)]


def web_captions(n: int) -> list[str]:
    return [f"a photo of a red circle number {i}" for i in range(n)]


def chunk(pixels: np.ndarray) -> Chunk:
    """A decoded chunk, as the actor receives it from the preprocessing stage."""
    n = len(pixels)
    return {
        "shard": "00000",
        "chunk": 0,
        "keys": [f"{i:05d}" for i in range(n)],
        "pixels": pixels,
        "captions": web_captions(n),
        "decode_errors": [""] * n,
        "pixel_hashes": [pixel_hash(p) for p in pixels],
    }


Step = Callable[[np.ndarray], object]  # one batch of uint8 NHWC images through a loop


def capfilt_step(paths: TinyModelPaths, new_tokens: int, device: str) -> Step:
    stage = capfilt_stage(paths, new_tokens, device)
    return lambda pixels: stage(chunk(pixels))


def timed(
    steps: dict[str, Step], batches: list[np.ndarray], device: str, warm_up: bool = True
) -> dict[str, float]:
    """Images/s of each step over all batches, after an untimed warm-up on the first (lazy init, kernel
    choice for its shapes; `warm_up=False` when the caller has run them on it already). The steps take
    turns batch by batch, so a shared machine's changing load weighs on all alike."""
    for step in steps.values() if warm_up else ():
        step(batches[0])
    seconds = dict.fromkeys(steps, 0.0)
    for b in batches:
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step(b)
            sync(device)
            seconds[name] += time.perf_counter() - start
    return {name: sum(len(b) for b in batches) / s for name, s in seconds.items()}


def sync(device: str) -> None:
    """Wait for the device's queued work (timing a GPU measures nothing otherwise)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compare(architecture: str, images: int, batch: int, new_tokens: int, device: str,
            cache_dir: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Both loops on the same device, images and batches, at the current torch thread count (set it
    before calling), both models loaded, taking turns (see `timed`). Checkpoints are cached under
    cache_dir (default: the temp dir), one directory per architecture."""
    if images % batch:
        raise ValueError(f"images ({images}) must be a multiple of batch ({batch})")
    cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "capfilt-model-cost"
    paths = write_architecture(architecture, cache / architecture)
    pixels = pixel_batches(images // batch, batch, ARCHITECTURES[architecture].image_size)
    dtype = actor_dtype(device)
    plain_loop = PlainLoop(paths, new_tokens, device, dtype=dtype)
    capfilt = capfilt_step(paths, new_tokens, device)
    rates = timed({"plain": plain_loop, "capfilt": capfilt}, pixels, device)
    return {"architecture": architecture, "device": device, "threads": torch.get_num_threads(),
            "batch": batch, "images": images, "new_tokens": new_tokens,
            "plain_images_per_s": rates["plain"], "capfilt_images_per_s": rates["capfilt"],
            "ratio": rates["capfilt"] / rates["plain"]}  # fmt: skip
