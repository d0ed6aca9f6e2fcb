"""A chunk: up to `captioner.batch_size` downloaded images of one shard, in key order.

Chunks are the rows that flow through Ray Data. A chunk never spans two shards and its content
depends only on the shard, so captions sampled for it (seeded by shard and chunk) come out the
same however Ray schedules the work. Every chunk says how many its shard has (`chunks`), so the
runner knows a shard is complete when that many are back. A shard with nothing to score (no image
downloaded, or its download failed) still sends one chunk, with no keys and `chunks` 0: every shard
reaches the end of the stream.
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
# What the download step says of a shard, carried by each of its chunks to the end of the stream.
PASSED_ON = ("chunks", "download_error", "download_s", "downloaded_at", "preprocess_s")


def downloaded_keys(layout: OutputLayout, shard: str) -> list[str]:
    """Keys of the rows img2dataset downloaded and decoded, sorted (the tar's order)."""
    table = read_parquet(layout.raw_parquet(shard), columns=["key", "status"])
    return sorted(k for k, s in zip(table["key"].to_pylist(), table["status"].to_pylist(), strict=True)
                  if s == DOWNLOADED)  # fmt: skip


def on_disk(shard: str) -> dict[str, Any]:
    """The download step's row for a shard whose raw files are already there."""
    return {"shard": shard, "download_error": "", "download_s": 0.0, "downloaded_at": 0.0}


@dataclass(frozen=True)
class ChunkReader:
    """A downloaded shard in (the download step's row), its chunks out: keys, JPEG bytes and web
    captions, and what the download step said."""

    layout: OutputLayout
    batch_size: int

    def __call__(self, row: dict[str, Any]) -> Iterator[Chunk]:
        shard = row["shard"]
        download = {k: row[k] for k in ("download_error", "download_s", "downloaded_at")}
        empty = {"shard": shard, "chunk": 0, "chunks": 0, "keys": [], "jpegs": [], "captions": [], **download}
        if download["download_error"]:
            yield empty
            return
        meta = read_parquet(self.layout.raw_parquet(shard), columns=["key", CAPTION])
        caption_of = dict(zip(meta["key"].to_pylist(), meta[CAPTION].to_pylist(), strict=True))
        keys = downloaded_keys(self.layout, shard)
        jpegs = _jpegs(self.layout, shard, set(keys))
        if not keys:
            yield empty
        chunks = math.ceil(len(keys) / self.batch_size)
        for index, start in enumerate(range(0, len(keys), self.batch_size)):
            part = keys[start : start + self.batch_size]
            yield {
                "shard": shard,
                "chunk": index,
                "keys": part,
                "jpegs": [jpegs[k] for k in part],
                "captions": [caption_of[k] or "" for k in part],
                "chunks": chunks,
                **download,
            }


def _jpegs(layout: OutputLayout, shard: str, keys: set[str]) -> dict[str, bytes]:
    found = read_jpegs(layout.raw_tar(shard), keys)
    missing = keys - found.keys()
    if missing:
        raise ValueError(f"{layout.raw_tar(shard)}: no image for downloaded keys {sorted(missing)[:5]}")
    return found
