"""Does ITC trained as BLIP trains it (jointly with ITM, under a mild RandomResizedCrop) make the
shipped filter's image embedding separate planted copies from distinct scenes? An experiment for
issue 22's near-dedup target (docs/quality.md), not a product path: the fine-tuned model is not saved.

    python benchmarks/itc_dedup.py 2000 rrc     # 10 min on 2 cores; `0 rrc --eval-only`: the shipped model

It prints the nearest distinct scene's cosine among 600 `eval` scenes, each copy kind's cosine to
its original (40 each, made by `capfilt bench dedup`'s `planted_copy`), and recall and false merges
per threshold. Copies are decoded and resized to 64 px here, as img2dataset stores them."""

import io
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BlipForImageTextRetrieval, BlipProcessor

from pipeline.curate.blip_text import normalise_caption
from pipeline.curate.capfilt_stage import Normaliser
from pipeline.synthetic.dedup_bench import COPY_KINDS, planted_copy
from pipeline.synthetic.pixels import IMAGE_SIZE, scene_jpeg
from pipeline.synthetic.splits import clean_split, eval_split
from pipeline.synthetic.train import ITM_TEXT, _itm_loss
from pipeline.synthetic.trained import shipped_models
from pipeline.synthetic.world import describe

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 600
AUG = sys.argv[2] if len(sys.argv) > 2 else "rrc"
torch.manual_seed(0)
rng = np.random.default_rng(0)
path = shipped_models().itm
model = BlipForImageTextRetrieval.from_pretrained(path, torch_dtype=torch.float32)
processor = BlipProcessor.from_pretrained(path)
normalise = Normaliser(processor.image_processor, "cpu", torch.float32)


def as_stored(data: bytes) -> np.ndarray:
    """What img2dataset stores and the pipeline decodes: the image at 64x64."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC))


def augment(jpeg: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    if AUG == "rrc":  # BLIP's RandomResizedCrop, mild (this world's shapes sit near the edges)
        scale = rng.uniform(0.8, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w = round(IMAGE_SIZE * np.sqrt(scale * ratio))
        h = round(IMAGE_SIZE * np.sqrt(scale / ratio))
        w, h = min(w, IMAGE_SIZE), min(h, IMAGE_SIZE)
        x, y = rng.integers(0, IMAGE_SIZE - w + 1), rng.integers(0, IMAGE_SIZE - h + 1)
        image = image.crop((x, y, x + w, y + h)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        return np.asarray(image)
    return np.asarray(image)


scenes = [p.scene for p in clean_split(8000, 0)]
jpegs = [scene_jpeg(s) for s in scenes]
if "--eval-only" not in sys.argv:
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    model.train()
    started = time.time()
    for step in range(STEPS):
        idx = rng.choice(len(scenes), size=48, replace=False)
        batch_scenes = [scenes[i] for i in idx]
        pixels = normalise(torch.from_numpy(np.stack([augment(jpegs[i]) for i in idx])))
        image_embeds = model.vision_model(pixel_values=pixels)[0]
        image_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)
        texts = [normalise_caption(describe(s, rng), ITM_TEXT) for s in batch_scenes]
        tok = processor.tokenizer(texts, padding="longest", return_tensors="pt")
        text_embeds = model.text_encoder(input_ids=tok.input_ids, attention_mask=tok.attention_mask)[0]
        text_feat = F.normalize(model.text_proj(text_embeds[:, 0, :]), dim=-1)
        sim = image_feat @ text_feat.t() / 0.07
        # same attributes = a positive too (captions of one attribute tuple are interchangeable)
        attrs = [s.attributes for s in batch_scenes]
        target = torch.tensor([[float(a == b) for b in attrs] for a in attrs])
        target = target / target.sum(1, keepdim=True)
        itc = (
            -(target * F.log_softmax(sim, 1)).sum(1).mean()
            - (target * F.log_softmax(sim.t(), 1)).sum(1).mean()
        ) / 2
        itm = _itm_loss(model, processor, pixels, batch_scenes, rng)
        loss = itc + itm
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 100 == 0 or step == STEPS - 1:
            print(
                f"step {step} itc {itc.item():.3f} itm {itm.item():.3f} {time.time() - started:.0f}s",
                flush=True,
            )

model.eval()


@torch.no_grad()
def embed(arrays: list[np.ndarray]) -> np.ndarray:
    out = []
    for i in range(0, len(arrays), 128):
        pixels = normalise(torch.from_numpy(np.stack(arrays[i : i + 128])))
        e = model.vision_model(pixel_values=pixels)[0][:, 0, :]
        out.append(F.normalize(model.vision_proj(e), dim=-1).numpy())
    return np.concatenate(out)


pairs = eval_split(600, 0)
eval_jpegs = [scene_jpeg(p.scene) for p in pairs]
originals = embed([as_stored(j) for j in eval_jpegs])
sims = originals @ originals.T
np.fill_diagonal(sims, -1)
nearest = sims.max(1)
p99 = np.quantile(nearest, 0.99)
print(f"nearest distinct: median {np.median(nearest):.4f} p99 {p99:.4f} max {nearest.max():.4f}")
crng = np.random.default_rng(1)
owns = {}
for kind in COPY_KINDS[2:]:
    picks = crng.choice(600, 40, replace=False)
    copies = embed([as_stored(planted_copy(eval_jpegs[i], kind, crng)[0]) for i in picks])
    own = (copies * originals[picks]).sum(1)
    # a copy is found when its original is its nearest and near enough
    best = (copies @ originals.T).argmax(1) == picks
    owns[kind] = (own, best)
    spread = f"min {own.min():.4f} p5 {np.quantile(own, 0.05):.4f} median {np.median(own):.4f}"
    print(f"{kind:12s} own cosine: {spread}; nearest is own {best.mean():.2f}")
for t in (0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995):
    false = int((nearest >= t).sum())
    recall = {k: float(((o >= t) & b).mean()) for k, (o, b) in owns.items()}
    allr = (80 + sum(r * 40 for r in recall.values())) / 200
    print(f"t {t}: recall {recall} all copies {allr:.3f}; false merges {false} ({100 * false / 600:.1f}%)")
