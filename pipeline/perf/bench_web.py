"""The bench's web: N image URLs served on 127.0.0.1, and a job spec over them.

Real web images are larger than a model's input and vary, so the site serves a pool of distinct
JPEGs of web-photo size (each URL is its own path; contents repeat across the pool). Downloads are
resized to the captioner's input size at download time, as a real job's are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.curate.tiny_models import TinyModelPaths
from pipeline.spec.config import JobSpec, spec_from_dict
from pipeline.synthetic.sample_web import Route, StaticSite, jpeg_bytes, render_scene

POOL = 64  # distinct images
WEB_SIZE = 512  # pixels on a side before the download resizes them


def bench_site(rows: int, seed: int = 0, request_s: float = 0.0) -> tuple[StaticSite, pa.Table]:
    """A started site serving `rows` image URLs, each request answered after `request_s` (a web's
    latency), and the URL list (url, caption) that names them."""
    pool = [render_scene(seed * POOL + i, size=WEB_SIZE) for i in range(POOL)]
    bodies = [jpeg_bytes(image) for image, _ in pool]
    site = StaticSite({}).start()
    urls, captions = [], []
    for i in range(rows):
        path = f"/img/{i:08d}.jpg"
        jpeg = (("Content-Type", "image/jpeg"),)
        site.add(path, Route(body=bodies[i % POOL], headers=jpeg, stall_s=request_s))
        urls.append(site.url(path))
        captions.append(pool[i % POOL][1])
    return site, pa.table({"url": urls, "caption": captions})


def bench_spec(
    root: Path,
    url_list: pa.Table,
    models: TinyModelPaths,
    image_size: int,
    batch_size: int,
    shard_size: int = 1000,
) -> JobSpec:
    """A job over the URL list, written under `root`: one actor, one caption per image."""
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(url_list, root / "urls.parquet")
    raw: dict[str, Any] = {
        "input": {"url_list": str(root / "urls.parquet")},
        "download": {"image_size": image_size, "timeout": 10, "retries": 0, "allow_private_networks": True},
        "captioner": {"model": str(models.captioner), "num_captions": 1, "batch_size": batch_size},
        "filter": {"model": str(models.itm), "batch_size": 4 * batch_size},
        "resources": {"actors": 1},
        "output": {"path": str(root / "output"), "shard_size": shard_size},
    }
    return spec_from_dict(raw)
