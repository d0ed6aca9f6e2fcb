"""A curated output, checked against BLIP's own way of scoring, recomputed from scratch.

For every downloaded row of a finished job (the noisy synthetic web and the hostile cases, curated by
the shipped trained models), the images are read back from the job's raw shards with `tarfile` and
scored by plain transformers: `BlipProcessor`, the full `BlipForImageTextRetrieval` forward, the text
through BLIP's `pre_caption` written out here and `[ENC]` in first position. Every stored score
must agree; nothing of capfilt's scoring path is reused.
"""

from __future__ import annotations

import io
import math
import re
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, BlipForImageTextRetrieval

pytestmark = pytest.mark.usefixtures("ray_local")


def blip_pre_caption(caption: str, max_words: int = 30) -> str:
    """salesforce/BLIP data/utils.py, as the authors wrote it."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


@pytest.fixture(scope="module")
def scored_rows(curated_job):
    """(image, web caption, stored web score, synthetic captions, stored synthetic scores) per row
    that reached the models."""
    layout = curated_job.layout
    images: dict[str, bytes] = {}
    for path in layout.downloads.glob("*.tar"):
        with tarfile.open(path.path) as archive:
            for member in archive:
                if member.name.endswith(".jpg"):
                    images[member.name.removesuffix(".jpg")] = archive.extractfile(member).read()
    rows = []
    for path in layout.shard_parquets():
        for r in pq.read_table(path.path).to_pylist():
            if r["status"] in ("kept", "filtered"):
                rows.append((images[r["key"]], r["web_caption"], r["web_caption_itm"], r["synthetic_captions"],
                             r["synthetic_itm"]))  # fmt: skip
    assert len(rows) > 50
    return rows


def test_every_stored_itm_score_is_blips_score_recomputed_from_the_images(curated_job, scored_rows):
    model_dir = curated_job.manifest["spec"]["filter"]["model"]
    model = BlipForImageTextRetrieval.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    enc = processor.tokenizer.convert_tokens_to_ids("[ENC]")
    stored, recomputed = [], []
    for jpeg, web, web_itm, synthetic, synthetic_itm in scored_rows:
        texts = ([web] if web and web.strip() else []) + list(synthetic)
        scores = ([web_itm] if web and web.strip() else []) + list(synthetic_itm)
        pixels = processor(
            images=Image.open(io.BytesIO(jpeg)).convert("RGB"), return_tensors="pt"
        ).pixel_values
        tokens = processor.tokenizer([blip_pre_caption(t) for t in texts], padding="max_length",
                                     truncation=True, max_length=35, return_tensors="pt")  # fmt: skip
        tokens.input_ids[:, 0] = enc
        with torch.no_grad():
            logits = model(pixel_values=pixels.expand(len(texts), -1, -1, -1), input_ids=tokens.input_ids,
                           attention_mask=tokens.attention_mask, use_itm_head=True).itm_score  # fmt: skip
        stored += scores
        recomputed += logits.softmax(dim=-1)[:, 1].tolist()
    assert not any(math.isnan(s) for s in stored)
    assert np.abs(np.array(stored) - np.array(recomputed)).max() < 2e-3


def test_captions_are_clean_strings_and_the_web_caption_is_the_input_text(curated_job, scored_rows):
    synthetic = [c for *_, captions, _ in scored_rows for c in captions]
    assert synthetic and not [c for c in synthetic if "##" in c or c != " ".join(c.split()) or not c]
    # The web text is stored as the list gave it: capitals and punctuation included, never normalised.
    webs = [web for _, web, *_ in scored_rows if web]
    assert any(web != blip_pre_caption(web) for web in webs)
