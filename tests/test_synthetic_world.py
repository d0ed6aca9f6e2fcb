"""The synthetic world tells the truth: deterministic splits, true captions, correctly tagged corruptions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline.synthetic.pixels import scene_jpeg
from pipeline.synthetic.splits import (
    CORRECT,
    DEFAULT_MIX,
    EMPTY,
    JUNK,
    KINDS,
    OTHER_IMAGE,
    RAMBLING,
    SWAPPED,
    clean_split,
    eval_split,
    web_split,
)
from pipeline.synthetic.world import (
    ALL_COMBINATIONS,
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    Scene,
    describe,
    parse_caption,
    random_scene,
    render,
)


def test_splits_are_deterministic_per_seed():
    assert web_split(60, seed=3) == web_split(60, seed=3)
    assert clean_split(30, seed=3) == clean_split(30, seed=3)
    assert eval_split(30, seed=3) == eval_split(30, seed=3)
    assert web_split(60, seed=3) != web_split(60, seed=4)
    first = web_split(5, seed=3)
    assert [scene_jpeg(p.scene) for p in first] == [scene_jpeg(p.scene) for p in web_split(5, seed=3)]


def test_splits_draw_from_different_streams():
    scenes = {p.scene for p in clean_split(200, seed=0)}
    assert not scenes & {p.scene for p in web_split(200, seed=0)}
    assert not scenes & {p.scene for p in eval_split(200, seed=0)}


def test_every_phrasing_parses_back_to_its_scene():
    rng = np.random.default_rng(0)
    phrasings = set()
    for _ in range(3000):
        scene = random_scene(rng)
        caption = describe(scene, rng)
        assert parse_caption(caption).matches(scene), caption
        phrasings.add(caption.split()[0])
    assert len(phrasings) > 5  # the templates really vary


def test_web_split_has_the_mix_exactly():
    pairs = web_split(1000, seed=1)
    counts = Counter(p.kind for p in pairs)
    assert counts == {kind: round(1000 * share) for kind, share in DEFAULT_MIX.items()}
    assert set(counts) == set(KINDS)


def test_corruption_tags_are_right():
    pairs = web_split(1000, seed=2)
    for pair in pairs:
        parsed = parse_caption(pair.caption)
        wrong = parsed.wrong(pair.scene)
        if pair.kind == CORRECT:
            assert not wrong, pair
        elif pair.kind == SWAPPED:
            assert len(wrong) == 1, pair  # the hard negative: exactly one attribute off
            assert getattr(parsed, wrong[0]) is not None
        elif pair.kind == OTHER_IMAGE:
            assert len(wrong) >= 2 and all(getattr(parsed, a) is not None for a in ATTRIBUTES), pair
        elif pair.kind == JUNK:
            assert parsed.shape is None and pair.caption.strip(), pair
        elif pair.kind == EMPTY:
            assert not pair.caption.strip(), pair
        elif pair.kind == RAMBLING:
            assert (parsed.shape, parsed.colour) == (pair.scene.shape, pair.scene.colour), pair
            assert not parsed.matches(pair.scene) and len(pair.caption.split()) > 30, pair
        else:
            pytest.fail(f"unknown kind {pair.kind}")


def test_eval_split_names_each_image_uniquely():
    pairs = eval_split(300, seed=0)
    assert len({p.scene.attributes for p in pairs}) == 300
    with pytest.raises(ValueError, match="972 distinct scenes"):
        eval_split(len(ALL_COMBINATIONS) + 1)


@pytest.mark.parametrize(
    ("caption", "field", "expected"),
    [
        ("two small red circle on the left on a gray background", "count", None),  # count vs noun
        ("a small big red circle on the left on a gray background", "size", None),
        ("a small red circle on the left on the right on a gray background", "position", None),
        ("a small red circle on the left on a grey background", "background", "gray"),
        ("a small red circle on a blue background", "background", None),  # not a background colour
        ("a small circle on the left on a gray background", "colour", None),
        ("there are three tiny green triangles in the center", "position", "middle"),
        ("", "shape", None),
        (None, "shape", None),
    ],
)
def test_parser_refuses_contradictions_and_reads_synonyms(caption, field, expected):
    assert getattr(parse_caption(caption), field) == expected


@pytest.mark.parametrize("position", ["left", "middle", "right"])
def test_pictures_show_what_the_scene_says(position):
    """Colour, background, side and count are in the pixels, not just in the caption."""
    for layout in range(5):
        scene = Scene("square", "blue", "large", 3, position, "white", layout_seed=layout)
        pixels = np.asarray(render(scene, 64)).astype(int)
        assert tuple(pixels[0, 0]) == BACKGROUNDS["white"]
        shape_mask = np.abs(pixels - np.array(COLOURS["blue"])).sum(axis=2) < 60
        columns = np.nonzero(shape_mask.any(axis=0))[0]
        third = {"left": 0, "middle": 1, "right": 2}[position]
        assert third * 64 / 3 <= columns.mean() < (third + 1) * 64 / 3
        rows = shape_mask.any(axis=1).astype(int)
        assert np.count_nonzero(np.diff(rows) == 1) + rows[0] == 3  # three separate shapes, stacked
