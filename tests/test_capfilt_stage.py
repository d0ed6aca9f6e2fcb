"""The CapFilt actor's model code on real tiny BLIP checkpoints, without Ray.

These pin down the wiring the filter's correctness rests on: the on-device normalisation equals
BlipImageProcessor, the reused ITM vision embedding gives the same probabilities as the plain HF
forward pass fed the BLIP way (`pre_caption`, `[ENC]` first) or, when the options say so, the
transformers way, captions are clean strings with the prompt cut, and sampling is seeded by the chunk.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, BlipForImageTextRetrieval

from pipeline.core.resources import Resources
from pipeline.curate.capfilt_stage import CapFiltStage, chunk_seed
from pipeline.curate.preprocess import PreprocessStage
from pipeline.spec.config import CaptionerSpec, FilterSpec
from pipeline.synthetic.sample_web import jpeg_bytes, render_scene


@pytest.fixture(scope="module")
def stage(tiny_models) -> CapFiltStage:
    s = CapFiltStage(
        CaptionerSpec(model=str(tiny_models.captioner), num_captions=3, max_length=12, min_length=4),
        FilterSpec(model=str(tiny_models.itm), batch_size=4),
        Resources(),
    )
    s.setup()
    return s


def _chunk(tiny_models, n: int, shard: str = "00000", index: int = 0, broken: int | None = None) -> dict:
    pre = PreprocessStage.for_model(str(tiny_models.captioner))
    scenes = [render_scene(seed) for seed in range(n)]
    jpegs = [jpeg_bytes(image) for image, _ in scenes]
    if broken is not None:
        jpegs[broken] = b"\xff\xd8 not really a jpeg"
    captions = [caption for _, caption in scenes]
    captions[-1] = "  "  # an empty web caption is not scored
    chunk = {"shard": shard, "chunk": index, "keys": [f"{i:04d}" for i in range(n)], "jpegs": jpegs,
             "captions": captions}  # fmt: skip
    return pre(chunk)


def test_device_normalisation_equals_blip_image_processor(tiny_models, stage):
    image, _ = render_scene(7, size=90)
    pre = PreprocessStage.for_model(str(tiny_models.captioner))
    pixels = torch.from_numpy(pre.decode(jpeg_bytes(image))[None].copy())
    ours, itm_input = stage.models.model_inputs(pixels)
    assert itm_input is ours  # both processors agree: normalised once, for both models
    reference = AutoProcessor.from_pretrained(tiny_models.captioner)(
        images=Image.open(io.BytesIO(jpeg_bytes(image))), return_tensors="pt"
    ).pixel_values
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, atol=1e-5)


# Web text as it comes, and what BLIP's pre_caption makes of it (written out by hand).
RAW_TEXTS = ["A RED circle!", "a blue square: on a white background.", "Photo (HDR)", "a green triangle", "a"]
BLIP_TEXTS = ["a red circle", "a blue square on a white background", "photo hdr", "a green triangle", "a"]
OWNERS = [0, 0, 1, 2, 2]


def _reference_itm(tiny_models, chunk: dict, texts: list[str], first_token: str | None) -> np.ndarray:
    """Plain transformers: BlipProcessor on the decoded images, the full BlipForImageTextRetrieval
    forward on the texts as given, with the first token replaced when `first_token` is named."""
    model = BlipForImageTextRetrieval.from_pretrained(tiny_models.itm).eval()
    processor = AutoProcessor.from_pretrained(tiny_models.itm)
    images = [Image.fromarray(chunk["pixels"][i]) for i in OWNERS]
    pixel_values = processor(images=images, return_tensors="pt").pixel_values
    tokens = processor.tokenizer(texts, padding=True, truncation=True, max_length=35, return_tensors="pt")
    if first_token is not None:
        tokens.input_ids[:, 0] = processor.tokenizer.convert_tokens_to_ids(first_token)
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, input_ids=tokens.input_ids,
                       attention_mask=tokens.attention_mask, use_itm_head=True).itm_score  # fmt: skip
    return logits.softmax(dim=-1)[:, 1].numpy()


def test_itm_scores_the_blip_way_one_vision_pass_for_many_texts(tiny_models, stage):
    chunk = _chunk(tiny_models, 3)
    ours = stage.itm(torch.from_numpy(chunk["pixels"]), RAW_TEXTS, OWNERS)
    reference = _reference_itm(tiny_models, chunk, BLIP_TEXTS, "[ENC]")
    assert np.allclose(ours, reference, atol=1e-5)
    assert all(0.0 <= s <= 1.0 for s in ours)
    # The way transformers scores would differ: the option is not a no-op.
    assert not np.allclose(ours, _reference_itm(tiny_models, chunk, RAW_TEXTS, None), atol=1e-3)


def test_itc_and_image_embeddings_equal_the_plain_contrastive_forward(tiny_models, stage):
    """ITC as BLIP trained it: the texts through pre_caption with the tokenizer's own [CLS] first (the
    ITM's [ENC] does not leak in), the encoder without cross-attention; its cosine equals
    `BlipForImageTextRetrieval(use_itm_head=False)`'s, and the stored embedding is that forward's
    image feature in float16."""
    chunk = _chunk(tiny_models, 3)
    ours = stage.score(torch.from_numpy(chunk["pixels"]), RAW_TEXTS, OWNERS)
    model = BlipForImageTextRetrieval.from_pretrained(tiny_models.itm).eval()
    processor = AutoProcessor.from_pretrained(tiny_models.itm)
    pixel_values = processor(
        images=[Image.fromarray(p) for p in chunk["pixels"]], return_tensors="pt"
    ).pixel_values
    tokens = processor.tokenizer(
        BLIP_TEXTS, padding=True, truncation=True, max_length=35, return_tensors="pt"
    )
    with torch.no_grad():
        cosine = model(**tokens, pixel_values=pixel_values, use_itm_head=False).itm_score
        image_feat = torch.nn.functional.normalize(
            model.vision_proj(model.vision_model(pixel_values=pixel_values)[0][:, 0, :]), dim=-1
        )
    assert np.allclose(ours.itc, cosine[OWNERS, range(len(OWNERS))].numpy(), atol=1e-5)
    assert ours.image_embeddings.dtype == np.float16
    assert ours.image_embeddings.shape == (3, model.config.image_text_hidden_size)
    assert np.allclose(ours.image_embeddings, image_feat.numpy(), atol=1e-3)
    assert np.allclose(np.linalg.norm(ours.image_embeddings.astype(np.float32), axis=1), 1, atol=1e-2)
    assert ours.itm == pytest.approx(stage.itm(torch.from_numpy(chunk["pixels"]), RAW_TEXTS, OWNERS))
    # The [ENC] way would differ: ITC reads the [CLS], not the ITM's first token.
    enc = processor.tokenizer.convert_tokens_to_ids("[ENC]")
    tokens.input_ids[:, 0] = enc
    with torch.no_grad():
        with_enc = model(**tokens, pixel_values=pixel_values, use_itm_head=False).itm_score
    assert not np.allclose(ours.itc, with_enc[OWNERS, range(len(OWNERS))].numpy(), atol=1e-3)


def test_itm_scores_the_transformers_way_when_the_options_say_so(tiny_models):
    cls_way = CapFiltStage(
        CaptionerSpec(model=str(tiny_models.captioner)),
        FilterSpec(model=str(tiny_models.itm), batch_size=2, itm_first_token="cls", text_normalise="none"),
        Resources(),
    )
    cls_way.setup()
    chunk = _chunk(tiny_models, 3)
    ours = cls_way.itm(torch.from_numpy(chunk["pixels"]), RAW_TEXTS, OWNERS)
    assert np.allclose(ours, _reference_itm(tiny_models, chunk, RAW_TEXTS, None), atol=1e-5)


def test_captions_are_clean_strings_without_word_pieces(tiny_models, stage):
    # The random tiny captioner emits `##` pieces freely, the first generated token included.
    chunk = _chunk(tiny_models, 8)
    torch.manual_seed(0)  # with this seed, cutting the prompt by token count gave two `##` captions
    captions = stage.caption(torch.from_numpy(chunk["pixels"]))
    assert len(captions) == 8 * 3
    assert not [c for c in captions if "##" in c or c != " ".join(c.split())]


def test_chunk_is_captioned_and_scored(tiny_models, stage):
    out = stage(_chunk(tiny_models, 4, broken=1))
    assert list(out["keys"]) == ["0000", "0001", "0002", "0003"]
    assert out["decode_errors"][1].startswith("decode:")
    for i in (0, 2, 3):
        assert out["decode_errors"][i] == ""
        assert len(out["synthetic_captions"][i]) == 3
        assert all(text and not text.startswith("a picture of") for text in out["synthetic_captions"][i])
        assert all(0.0 <= s <= 1.0 for s in out["synthetic_itm"][i])
    assert all(math.isnan(s) for s in out["synthetic_itm"][1])  # not scored: the image did not decode
    assert 0.0 <= out["web_itm"][0] <= 1.0
    assert math.isnan(out["web_itm"][3])  # its web caption is blank
    assert -1.0 <= out["web_itc"][0] <= 1.0 and math.isnan(out["web_itc"][3])
    assert all(-1.0 <= s <= 1.0 for s in out["synthetic_itc"][0])
    assert all(math.isnan(s) for s in out["synthetic_itc"][1])
    # every decoded image has its embedding (even with a blank caption), the broken one none
    assert [len(e) for e in out["image_embedding"]] == [
        2 * stage.models.itm_encoder.embedding_size,
        0,
        *[2 * stage.models.itm_encoder.embedding_size] * 2,
    ]


def test_sampling_depends_on_the_chunk_not_on_the_call(tiny_models, stage):
    first = stage(_chunk(tiny_models, 3, index=5))
    stage(_chunk(tiny_models, 3, index=6))  # other work in between must not change the next result
    again = stage(_chunk(tiny_models, 3, index=5))
    other = stage(_chunk(tiny_models, 3, index=6))
    assert first["synthetic_captions"] == again["synthetic_captions"]
    assert first["synthetic_itm"] == again["synthetic_itm"]
    assert first["synthetic_captions"] != other["synthetic_captions"]
    assert chunk_seed(0, "00000", 5) != chunk_seed(0, "00001", 5) != chunk_seed(1, "00000", 5)


def test_a_chunk_of_only_broken_images_needs_no_model(tiny_models, stage):
    chunk = _chunk(tiny_models, 1, broken=0)
    out = stage(chunk)
    assert out["decode_errors"][0] and out["synthetic_captions"] == [["", "", ""]]
