"""The shipped trained models load like Salesforce's and know the synthetic world.

Loaded through the pipeline's own `CapFiltStage`, on pixels made the way the pipeline makes them, so a
wiring mistake (normalisation, tokenizer ids, prompt, which softmax column means "match") fails here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from pipeline.core.resources import Resources
from pipeline.curate.capfilt_stage import CapFiltStage
from pipeline.spec.config import CaptionerSpec, FilterSpec
from pipeline.synthetic.pixels import stored_pixels
from pipeline.synthetic.splits import swap_one_attribute
from pipeline.synthetic.train import TrainConfig, train, vocabulary
from pipeline.synthetic.trained import export_trained_models, shipped_models
from pipeline.synthetic.world import describe, parse_caption, random_scene


@pytest.fixture(scope="module")
def stage() -> CapFiltStage:
    models = shipped_models()
    stage = CapFiltStage(
        CaptionerSpec(model=str(models.captioner), num_captions=1, max_length=30, seed=0),
        FilterSpec(model=str(models.itm)),
        Resources(),
    )
    stage.setup()
    return stage


def _scenes(n: int, seed: int = 99) -> list:
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(n)]


def test_shipped_checkpoints_are_small_and_load_by_path():
    models = shipped_models()
    for path in (models.captioner, models.itm):
        size = sum(f.stat().st_size for f in path.iterdir())
        assert size < 4 * 1024 * 1024, f"{path} is {size} bytes"
        assert (path / "training.json").is_file()


def test_filter_scores_the_true_caption_above_a_swapped_one(stage):
    rng = np.random.default_rng(5)
    scenes = _scenes(16)
    pixels = torch.from_numpy(stored_pixels(scenes))
    true = [describe(s, rng) for s in scenes]
    swapped = [describe(swap_one_attribute(s, rng), rng) for s in scenes]
    with torch.inference_mode():
        scores = stage.itm(pixels, true + swapped, list(range(16)) * 2)
    true_scores, swapped_scores = np.array(scores[:16]), np.array(scores[16:])
    assert (true_scores > swapped_scores).mean() >= 0.9, list(
        zip(true, swapped, true_scores, swapped_scores, strict=True)
    )
    assert (true_scores >= 0.5).mean() >= 0.9


def test_captioner_names_the_right_shape_and_colour(stage):
    scenes = _scenes(12, seed=7)
    torch.manual_seed(0)
    with torch.inference_mode():
        captions = stage.caption(torch.from_numpy(stored_pixels(scenes)))
    parsed = [parse_caption(c) for c in captions]
    right = [(p.shape, p.colour) == (s.shape, s.colour) for p, s in zip(parsed, scenes, strict=True)]
    assert sum(right) >= 11, list(zip(captions, scenes, strict=True))


def test_export_copies_loadable_checkpoints(tmp_path):
    paths = export_trained_models(tmp_path / "models")
    shipped = shipped_models()
    for copy, original in ((paths.captioner, shipped.captioner), (paths.itm, shipped.itm)):
        assert sorted(f.name for f in copy.iterdir()) == sorted(f.name for f in original.iterdir())
        assert (copy / "model.safetensors").read_bytes() == (original / "model.safetensors").read_bytes()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


@pytest.mark.slow
def test_training_is_reproducible_from_its_seed(tmp_path):
    config = TrainConfig(seed=3, clean_rows=64, captioner_steps=2, itm_steps=2, batch_size=8)
    first = train(tmp_path / "a", config, log=lambda _: None)
    second = train(tmp_path / "b", config, log=lambda _: None)
    other = train(tmp_path / "c", TrainConfig(**{**config.__dict__, "seed": 4}), log=lambda _: None)
    for name in ("captioner", "itm"):
        a, b, c = (_weights(getattr(p, name)) for p in (first, second, other))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a)


def test_shipped_tokenizer_is_the_training_scripts_vocabulary():
    from transformers import AutoTokenizer

    for path in (shipped_models().captioner, shipped_models().itm):
        shipped = AutoTokenizer.from_pretrained(path).get_vocab()
        assert {token: shipped[token] for token in vocabulary()} == vocabulary()
        assert set(shipped) - set(vocabulary()) == {"[DEC]", "[ENC]"}
