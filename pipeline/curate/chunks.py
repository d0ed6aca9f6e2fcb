"""A chunk: up to `captioner.batch_size` downloaded images of one shard, in key order.

Chunks are the rows that flow through Ray Data. A chunk never spans two shards and its content
depends only on the shard, so captions sampled for it (seeded by shard and chunk) come out the
same however Ray schedules the work, and a shard is complete when all its chunks are back.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.core.storage import read_parquet
from pipeline.core.tars import read_jpegs
from pipeline.ingest.download import DOWNLOADED
from pipeline.ingest.url_list import CAPTION
from pipeline.spec.layout import OutputLayout

Chunk = dict[str, Any]


def downloaded_keys(layout: OutputLayout, shard: str) -> list[str]:
    """Keys of the rows img2dataset downloaded and decoded, sorted (the tar's order)."""
    table = read_parquet(layout.raw_parquet(shard), columns=["key", "status"])
    return sorted(k for k, s in zip(table["key"].to_pylist(), table["status"].to_pylist(), strict=True)
                  if s == DOWNLOADED)  # fmt: skip


def chunk_count(layout: OutputLayout, shard: str, batch_size: int) -> int:
    return math.ceil(len(downloaded_keys(layout, shard)) / batch_size)


@dataclass(frozen=True)
class ChunkReader:
    """Shard name in, its chunks out: keys, JPEG bytes and web captions."""

    layout: OutputLayout
    batch_size: int

    def __call__(self, row: dict[str, Any]) -> Iterator[Chunk]:
        shard = row["shard"]
        meta = read_parquet(self.layout.raw_parquet(shard), columns=["key", CAPTION])
        caption_of = dict(zip(meta["key"].to_pylist(), meta[CAPTION].to_pylist(), strict=True))
        keys = downloaded_keys(self.layout, shard)
        jpegs = _jpegs(self.layout, shard, set(keys))
        for index, start in enumerate(range(0, len(keys), self.batch_size)):
            part = keys[start : start + self.batch_size]
            yield {
                "shard": shard,
                "chunk": index,
                "keys": part,
                "jpegs": [jpegs[k] for k in part],
                "captions": [caption_of[k] or "" for k in part],
            }


def _jpegs(layout: OutputLayout, shard: str, keys: set[str]) -> dict[str, bytes]:
    found = read_jpegs(layout.raw_tar(shard), keys)
    missing = keys - found.keys()
    if missing:
        raise ValueError(f"{layout.raw_tar(shard)}: no image for downloaded keys {sorted(missing)[:5]}")
    return found
