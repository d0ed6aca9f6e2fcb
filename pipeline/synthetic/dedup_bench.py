"""`capfilt bench dedup`: does image dedup find planted copies, and only them, on the synthetic world?

It serves scenes whose attributes differ pairwise (`eval_split`: no two are the same picture, which two
random scenes with the same attributes and nearly the same layout can be) and, after them in the list,
planted copies of some of them, five kinds: byte copies, lossless re-encodings (PNG of the decoded
pixels), recompressed JPEGs, resized and slightly cropped copies. The real pipeline runs over it
(img2dataset over HTTP on 127.0.0.1, the shipped trained BLIP models) with threshold 0, so that every
scored image is kept and dedup alone decides. From the Parquet shards it measures, at the job's
`filter.dedup` and over a sweep of near thresholds (replayed with the job's own `DuplicateIndex` on the
stored pixel hashes and embeddings, shard by shard in input order, as the job decides):

- recall: the share of planted copies that end `duplicate_image` pointing at their own original;
- false merges: the images marked as a copy of another picture, as a share of the distinct images.
"""

from __future__ import annotations

import io
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.core.storage import read_parquet
from pipeline.curate.dedup import DuplicateIndex, KeptImage
from pipeline.output.shard_writer import kept_images_of
from pipeline.spec.config import DedupSpec
from pipeline.spec.fates import Fate
from pipeline.synthetic.pixels import IMAGE_SIZE, scene_jpeg
from pipeline.synthetic.sample_web import Route, SamplePair
from pipeline.synthetic.splits import eval_split
from pipeline.synthetic.trained import shipped_models
from pipeline.synthetic.web_job import run_web_job, web_index

COPY_KINDS = ("byte_copy", "lossless", "recompressed", "resized", "cropped")
ALTERED_KINDS = COPY_KINDS[2:]  # other pixels: only the embedding can find them
NEAR_THRESHOLDS = (None, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999)  # None: exact only
TARGET_RECALL, TARGET_FALSE_MERGE_RATE = 0.95, 0.01  # issue 22's
_COPY_PATH = re.compile(r"/copy/(\d{5})-([a-z_]+)-\d+\.(?:jpg|png)$")
Log = Callable[[str], None]


