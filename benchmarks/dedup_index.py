"""The driver's dedup index at scale: memory per kept image, and the time to decide one shard.

    python benchmarks/dedup_index.py [--originals N] [--shard N]

Fills a `DuplicateIndex` (exact and near, D = 256) with N random originals (pixel hash, key, unit
embedding) and reports the process's resident memory it added, per original; then times `decide` on one
shard of new rows against them (faiss exact search over every original, plus the shard against itself).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import psutil

from pipeline.curate.dedup import DuplicateIndex, KeptImage
from pipeline.spec.config import DedupSpec

D = 256


def rows(n: int, start: int, rng: np.random.Generator) -> list[KeptImage]:
    vectors = rng.standard_normal((n, D)).astype(np.float32)
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
    return [KeptImage(f"{start + i:010d}", f"{rng.integers(2**63):032x}", v) for i, v in enumerate(vectors)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--originals", type=int, default=1_000_000)
    parser.add_argument("--shard", type=int, default=10_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    index = DuplicateIndex(DedupSpec(exact=True, near_threshold=0.95), D)
    process = psutil.Process()
    before = process.memory_info().rss
    for start in range(0, args.originals, 100_000):
        batch = rows(min(100_000, args.originals - start), start, rng)
        index.add_originals(batch)
        del batch
    added = process.memory_info().rss - before
    each = added / args.originals
    print(f"{args.originals} originals: {added / 2**20:.0f} MiB resident, {each:.0f} bytes each")
    shard = rows(args.shard, args.originals, rng)
    began = time.perf_counter()
    index.decide(shard)
    print(f"decide one shard of {args.shard} rows against them: {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
