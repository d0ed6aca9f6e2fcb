"""Can the shipped filter be trained so that its ITC image embedding separates planted copies from
distinct scenes (issue 22's near-dedup target), without losing the filter? An experiment for
docs/quality.md, not a product path: the model it trains is not shipped.

    python benchmarks/itc_dedup.py --train /tmp/itc-filter   # 20 min on 2 cores: train, then measure it
    python benchmarks/itc_dedup.py --eval /tmp/itc-filter    # measure a filter checkpoint (default: shipped)

The recipe trains a new filter from the shipped captioner, as `pipeline.synthetic.train` does, for
3,000 steps of 48 with, on one vision pass:
- ITM, exactly as the shipped filter was trained (`itm_loss_of`);
- ITC as BLIP trains it: projected vision [CLS] against projected text [CLS], in-batch, both ways,
  temperature 0.07, scenes with the same attributes positives of each other;
- an image-image term BLIP does not have: two RandomResizedCrops (scale 0.8-1) of each picture against
  the batch's other pictures (InfoNCE at 0.05, as SSCD trains copy detection);
and half of each batch the other half's scenes at the same layout with one attribute changed, or shape
and size together (a small square and a large triangle cover about the same pixels), so the in-batch
negatives are the hard ones.

It prints, for 600 `eval` scenes decoded as the pipeline decodes them: the nearest distinct scene's
cosine and the attributes by which the closest pairs differ; each altered copy kind's cosine to its
original (40 each, made by `capfilt bench dedup`'s `planted_copy`); recall and false merges per
threshold; and how often the filter's ITM accepts a small square's true caption on the same scene
drawn with large triangles (its look-alike).
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor

from pipeline.core.resources import Resources
from pipeline.curate.blip_text import normalise_caption
from pipeline.curate.capfilt_stage import CapFiltStage, Normaliser
from pipeline.curate.itm_scorer import ITM_MAX_TOKENS
from pipeline.curate.preprocess import PreprocessStage
from pipeline.spec.config import CaptionerSpec, FilterSpec
from pipeline.synthetic.dedup_bench import ALTERED_KINDS, planted_copy
from pipeline.synthetic.pixels import IMAGE_SIZE, scene_jpeg, stored_pixels
from pipeline.synthetic.splits import clean_split, eval_split, with_other_value
from pipeline.synthetic.train import ITM_TEXT, TrainConfig, _fit, _itm_from_captioner, itm_loss_of
from pipeline.synthetic.trained import shipped_models
from pipeline.synthetic.world import ATTRIBUTES, Scene, describe, random_scene

STEPS = 3000
ITC_TEMPERATURE = 0.07  # BLIP's initial temperature
INSTANCE_TEMPERATURE = 0.05  # SSCD's
TWIN_SWAPS = (*((name,) for name in ATTRIBUTES), ("shape", "size"))
THRESHOLDS = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)


def train_filter(out: Path) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng([0, 7])
    shipped = shipped_models()
    captioner = BlipForConditionalGeneration.from_pretrained(shipped.captioner, torch_dtype=torch.float32)
    processor = BlipProcessor.from_pretrained(shipped.captioner)
    model = _itm_from_captioner(captioner, captioner.config)
    normalise = Normaliser(processor.image_processor, "cpu", torch.float32)
    scenes = [pair.scene for pair in clean_split(8000, 0)]
    pixels = stored_pixels(scenes)

    def loss_of(idx: np.ndarray) -> torch.Tensor:
        half = [scenes[i] for i in idx[: len(idx) // 2]]
        batch = half + [twin(scene, rng) for scene in half]
        raw = np.concatenate([pixels[idx[: len(half)]], stored_pixels(batch[len(half) :])])
        views = np.concatenate([random_resized_crops(raw, rng) for _ in range(2)])
        image_embeds = model.vision_model(pixel_values=normalise(torch.from_numpy(views)))[0]
        first = image_embeds[: len(batch)]
        return (
            itm_loss_of(model, processor, first, batch, rng)
            + itc_loss(model, processor, first, batch, rng)
            + instance_loss(model, image_embeds)
        )

    _fit(model, STEPS, TrainConfig(), print, "filter", len(scenes), rng, loss_of)
    model.eval().half().save_pretrained(out)
    processor.save_pretrained(out)


def twin(scene: Scene, rng: np.random.Generator) -> Scene:
    for name in TWIN_SWAPS[int(rng.integers(len(TWIN_SWAPS)))]:
        scene = with_other_value(scene, name, rng)
    return scene


def itc_loss(model: BlipForImageTextRetrieval, processor: BlipProcessor, image_embeds: torch.Tensor,
             scenes: list[Scene], rng: np.random.Generator) -> torch.Tensor:  # fmt: skip
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)
    texts = [normalise_caption(describe(scene, rng), ITM_TEXT) for scene in scenes]
    tokens = processor.tokenizer(
        texts, padding="longest", truncation=True, max_length=ITM_MAX_TOKENS, return_tensors="pt"
    )
    hidden = model.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    text_feat = F.normalize(model.text_proj(hidden.last_hidden_state[:, 0, :]), dim=-1)
    similarity = image_feat @ text_feat.t() / ITC_TEMPERATURE
    attributes = [scene.attributes for scene in scenes]
    target = torch.tensor([[float(a == b) for b in attributes] for a in attributes])
    target = target / target.sum(1, keepdim=True)
    image_to_text = -(target * F.log_softmax(similarity, 1)).sum(1).mean()
    text_to_image = -(target * F.log_softmax(similarity.t(), 1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def instance_loss(model: BlipForImageTextRetrieval, image_embeds: torch.Tensor) -> torch.Tensor:
    """Two crops of one picture against every other picture of the batch (first crops first)."""
    first, second = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1).chunk(2)
    similarity = first @ second.t() / INSTANCE_TEMPERATURE
    same = torch.arange(len(first))
    return (F.cross_entropy(similarity, same) + F.cross_entropy(similarity.t(), same)) / 2


def random_resized_crops(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.empty_like(pixels)
    side = pixels.shape[1]
    for i, image in enumerate(pixels):
        scale = rng.uniform(0.8, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = min(side, round(side * math.sqrt(scale * ratio)))
        h = min(side, round(side * math.sqrt(scale / ratio)))
        x, y = int(rng.integers(0, side - w + 1)), int(rng.integers(0, side - h + 1))
        crop = Image.fromarray(image).crop((x, y, x + w, y + h))
        out[i] = np.asarray(crop.resize((side, side), Image.Resampling.BICUBIC))
    return out


def measure(itm: Path) -> None:
    stage = CapFiltStage(
        CaptionerSpec(model=str(shipped_models().captioner), num_captions=1, max_length=30, seed=0),
        FilterSpec(model=str(itm)),
        Resources(),
    )
    stage.setup()
    decode = PreprocessStage(IMAGE_SIZE, IMAGE_SIZE).decode

    @torch.inference_mode()
    def embed(jpegs: list[bytes]) -> np.ndarray:
        pixels = torch.from_numpy(np.stack([decode(j) for j in jpegs]))
        scores = stage.score(pixels, ["a"] * len(jpegs), list(range(len(jpegs))))
        return scores.image_embeddings.astype(np.float32)

    pairs = eval_split(600, 0)
    jpegs = [scene_jpeg(p.scene) for p in pairs]
    originals = embed(jpegs)
    sims = originals @ originals.T
    np.fill_diagonal(sims, -1)
    nearest, partner = sims.max(1), sims.argmax(1)
    p95, p99 = np.quantile(nearest, [0.95, 0.99])
    print(f"nearest distinct scene: median {np.median(nearest):.4f} p95 {p95:.4f} p99 {p99:.4f}")
    close = np.flatnonzero(nearest >= 0.95)
    differ = Counter(_differing(pairs[i].scene, pairs[partner[i]].scene) for i in close)
    print(f"scenes with a distinct scene at >= 0.95: {len(close)}, differing in {differ.most_common(4)}")
    rng = np.random.default_rng(1)
    found = {}
    for kind in ALTERED_KINDS:
        picks = rng.choice(len(pairs), 40, replace=False)
        copies = embed([planted_copy(jpegs[i], kind, rng)[0] for i in picks])
        own = (copies * originals[picks]).sum(1)
        nearest_is_own = (copies @ originals.T).argmax(1) == picks
        found[kind] = (own, nearest_is_own)
        spread = f"p5 {np.quantile(own, 0.05):.4f} median {np.median(own):.4f}"
        own_nearest = f"its nearest original is its own: {nearest_is_own.mean():.2f}"
        print(f"{kind:12s} cosine to its original: {spread}; {own_nearest}")
    for t in THRESHOLDS:
        recall = {kind: float(((own >= t) & hit).mean()) for kind, (own, hit) in found.items()}
        altered = np.mean(list(recall.values()))
        merged = int((nearest >= t).sum())
        shares = " ".join(f"{kind} {r:.2f}" for kind, r in recall.items())
        merges = f"false merges {merged} ({merged / len(pairs):.1%})"
        print(f"at {t}: recall {shares}, altered {altered:.3f}; {merges}")
    accepted = look_alike_acceptance(stage)
    print(f"ITM accepts a small square's true caption on its large-triangle look-alike: {accepted:.0%}")


def _differing(a: Scene, b: Scene) -> str:
    return "+".join(name for name in ATTRIBUTES if getattr(a, name) != getattr(b, name))


def look_alike_acceptance(stage: CapFiltStage) -> float:
    rng = np.random.default_rng(2)
    squares: list[Scene] = []
    while len(squares) < 100:
        scene = random_scene(rng)
        if (scene.shape, scene.size) == ("square", "small"):
            squares.append(scene)
    look_alikes = [s.with_attribute("shape", "triangle").with_attribute("size", "large") for s in squares]
    with torch.inference_mode():
        scores = stage.itm(
            torch.from_numpy(stored_pixels(look_alikes)),
            [describe(s, rng) for s in squares],
            list(range(100)),
        )
    return float(np.mean(np.array(scores) >= 0.5))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--train", type=Path, metavar="OUT", help="train the experiment's filter into OUT, then measure it"
    )
    parser.add_argument(
        "--eval", type=Path, metavar="ITM", help="measure this filter checkpoint (default: the shipped one)"
    )
    args = parser.parse_args()
    if args.train:
        started = time.monotonic()
        train_filter(args.train)
        print(f"trained in {time.monotonic() - started:.0f} s")
    measure(args.train or args.eval or shipped_models().itm)


if __name__ == "__main__":
    main()
