"""A tiny image-text world where the truth is known: scenes, their pictures, their captions, and a parser.

A scene is 1-3 identical shapes (shape, colour, size) grouped on the left, in the middle or on the right
of a plain background. Six attributes, 3·6·2·3·3·3 = 972 combinations, so a caption carries real
information and a model has to see shape, colour, size, count and position to get it right. Captions come
from a few templates with synonyms, so models learn the content rather than one string. `parse_caption`
reads any caption back into attributes; it is how the benchmark judges captions, web and synthetic alike.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (40, 165, 60), "blue": (40, 70, 225),
    "yellow": (240, 205, 30), "purple": (135, 45, 175), "orange": (245, 125, 25),
}  # fmt: skip
SIZES = ("small", "large")
COUNTS = (1, 2, 3)
POSITIONS = ("left", "middle", "right")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (250, 250, 250), "gray": (128, 128, 128),
                                                "black": (10, 10, 10)}  # fmt: skip
ATTRIBUTES = ("shape", "colour", "size", "count", "position", "background")

_COUNT_WORDS = {1: ("a", "one", "a single"), 2: ("two",), 3: ("three",)}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_POSITION_PHRASES = {
    "left": ("on the left", "at the left side", "to the left"),
    "middle": ("in the middle", "in the center", "at the center"),
    "right": ("on the right", "at the right side", "to the right"),
}
_BACKGROUND_PHRASES = ("on a {} background", "against a {} background", "with a {} background")
_TEMPLATES = (
    "{count} {size} {colour} {shape} {position} {background}",
    "{count} {size} {colour} {shape} {background}, {position}",
    "there {be} {count} {size} {colour} {shape} {position} {background}",
    "{position}, {count} {size} {colour} {shape} {background}",
)
_X_CENTRE = {"left": 0.2, "middle": 0.5, "right": 0.8}
_RADIUS = {"small": 0.075, "large": 0.11}  # fractions of the image side
_SUPERSAMPLE = 4  # draw big, then downsample: smooth edges, like a photo of a shape rather than pixel art


@dataclass(frozen=True)
class Scene:
    """What a picture shows. `layout_seed` places the shapes; it does not change what a caption says."""

    shape: str
    colour: str
    size: str
    count: int
    position: str
    background: str
    layout_seed: int = 0

    @property
    def attributes(self) -> tuple[Any, ...]:
        return tuple(getattr(self, a) for a in ATTRIBUTES)

    def with_attribute(self, name: str, value: Any) -> Scene:
        return replace(self, **{name: value})


ALL_VALUES: dict[str, tuple[Any, ...]] = {
    "shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES, "count": COUNTS,
    "position": POSITIONS, "background": tuple(BACKGROUNDS),
}  # fmt: skip
ALL_COMBINATIONS = tuple(itertools.product(*(ALL_VALUES[a] for a in ATTRIBUTES)))


def random_scene(rng: np.random.Generator) -> Scene:
    values = {a: ALL_VALUES[a][int(rng.integers(len(ALL_VALUES[a])))] for a in ATTRIBUTES}
    return Scene(**values, layout_seed=int(rng.integers(2**31)))


def distinct_scenes(n: int, rng: np.random.Generator) -> list[Scene]:
    """n scenes with pairwise different attributes (for retrieval, where a caption must name one image)."""
    if n > len(ALL_COMBINATIONS):
        raise ValueError(f"only {len(ALL_COMBINATIONS)} distinct scenes exist, asked for {n}")
    picks = rng.choice(len(ALL_COMBINATIONS), size=n, replace=False)
    return [
        Scene(*ALL_COMBINATIONS[int(i)], layout_seed=int(rng.integers(2**31)))  # type: ignore[arg-type]
        for i in picks
    ]


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene's picture, deterministic from the scene (layout_seed included)."""
    rng = np.random.default_rng(scene.layout_seed)
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    r = _RADIUS[scene.size] * big
    x0 = (_X_CENTRE[scene.position] + rng.uniform(-0.04, 0.04)) * big
    # Stack the shapes vertically in equal slots, jittered inside their slot so none overlaps another.
    top, bottom = 0.04 * big + r, 0.96 * big - r
    slot = (bottom - top) / scene.count
    for i in range(scene.count):
        centre_y = top + slot * (i + 0.5) + rng.uniform(-0.3, 0.3) * max(slot - 2 * r, 0) / 2
        centre_x = x0 + rng.uniform(-0.02, 0.02) * big
        _draw_shape(draw, scene.shape, centre_x, centre_y, r, COLOURS[scene.colour])
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        draw.rectangle(
            (x - r, y - r, x + r, y + r), fill=fill
        )  # the circle's bounding box: corners tell them apart
    else:
        draw.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill=fill)


