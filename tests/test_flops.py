"""FLOP counting for the engine bench: the method's minimum is computed from the configs in the same
convention FlopCounterMode counts, and the actor's counted work is close to it (the bench's figure
is at real sizes; here the random tiny architecture)."""

from __future__ import annotations

import pytest
import torch

from pipeline.perf.engine_bench import actor_flops
from pipeline.perf.flops import Sizes, counted_flops
from pipeline.perf.model_cost import ARCHITECTURES, capfilt_stage, pixel_batches, write_architecture


@pytest.fixture(scope="module")
def tiny_architecture(tmp_path_factory):
    return write_architecture("tiny", tmp_path_factory.mktemp("architectures") / "tiny")


def test_vision_minimum_is_what_flop_counter_counts(tiny_architecture):
    stage = capfilt_stage(tiny_architecture, 6, "cpu")
    model = stage.models.captioner
    size = model.config.vision_config.image_size
    pixels = torch.randn(3, 3, size, size)
    with torch.inference_mode():
        counted = counted_flops(lambda: model.vision_model(pixel_values=pixels))
    assert counted == 3 * Sizes.of(model.config).vision() > 0  # CPU attention counted too


def test_cpu_attention_is_counted():
    q, k = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 20, 8)
    flops = counted_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k))
    assert flops == 2 * 2 * 4 * 10 * 20 * 8 * 2


def test_actor_does_little_beyond_the_minimum_and_generate_does_more(tiny_architecture):
    [pixels] = pixel_batches(1, 3, ARCHITECTURES["tiny"].image_size)
    own = actor_flops(capfilt_stage(tiny_architecture, 8, "cpu", captions=5), pixels, 8)
    generate = actor_flops(
        capfilt_stage(tiny_architecture, 8, "cpu", captions=5, decoder="generate"), pixels, 8
    )
    assert 1.0 <= own["actual"] / own["minimum"] <= 1.1
    assert own["minimum"] == generate["minimum"]
    # generate projects each image's tokens for each of its 5 captions, and runs the prompt 5 times
    assert generate["actual"] > own["actual"] * 1.05


def test_itc_minimum_is_what_flop_counter_counts(tiny_architecture):
    stage = capfilt_stage(tiny_architecture, 6, "cpu")
    encoder, config = stage.models.itm_encoder, stage.models.itm_model.config
    sizes = Sizes.of(config)
    ids = torch.tensor([stage.models.itm_tokenizer("a red circle on white").input_ids])
    with torch.inference_mode():
        text = counted_flops(lambda: encoder.text_features(ids, torch.ones_like(ids)))
        embeds = torch.randn(2, sizes.image_tokens, sizes.vision_hidden)
        image = counted_flops(lambda: encoder.image_features(embeds))
    tokens = ids.shape[1]
    assert text == tokens * sizes.unimodal_text_token(tokens) + 2 * sizes.text_hidden * sizes.embedding
    assert image == 2 * 2 * sizes.vision_hidden * sizes.embedding
