"""`capfilt bench engine`: how close the CapFilt actor's model work is to the method's minimum and to
the machine, and how far ahead of the plain Hugging Face loop.

All figures are ratios of two measurements taken in one run, on one device, in one dtype:
- `flops_ratio_k1` / `_k5`: FLOPs the actor computes per image (FlopCounterMode) over the least the
  method needs (`flops.minimum_flops`), at BLIP-large sizes, for 1 and 5 captions per image;
- `matmul_fraction`: the actor's achieved FLOP/s (its counted FLOPs over its timed seconds, 1 caption)
  over this machine's dense matmul rate, timed here on the large model's own matrix shapes;
- `vs_plain_k1` / `_k5`: the actor's images/s over the plain loop's (`model_cost.PlainLoop`: 1 caption
  + 2 ITM pairs, 5 captions + 6 ITM pairs per image), taking turns batch by batch;
- `itc_share_k1` / `_k5`: the share of the actor's time spent on what ITC adds (the image embedding
  and each text's pass without cross-attention), timed inside the actor's own calls;
- `own_vs_generate_tiny`: captions/s of the own decode loop over `generate`, with the shipped tiny
  models, where a token's work is tiny and the per-step overhead (the CPU's stand-in for a GPU's
  launch-bound decoding) is what is measured.
The large models have the real sizes and random weights (`model_cost.write_architecture`), and every
caption is forced to `new_tokens` tokens, so they cost what real ones do.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.curate.blip_text import normalise_caption
from pipeline.curate.capfilt_stage import CapFiltStage, actor_dtype
from pipeline.curate.caption_decoder import SamplingRule
from pipeline.curate.itm_scorer import ITM_MAX_TOKENS
from pipeline.perf.flops import counted_flops, minimum_flops
from pipeline.perf.model_cost import (
    ARCHITECTURES,
    PlainLoop,
    capfilt_stage,
    chunk,
    load_stage,
    pixel_batches,
    sync,
    timed,
    write_architecture,
)
from pipeline.spec.config import CaptionerSpec, FilterSpec
from pipeline.synthetic.trained import shipped_models


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    work: Path
    architecture: str = "large"
    images_k1: int = 4  # per batch
    images_k5: int = 2  # the plain loop runs 7 vision passes an image at k=5: fewer, to stay within minutes
    batches_k1: int = 2  # timed batches, the two loops taking turns (k=5: one)
    new_tokens: int = 20
    tiny_images: int = 1  # 5 captions each
    tiny_rounds: int = 30


def run_engine_bench(settings: EngineSettings, log: Any = print) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    arch = settings.architecture
    log(f"engine: {arch} checkpoints (built once, then reused from {settings.work}) ...")
    paths = write_architecture(arch, settings.work / "architectures" / arch)
    size = ARCHITECTURES[arch].image_size
    report: dict[str, Any] = {
        "device": _device_name(device),
        "dtype": str(actor_dtype(device)).removeprefix("torch."),
        "architecture": arch,
        "images_k1": settings.images_k1,
        "images_k5": settings.images_k5,
        "batches_k1": settings.batches_k1,
        "new_tokens": settings.new_tokens,
        "threads": torch.get_num_threads(),
    }
    log("engine: matmul rate of the model's shapes ...")
    vision = ARCHITECTURES[arch].vision
    image_tokens = (size // ARCHITECTURES[arch].patch_size) ** 2 + 1
    report["matmul_gflops"] = matmul_rate(vision.hidden, vision.mlp, image_tokens, device) / 1e9
    own = {1: capfilt_stage(paths, settings.new_tokens, device, captions=1)}
    own[5] = own[1].with_captions(5)
    dtype = actor_dtype(device)
    plain = {1: PlainLoop(paths, settings.new_tokens, device, captions=1, dtype=dtype)}
    plain[5] = plain[1].with_captions(5)
    for k, images, rounds in ((1, settings.images_k1, settings.batches_k1), (5, settings.images_k5, 1)):
        batches = pixel_batches(rounds, images, size, seed=k)
        log(f"engine: FLOPs per image, {k} caption(s), {images} images (the actor's warm-up) ...")
        flops = actor_flops(own[k], batches[0], settings.new_tokens)
        report[f"flops_per_image_k{k}"] = flops["actual"]
        report[f"minimum_flops_per_image_k{k}"] = flops["minimum"]
        report[f"flops_ratio_k{k}"] = flops["actual"] / flops["minimum"]
        log(f"engine: the actor against the plain loop, {k} caption(s) ...")
        steps = {"plain": plain[k], "capfilt": lambda pixels, stage=own[k]: stage(chunk(pixels))}
        plain[k](batches[0])  # the plain loop's warm-up, on the same shapes
        rates = timed(steps, batches, device, warm_up=False)
        report[f"plain_images_per_s_k{k}"] = rates["plain"]
        report[f"capfilt_images_per_s_k{k}"] = rates["capfilt"]
        report[f"vs_plain_k{k}"] = rates["capfilt"] / rates["plain"]
        log(f"engine: ITC's share of the actor's time, {k} caption(s) ...")
        report[f"itc_share_k{k}"] = itc_share(own[k], batches, device)
    achieved = report["flops_per_image_k1"] * report["capfilt_images_per_s_k1"]
    report["achieved_gflops_k1"] = achieved / 1e9
    report["matmul_fraction"] = report["achieved_gflops_k1"] / report["matmul_gflops"]
    log("engine: own decode loop against generate, shipped tiny models ...")
    report.update(decoder_overhead(device, settings.tiny_images, settings.tiny_rounds))
    return {"engine": report}


def actor_flops(stage: CapFiltStage, pixels: np.ndarray, new_tokens: int) -> dict[str, float]:
    """FLOPs per image of one actor call on `pixels`, and the method's minimum for the same texts."""
    work = chunk(pixels)
    out: dict[str, Any] = {}
    actual = counted_flops(lambda: out.update(stage(work)))
    m, spec = stage.models, stage.filter_spec
    texts = [*work["captions"], *(text for row in out["synthetic_captions"] for text in row)]
    tokens = m.itm_tokenizer(
        [normalise_caption(t, spec) for t in texts], truncation=True, max_length=ITM_MAX_TOKENS
    )
    prompt = len(m.captioner_tokenizer(stage.captioner_spec.prompt).input_ids) - 1  # [DEC] in, [SEP] out
    images, k = len(pixels), stage.captioner_spec.num_captions
    least = minimum_flops(
        m.captioner.config,
        m.itm_model.config,
        images,
        k,
        prompt,
        new_tokens,
        [len(ids) for ids in tokens.input_ids],
    )
    return {"actual": actual / images, "minimum": least / images}


