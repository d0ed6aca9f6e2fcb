"""The synthetic world's splits: `clean` (to train on), `web` (noisy, to curate), `eval` (held out).

The web split is what CapFilt exists for: a known share of its captions is corrupted, and every row is
tagged with how, so the benchmark can say what the filter removed per kind. What each kind should get:

- `correct`: a true caption in one of the usual phrasings. Keep.
- `other_image`: the true caption of a different scene (at least two attributes differ). Remove.
- `swapped_attribute`: a true caption with one attribute changed, the hard negative. Remove.
- `junk`: alt-text that says nothing about the picture (file names, "click here", keyword lists). Remove.
- `empty`: empty or whitespace. Remove (nothing to score; the writer never keeps it).
- `rambling`: long SEO text that names the right colour and shape among filler. Remove: it states two of
  the six attributes and buries them in words that describe nothing, so as pretraining text it teaches
  mostly noise, while the captioner supplies a caption that states all six. `parse_caption` agrees: it is
  not a full, correct description.

Each split draws from its own random stream (seed, split), so splits do not overlap by construction of
their streams and any one of them is reproducible alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.synthetic.world import (
    ALL_VALUES,
    ATTRIBUTES,
    Scene,
    describe,
    distinct_scenes,
    random_scene,
)

CORRECT = "correct"
OTHER_IMAGE = "other_image"
SWAPPED = "swapped_attribute"
JUNK = "junk"
EMPTY = "empty"
RAMBLING = "rambling"
CORRUPTIONS = (OTHER_IMAGE, SWAPPED, JUNK, EMPTY, RAMBLING)
KINDS = (CORRECT, *CORRUPTIONS)

# 40 % of web captions corrupted: LAION-like alt-text is at least this noisy.
DEFAULT_MIX: dict[str, float] = {CORRECT: 0.6, OTHER_IMAGE: 0.1, SWAPPED: 0.1, JUNK: 0.08, EMPTY: 0.04,
                                 RAMBLING: 0.08}  # fmt: skip
_SPLIT_STREAM = {"clean": 1, "web": 2, "eval": 3}


@dataclass(frozen=True)
class Pair:
    """A picture (as its scene) and a caption; `kind` says how the caption relates to the picture."""

    scene: Scene
    caption: str
    kind: str = CORRECT


def clean_split(n: int, seed: int = 0) -> list[Pair]:
    """n correctly captioned scenes: the human-annotated set the captioner and the filter learn from."""
    rng = _rng(seed, "clean")
    return [Pair(scene, describe(scene, rng)) for scene in (random_scene(rng) for _ in range(n))]


def eval_split(n: int, seed: int = 0) -> list[Pair]:
    """n correctly captioned scenes with pairwise different attributes, so each caption names one image."""
    rng = _rng(seed, "eval")
    return [Pair(scene, describe(scene, rng)) for scene in distinct_scenes(n, rng)]


def web_split(n: int, seed: int = 0, mix: dict[str, float] | None = None) -> list[Pair]:
    """n scenes with web captions: kinds in exactly the proportions of `mix` (rounded), shuffled."""
    mix = mix or DEFAULT_MIX
    unknown = set(mix) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown caption kinds {sorted(unknown)}; known: {list(KINDS)}")
    rng = _rng(seed, "web")
    kinds = _exact_kinds(n, mix)
    rng.shuffle(kinds)
    pairs = []
    for kind in kinds:
        scene = random_scene(rng)
        pairs.append(Pair(scene, corrupt(scene, kind, rng), kind))
    return pairs


def corrupt(scene: Scene, kind: str, rng: np.random.Generator) -> str:
    """A caption of `kind` for the scene (CORRECT gives a true one)."""
    if kind == CORRECT:
        return describe(scene, rng)
    if kind == OTHER_IMAGE:
        other = random_scene(rng)
        while sum(a != b for a, b in zip(other.attributes, scene.attributes, strict=True)) < 2:
            other = random_scene(rng)
        return describe(other, rng)
    if kind == SWAPPED:
        return describe(swap_one_attribute(scene, rng), rng)
    if kind == JUNK:
        return _junk(rng)
    if kind == EMPTY:
        return str(rng.choice(["", " ", "   ", "\n", "\t "]))
    if kind == RAMBLING:
        return _rambling(scene, rng)
    raise ValueError(f"unknown caption kind {kind!r}; known: {list(KINDS)}")


def swap_one_attribute(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same scene with exactly one attribute changed to another value."""
    return with_other_value(scene, ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))], rng)


def with_other_value(scene: Scene, name: str, rng: np.random.Generator) -> Scene:
    """The same scene with attribute `name` changed to another of its values, drawn at random."""
    others = [v for v in ALL_VALUES[name] if v != getattr(scene, name)]
    return scene.with_attribute(name, others[int(rng.integers(len(others)))])


SEO_WORDS = ("cheap", "deals", "free", "shipping", "buy", "now", "sale", "discount", "online", "shop",
              "hd", "wallpaper", "download", "best", "price", "official", "store", "new", "trending",
              "premium", "quality", "gift", "ideas", "review", "coupon")  # fmt: skip


def _junk(rng: np.random.Generator) -> str:
    n = int(rng.integers(1, 10_000))
    options = [
        f"IMG_{n:04d}.jpg", f"DSC{n:05d}.JPG", f"photo-{n}.png", "click here", "click here to enlarge",
        f"image {int(rng.integers(1, 12))} of 12", "untitled", "thumbnail", "no description available",
        ", ".join(rng.choice(SEO_WORDS, size=int(rng.integers(4, 9)), replace=False)),
    ]  # fmt: skip
    return str(options[int(rng.integers(len(options)))])


def _rambling(scene: Scene, rng: np.random.Generator) -> str:
    thing = f"{scene.colour} {scene.shape}"
    filler = " ".join(rng.choice(SEO_WORDS, size=8, replace=True))
    return (
        f"check out our amazing collection of {thing} designs, the best {thing} wallpaper for desktop "
        f"and phone, {filler}, updated every day so come back soon for more {thing} pictures"
    )


def _exact_kinds(n: int, mix: dict[str, float]) -> list[str]:
    """Kinds for n rows in the mix's proportions; rounding error goes to the largest kind."""
    total = sum(mix.values())
    counts = {kind: round(n * share / total) for kind, share in mix.items()}
    largest = max(mix, key=mix.__getitem__)
    counts[largest] += n - sum(counts.values())
    return [kind for kind, count in counts.items() for _ in range(count)]


def _rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_STREAM[split]])