def describe(scene: Scene, rng: np.random.Generator) -> str:
    """A true caption of the scene, in one of several phrasings."""

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    plural = scene.count > 1
    text = pick(_TEMPLATES).format(
        count=pick(_COUNT_WORDS[scene.count]),
        size=pick(_SIZE_WORDS[scene.size]),
        colour=scene.colour,
        shape=scene.shape + ("s" if plural else ""),
        position=pick(_POSITION_PHRASES[scene.position]),
        background=pick(_BACKGROUND_PHRASES).format(scene.background),
        be="are" if plural else "is",
    )
    return text


@dataclass(frozen=True)
class ParsedCaption:
    """The attributes a caption states; None where it states none or contradicts itself."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    count: int | None = None
    position: str | None = None
    background: str | None = None

    def matches(self, scene: Scene) -> bool:
        """True when the caption states every attribute of the scene, and each one correctly."""
        return not self.wrong(scene)

    def wrong(self, scene: Scene) -> list[str]:
        """The attributes that are missing or wrong."""
        return [a for a in ATTRIBUTES if getattr(self, a) != getattr(scene, a)]


_WORD = re.compile(r"[a-z]+")
_SHAPE_NOUNS = {**{s: (s, False) for s in SHAPES}, **{s + "s": (s, True) for s in SHAPES}}
_COUNT_OF = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3}
_SIZE_OF = {w: size for size, words in _SIZE_WORDS.items() for w in words}
_POSITION_OF = {"left": "left", "right": "right", "middle": "middle", "center": "middle", "centre": "middle"}
_BACKGROUND_OF = {**{b: b for b in BACKGROUNDS}, "grey": "gray"}


def parse_caption(text: str | None) -> ParsedCaption:
    """Read a caption back into attributes. Words that contradict each other (two sizes, a count that
    disagrees with the noun's number) give None, so a confused caption never counts as correct."""
    words = _WORD.findall((text or "").lower())
    nouns = [(i, *_SHAPE_NOUNS[w]) for i, w in enumerate(words) if w in _SHAPE_NOUNS]
    backgrounds = {_BACKGROUND_OF.get(words[i - 1]) for i, w in enumerate(words) if w == "background" and i}
    if not nouns:
        return ParsedCaption(background=_one(backgrounds))
    shape_at, _, plural = nouns[0]
    shapes = {s for _, s, _ in nouns}
    before = words[:shape_at]
    counts = [_COUNT_OF[w] for w in before if w in _COUNT_OF]
    count = counts[-1] if counts else None
    if count is not None and (count > 1) != plural:
        count = None
    object_colours = {w for w in before if w in COLOURS}
    # A colour stated after the noun belongs to the background ("... on a red background").
    sizes = {_SIZE_OF[w] for w in words if w in _SIZE_OF}
    positions = {_POSITION_OF[w] for w in words if w in _POSITION_OF}
    return ParsedCaption(
        shape=_one(shapes),
        colour=_one(object_colours),
        size=_one(sizes),
        count=count,
        position=_one(positions),
        background=_one(backgrounds),
    )


def _one(values: set[Any]) -> Any:
    values = values - {None}
    return next(iter(values)) if len(values) == 1 else None