def itc_share(stage: CapFiltStage, batches: list[np.ndarray], device: str) -> float:
    """Seconds in ITC's own work (`ItmEncoder.image_features` and `.text_features`, timed where the
    actor calls them, the device synchronised around each) over the actor's seconds on `batches`."""
    encoder = stage.models.itm_encoder
    spent = [0.0]

    def timing(method: Any) -> Any:
        def call(*args: Any) -> Any:
            sync(device)
            start = time.perf_counter()
            out = method(*args)
            sync(device)
            spent[0] += time.perf_counter() - start
            return out

        return call

    encoder.image_features = timing(encoder.image_features)
    encoder.text_features = timing(encoder.text_features)
    try:
        start = time.perf_counter()
        for pixels in batches:
            stage(chunk(pixels))
        sync(device)
        total = time.perf_counter() - start
    finally:
        del encoder.image_features, encoder.text_features  # the class's methods again
    return spent[0] / total


def matmul_rate(hidden: int, mlp: int, rows: int, device: str, seconds: float = 3.0) -> float:
    """FLOP/s of dense matmuls of a transformer layer's shapes (rows x hidden by hidden x 3 hidden,
    hidden x hidden, hidden x mlp, mlp x hidden), in the device's model dtype: what the hardware and
    BLAS reach on exactly the work that dominates the model."""
    dtype = actor_dtype(device)
    shapes = [(hidden, 3 * hidden), (hidden, hidden), (hidden, mlp), (mlp, hidden)]
    pairs = [
        (torch.randn(rows, a, dtype=dtype, device=device), torch.randn(b, a, dtype=dtype, device=device))
        for a, b in shapes
    ]
    flops_per_round = sum(2 * rows * a * b for a, b in shapes)
    for x, w in pairs:  # warm-up
        torch.nn.functional.linear(x, w)
    rounds, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for x, w in pairs:
            torch.nn.functional.linear(x, w)
        if device == "cuda":
            torch.cuda.synchronize()
        rounds += 1
    return rounds * flops_per_round / (time.perf_counter() - start)