def planted_copy(jpeg: bytes, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """A copy of a served JPEG, made as the web makes them; its bytes and content type."""
    if kind == "byte_copy":
        return jpeg, "image/jpeg"
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    if kind == "lossless":
        return _encoded(image, "PNG"), "image/png"
    if kind == "recompressed":
        return _encoded(image, "JPEG", quality=int(rng.integers(25, 60))), "image/jpeg"
    if kind == "resized":
        side = int(rng.integers(IMAGE_SIZE // 2, IMAGE_SIZE * 3 // 4))
        return _encoded(
            image.resize((side, side), Image.Resampling.LANCZOS), "JPEG", quality=90
        ), "image/jpeg"
    if kind == "cropped":  # 2-4 pixels of 64 off each side: 6-12 % of the width
        m = [int(v) for v in rng.integers(2, 5, size=4)]
        box = (m[0], m[1], IMAGE_SIZE - m[2], IMAGE_SIZE - m[3])
        return _encoded(image.crop(box), "JPEG", quality=90), "image/jpeg"
    raise ValueError(f"unknown copy kind {kind!r}; known: {COPY_KINDS}")


def _encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def run_dedup_bench(
    distinct: int = 600,
    copies_per_kind: int = 40,
    near_threshold: float | None = None,
    seed: int = 0,
    out: Path | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Run the benchmark and return its figures (`format_dedup_report` prints them). `near_threshold`
    overrides the job's `filter.dedup.near_threshold` (None: the job file's)."""
    rng = np.random.default_rng(seed)
    pairs = eval_split(distinct, seed)
    originals = rng.choice(distinct, size=len(COPY_KINDS) * copies_per_kind, replace=False)
    extra = []
    for n, original in enumerate(originals):
        kind = COPY_KINDS[n % len(COPY_KINDS)]
        body, content_type = planted_copy(scene_jpeg(pairs[original].scene), kind, rng)
        suffix = "png" if content_type == "image/png" else "jpg"
        path = f"/copy/{original:05d}-{kind}-{n}.{suffix}"
        route = Route(200, body, (("Content-Type", content_type),))
        extra.append(SamplePair(path, route, pairs[original].caption, "ok"))
    overrides = ["filter.threshold=0"]
    if near_threshold is not None:
        overrides.append(f"filter.dedup.near_threshold={near_threshold}")
    with tempfile.TemporaryDirectory(prefix="capfilt-dedup-") as tmp:
        result = run_web_job(
            out or Path(tmp), pairs, shipped_models(), extra=extra, overrides=overrides, log=log
        )
        shards = [read_parquet(p).to_pylist() for p in result.layout.shard_parquets()]
    dedup = result.manifest["spec"]["filter"]["dedup"]
    rows = [r for shard in shards for r in shard]
    report: dict[str, Any] = {
        "seed": seed,
        "distinct_images": distinct,
        "copies": {kind: copies_per_kind for kind in COPY_KINDS},
        "job_dedup": dedup,
        "unscored": sum(r["status"] not in (Fate.KEPT, Fate.DUPLICATE_IMAGE) for r in rows),
        "job": _figures(rows, {r["key"]: r["duplicate_of"] for r in rows if r["duplicate_of"]}, distinct),
        "sweep": {},
    }
    for threshold in NEAR_THRESHOLDS:
        index = DuplicateIndex(DedupSpec(exact=True, near_threshold=threshold), _embedding_size(rows))
        decided: dict[str, str] = {}
        for shard in shards:  # as the job decides: shard by shard, in input order
            decided |= index.decide(_scored_in_order(shard))
        report["sweep"][str(threshold)] = _figures(rows, decided, distinct)
    return report


def _scored_in_order(shard: list[dict[str, Any]]) -> list[KeptImage]:
    """The rows the keep rule kept (at threshold 0, every scored row), as the job's dedup saw them."""
    scored = [{**r, "status": Fate.KEPT} for r in shard if r["status"] in (Fate.KEPT, Fate.DUPLICATE_IMAGE)]
    return kept_images_of(sorted(scored, key=lambda r: r["key"]))


def _embedding_size(rows: list[dict[str, Any]]) -> int:
    return next(len(r["image_embedding"]) for r in rows if r["image_embedding"] is not None)


def _family(url: str) -> tuple[int, str] | None:
    """(the original's index, the copy's kind, or "original") of a row's URL."""
    index = web_index(url)
    if index is not None:
        return index, "original"
    match = _COPY_PATH.search(url)
    return (int(match.group(1)), match.group(2)) if match else None


def _figures(rows: list[dict[str, Any]], duplicate_of: dict[str, str], distinct: int) -> dict[str, Any]:
    family = {r["key"]: _family(r["url"]) for r in rows}
    found: dict[str, list[bool]] = defaultdict(list)
    false_merges = 0
    for r in rows:
        own = family[r["key"]]
        if own is None or r["status"] not in (Fate.KEPT, Fate.DUPLICATE_IMAGE):
            continue
        original = duplicate_of.get(r["key"])
        right = original is not None and family[original][0] == own[0]
        if own[1] != "original":
            found[own[1]].append(right)
        if original is not None and not right:
            false_merges += 1
    recall = {kind: float(np.mean(found[kind])) if found[kind] else None for kind in COPY_KINDS}
    copies = [hit for kind in COPY_KINDS for hit in found[kind]]
    altered = [hit for kind in ALTERED_KINDS for hit in found[kind]]
    figures = {
        "recall": recall,
        "recall_all": float(np.mean(copies)) if copies else None,
        "recall_altered": float(np.mean(altered)) if altered else None,
        "false_merges": false_merges,
        "false_merge_rate": false_merges / distinct,
    }
    return {**figures, "meets_target": meets_target(figures)}


def meets_target(figures: dict[str, Any]) -> bool:
    """Issue 22's target: every planted copy, and the altered ones alone, found at a recall of at
    least 0.95, with at most 1 % of the distinct images merged into another picture."""
    recalls = (figures["recall_all"], figures["recall_altered"])
    return all(r is not None and r >= TARGET_RECALL for r in recalls) and (
        figures["false_merge_rate"] <= TARGET_FALSE_MERGE_RATE
    )


def format_dedup_report(report: dict[str, Any]) -> str:
    job = report["job_dedup"]
    kinds = "  ".join(f"{k:>12}" for k in COPY_KINDS)
    planted = ", ".join(f"{n} {kind}" for kind, n in report["copies"].items())
    lines = [
        f"dedup on the synthetic world: {report['distinct_images']} distinct images, "
        f"{sum(report['copies'].values())} planted copies ({planted})",
        f"job: filter.dedup exact={job['exact']} near_threshold={job['near_threshold']}; "
        f"rows not scored: {report['unscored']}",
        "",
        f"{'near threshold':<16}{kinds}  {'altered':>8}  {'all copies':>10}  {'false merges':>14}  target",
    ]

    def line(label: str, f: dict[str, Any]) -> str:
        recall = "  ".join(f"{_share(f['recall'][k]):>12}" for k in COPY_KINDS)
        merges = f"{f['false_merges']} ({f['false_merge_rate']:.2%})"
        shares = f"{_share(f['recall_altered']):>8}  {_share(f['recall_all']):>10}"
        met = "met" if f["meets_target"] else "-"
        return f"{label:<16}{recall}  {shares}  {merges:>14}  {met}"

    lines.append(line(f"job ({job['near_threshold']})", report["job"]))
    lines += [line(threshold, figures) for threshold, figures in report["sweep"].items()]
    lines.append("(exact dedup on in every line; None: no near dedup)")
    lines.append("recall: share of each kind's copies marked duplicate_image of their own original;")
    lines.append(f"altered: {', '.join(ALTERED_KINDS)} together, which only the embedding can find")
    lines.append(
        f"target: recall >= {TARGET_RECALL} (all copies and altered ones), "
        f"false merges <= {TARGET_FALSE_MERGE_RATE:.0%} of the distinct images"
    )
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
