"""Model cost (perf item 5): the plain HF loop and the CapFilt actor do the same work, and the base/large
architectures have Salesforce's sizes. Tiny shapes only; the base/large configs are never instantiated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.curate.tiny_models import IMAGE_SIZE, TinyModelPaths
from pipeline.perf.model_cost import (
    MARKER,
    SAMPLING,
    PlainLoop,
    architecture_config,
    architecture_processor,
    capfilt_stage,
    chunk,
    compare,
    pixel_batches,
    write_architecture,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModelPaths:
    return write_architecture("tiny", tmp_path_factory.mktemp("cost") / "tiny")


def _recording(decode: Any, shapes: list[tuple[int, ...]]) -> Any:
    """Wrap a decode loop (`generate`, the stage's own decoder) so the test sees the ids it returns
    (the stage keeps only text)."""

    def recorded(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = decode(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    return recorded


def _eager_to_stop(captioner: Any) -> None:
    """Make [SEP] (BLIP's end of caption) by far the likeliest token, so only forcing keeps it going."""
    with torch.no_grad():
        captioner.text_decoder.cls.predictions.decoder.bias[captioner.config.text_config.sep_token_id] = 50.0


@pytest.mark.parametrize("new_tokens", [1, 9, 25])
def test_both_loops_generate_exactly_new_tokens(tiny: TinyModelPaths, new_tokens: int) -> None:
    pixels = pixel_batches(1, 3, IMAGE_SIZE)[0]
    plain, stage = PlainLoop(tiny, new_tokens, "cpu"), capfilt_stage(tiny, new_tokens, "cpu")
    plain_shapes: list[tuple[int, ...]] = []
    stage_shapes: list[tuple[int, ...]] = []
    for captioner in (plain.captioner, stage.models.captioner):
        _eager_to_stop(captioner)
    plain.captioner.generate = _recording(plain.captioner.generate, plain_shapes)
    stage.models.decoder = _recording(stage.models.decoder, stage_shapes)
    scores = plain(pixels)
    out = stage(chunk(pixels))
    # "a picture of " is [CLS] a picture of [SEP]; generate returns [DEC] a picture of + the new tokens
    prefix = len(plain.processor.tokenizer(SAMPLING.prompt).input_ids) - 1
    assert prefix == 4
    assert plain_shapes == stage_shapes == [(3, prefix + new_tokens)]
    assert all(c[0] for c in out["synthetic_captions"])
    assert len(scores) == 2 and all(len(s) == 3 and all(0 <= p <= 1 for p in s) for s in scores)


def test_plain_loop_is_fp32_like_a_default_user(tiny: TinyModelPaths) -> None:
    plain = PlainLoop(tiny, 3, "cpu")
    assert plain.captioner.dtype == plain.itm.dtype == torch.float32


def test_compare_reports_both_rates_and_their_ratio(tmp_path: Path) -> None:
    result = compare("tiny", images=4, batch=2, new_tokens=3, device="cpu", cache_dir=tmp_path)
    assert result["architecture"] == "tiny" and result["device"] == "cpu"
    assert (result["images"], result["batch"], result["new_tokens"]) == (4, 2, 3)
    assert result["plain_images_per_s"] > 0 and result["capfilt_images_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["capfilt_images_per_s"] / result["plain_images_per_s"])
    assert result["threads"] == torch.get_num_threads()
    with pytest.raises(ValueError, match="multiple of batch"):
        compare("tiny", images=5, batch=2, new_tokens=3, device="cpu", cache_dir=tmp_path)


def test_write_architecture_skips_what_is_already_written(tmp_path: Path) -> None:
    paths = write_architecture("tiny", tmp_path / "tiny")
    weights = paths.itm / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert write_architecture("tiny", tmp_path / "tiny") == paths
    assert weights.stat().st_mtime_ns == written
    write_architecture("tiny", tmp_path / "tiny", seed=1)  # another checkpoint: rebuilt
    assert weights.stat().st_mtime_ns != written
    (tmp_path / "tiny" / MARKER).unlink()  # an interrupted write: rebuilt
    write_architecture("tiny", tmp_path / "tiny", seed=1)
    assert (tmp_path / "tiny" / MARKER).is_file()


def _sizes(tower: Any) -> tuple[int, int, int, int]:
    return tower.hidden_size, tower.num_hidden_layers, tower.num_attention_heads, tower.intermediate_size


@pytest.mark.parametrize(("name", "vit"), [("base", (768, 12, 12, 3072)), ("large", (1024, 24, 16, 4096))])
def test_real_architectures_have_salesforce_sizes(name: str, vit: tuple[int, int, int, int]) -> None:
    processor = architecture_processor(name)
    config = architecture_config(name, processor)
    vision, text = config.vision_config, config.text_config
    assert _sizes(vision) == vit  # ViT-B/16 or ViT-L/16 ...
    assert (vision.image_size, vision.patch_size) == (384, 16)  # ... at 384
    assert _sizes(text) == (768, 12, 12, 3072)  # BERT-base
    assert text.encoder_hidden_size == vit[0]  # the decoder cross-attends to the vision tower
    assert text.vocab_size == len(processor.tokenizer) == 30524
    assert text.bos_token_id == processor.tokenizer.convert_tokens_to_ids("[DEC]") == 30522
    assert text.sep_token_id == text.eos_token_id == processor.tokenizer.sep_token_id
    assert processor.image_processor.size == {"height": 384, "width": 384}