def decoder_overhead(device: str, images: int, rounds: int) -> dict[str, float]:
    """Captions/s of the own decode loop over transformers' (`text_decoder.generate`, what
    `BlipForConditionalGeneration.generate` runs after its vision pass), on the same image embeddings:
    the shipped tiny models, 5 captions per image, the pipeline's sampling, the same seed for both
    (both draw the same tokens), taking turns. Few rows and a small model make each step's work tiny,
    so what is timed is what a step costs beyond its arithmetic."""
    models = shipped_models()
    captioner = CaptionerSpec(model=str(models.captioner), num_captions=5)
    m = load_stage(captioner, FilterSpec(model=str(models.itm)), device).models
    text = m.captioner.config.text_config
    prompt = m.captioner_tokenizer(captioner.prompt).input_ids
    [pixels] = pixel_batches(1, images, m.captioner.config.vision_config.image_size, seed=3)
    with torch.inference_mode():
        embeds = m.captioner.vision_model(pixel_values=m.model_inputs(pixels)[0])[0]
    generate_args = {
        "input_ids": torch.tensor([[text.bos_token_id, *prompt[1:-1]]], device=device).repeat(images, 1),
        "eos_token_id": text.sep_token_id,
        "pad_token_id": text.pad_token_id,
        "encoder_hidden_states": embeds,
        "encoder_attention_mask": torch.ones(embeds.shape[:-1], dtype=torch.long, device=device),
        "num_return_sequences": 5,
        **SamplingRule.for_captioner(captioner).generate_kwargs(),
    }
    loops = {
        "own": lambda: m.decoder(embeds, prompt, 5),
        "generate": lambda: m.captioner.text_decoder.generate(**generate_args),
    }
    seconds = dict.fromkeys(loops, 0.0)
    with torch.inference_mode():
        for round_ in range(rounds + 1):  # round 0 warms up
            for name, loop in loops.items():
                torch.manual_seed(round_)
                start = time.perf_counter()
                loop()
                sync(device)
                if round_:
                    seconds[name] += time.perf_counter() - start
    captions = images * 5 * rounds
    own, generate = captions / seconds["own"], captions / seconds["generate"]
    return {
        "tiny_images": images,
        "tiny_own_captions_per_s": own,
        "tiny_generate_captions_per_s": generate,
        "own_vs_generate_tiny": own / generate,
    }


def _device_name(device: str) -> str:
    if device == "cuda":
        return f"cuda: {torch.cuda.get_device_name()}"
    return "cpu"


def format_engine_report(report: dict[str, Any]) -> str:
    e = report["engine"]
    where = f"{e['architecture']} sizes, {e['device']} {e['dtype']}, {e['threads']} threads"
    return "\n".join(
        [
            f"engine ({where}, {e['new_tokens']} new tokens per caption):",
            f"  FLOPs actual/minimum per image: k=1 {e['flops_ratio_k1']:.3f}, k=5 {e['flops_ratio_k5']:.3f}"
            f" (k=1: {e['flops_per_image_k1'] / 1e9:.1f}"
            f" vs {e['minimum_flops_per_image_k1'] / 1e9:.1f} GFLOP)",
            f"  achieved {e['achieved_gflops_k1']:.1f} GFLOP/s of a {e['matmul_gflops']:.1f} GFLOP/s"
            f" matmul rate: fraction {e['matmul_fraction']:.2f}",
            f"  vs plain HF loop ({e['batches_k1']} x {e['images_k1']} / 1 x {e['images_k5']} images):"
            f" k=1 {e['vs_plain_k1']:.2f}x ({e['capfilt_images_per_s_k1']:.3f} vs"
            f" {e['plain_images_per_s_k1']:.3f} images/s), k=5 {e['vs_plain_k5']:.2f}x"
            f" ({e['capfilt_images_per_s_k5']:.3f} vs {e['plain_images_per_s_k5']:.3f} images/s)",
            f"  ITC's share of the actor's time: k=1 {e['itc_share_k1']:.3f}, k=5 {e['itc_share_k5']:.3f}",
            f"  own decoder vs generate, shipped tiny models: {e['own_vs_generate_tiny']:.2f}x"
            f" ({e['tiny_own_captions_per_s']:.0f} vs {e['tiny_generate_captions_per_s']:.0f} captions/s)",
        ]
    )
