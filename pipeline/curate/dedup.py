"""Image dedup: which kept rows show an image that an earlier kept row already shows.

Decided last (score, then decide): over the rows the keep rule kept, in input order. The first
occurrence of an image stays `kept`; a later one ends `duplicate_image`, with `duplicate_of` the key
it repeats, and is not in the tar. Two images are duplicates when

- exact (`filter.dedup.exact`): their decoded pixels are equal (`pixel_hash`: the size and every RGB
  value), which a byte copy or a lossless re-encoding of the same picture is;
- near (`filter.dedup.near_threshold`): the cosine of their ITC embeddings is at least the threshold,
  which catches what changes pixels but not the picture: re-encoded, recompressed, resized and
  slightly cropped copies.

Only originals enter the index, so a copy of a copy is measured against the original. The index
lives with whoever decides (the job's driver): a dict of pixel hashes and a faiss inner-product index
of the originals' normalised embeddings (exact search, float32): 1,400 bytes per kept image at
D = 256 (`python benchmarks/dedup_index.py`: 1,335 MiB for a million). Each shard is decided against
it in one batched search, plus a search of the shard against itself for copies within it. Exact
search grows with the index: a shard of 10,000 against a million originals took 92 s on 2 CPU cores
(same command), so near dedup at that scale wants an approximate or GPU index; exact dedup costs a
dict lookup per row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.spec.config import DedupSpec


def pixel_hash(rgb: np.ndarray) -> str:
    """BLAKE2b-128 of an image's decoded RGB pixels and its size, hex."""
    height, width = rgb.shape[:2]
    digest = hashlib.blake2b(f"{width}x{height}:".encode(), digest_size=16)
    digest.update(np.ascontiguousarray(rgb, dtype=np.uint8).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class KeptImage:
    """A row the keep rule kept, as dedup sees it."""

    key: str
    pixel_hash: str | None  # None: not known (a shard written before capfilt hashed pixels)
    embedding: np.ndarray | None  # the ITC embedding, normalised; None: not scored or not stored


class DuplicateIndex:
    """The originals decided so far; `decide` takes the next rows in input order."""

    def __init__(self, dedup: DedupSpec, embedding_size: int) -> None:
        import faiss

        self.dedup = dedup
        self._by_hash: dict[str, str] = {}
        self._keys: list[str] = []  # the index's rows, by position
        self._index = faiss.IndexFlatIP(embedding_size)

    @property
    def active(self) -> bool:
        return self.dedup.exact or self._near

    @property
    def _near(self) -> bool:
        return self.dedup.near_threshold is not None

    def add_originals(self, rows: Sequence[KeptImage]) -> None:
        """Rows kept by an earlier decision (shards already written): originals as they are."""
        if self.dedup.exact:
            for row in rows:
                if row.pixel_hash:
                    self._by_hash.setdefault(row.pixel_hash, row.key)
        self._add_near([r for r in rows if r.embedding is not None])

    def _add_near(self, rows: Sequence[KeptImage]) -> None:
        if self._near and rows:
            self._index.add(_matrix([r.embedding for r in rows]))
            self._keys.extend(r.key for r in rows)

    def decide(self, rows: Sequence[KeptImage]) -> dict[str, str]:
        """The duplicates among `rows` (kept rows, in input order) as {key: the key it duplicates},
        each measured against every original before it; the others become originals."""
        if not self.active or not rows:
            return {}
        earlier = self._nearest_earlier(rows)
        within = self._similar_within(rows)
        duplicates: dict[str, str] = {}
        originals = []
        for i, row in enumerate(rows):
            same_batch = (rows[j].key for j in within[i] if rows[j].key not in duplicates)
            original = self._exact(row) or earlier[i] or next(same_batch, None)
            if original:
                duplicates[row.key] = original
                continue
            if self.dedup.exact and row.pixel_hash:
                self._by_hash[row.pixel_hash] = row.key
            originals.append(row)
        self._add_near([r for r in originals if r.embedding is not None])
        return duplicates

    def _exact(self, row: KeptImage) -> str | None:
        return self._by_hash.get(row.pixel_hash) if self.dedup.exact and row.pixel_hash else None

    def _nearest_earlier(self, rows: Sequence[KeptImage]) -> list[str | None]:
        """Per row, the most similar original of earlier shards, when it is near enough."""
        found: list[str | None] = [None] * len(rows)
        scored = [i for i, r in enumerate(rows) if r.embedding is not None]
        if not self._near or not scored or not self._keys:
            return found
        similarity, position = self._index.search(_matrix([rows[i].embedding for i in scored]), 1)
        for i, s, p in zip(scored, similarity[:, 0], position[:, 0], strict=True):
            if p >= 0 and s >= self.dedup.near_threshold:
                found[i] = self._keys[p]
        return found

    def _similar_within(self, rows: Sequence[KeptImage]) -> list[list[int]]:
        """Per row, the earlier rows of the same batch near enough to it, most similar first."""
        import faiss

        within: list[list[int]] = [[] for _ in rows]
        scored = [i for i, r in enumerate(rows) if r.embedding is not None]
        if not self._near or len(scored) < 2:
            return within
        vectors = _matrix([rows[i].embedding for i in scored])
        batch = faiss.IndexFlatIP(vectors.shape[1])
        batch.add(vectors)
        threshold = self.dedup.near_threshold
        limits, similarity, position = batch.range_search(vectors, threshold - 1e-6)  # faiss: ">", here ">="
        for q, i in enumerate(scored):
            span = slice(limits[q], limits[q + 1])
            hits = zip(similarity[span], position[span], strict=True)
            nearest_first = sorted((-s, int(p)) for s, p in hits if s >= threshold and scored[p] < i)
            within[i] = [scored[p] for _, p in nearest_first]
        return within


def _matrix(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """float32 rows, normalised again (float16 storage leaves them a hair off unit length)."""
    matrix = np.stack([np.asarray(v, dtype=np.float32) for v in vectors])
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.ascontiguousarray(matrix / np.maximum(norms, 1e-12))


Decided = tuple[str, Any, dict[str, str]]  # a shard, what came with it, its duplicates


class InInputOrder:
    """Dedup decided in input order while shards finish in any order: a shard whose rows have all
    arrived waits until every shard before it has arrived or failed, then is decided, and handed back
    with its duplicates to be written. A failed shard is passed over (a later retry-failed decides its
    rows against everything kept by then). With dedup off, a shard is handed back as it arrives."""

    def __init__(self, shards: Sequence[str], index: DuplicateIndex) -> None:
        self._order = list(shards)
        self._next = 0
        self._arrived: dict[str, tuple[list[KeptImage], Any] | None] = {}
        self.index = index

    def arrived(self, shard: str, images: list[KeptImage], payload: Any) -> list[Decided]:
        """Shard `shard` is complete: the shards now decided, as (shard, payload, duplicates)."""
        if not self.index.active:
            return [(shard, payload, {})]
        self._arrived[shard] = (images, payload)
        return self._advance()

    def failed(self, shard: str) -> list[Decided]:
        """Shard `shard` will not arrive: the shards now decided."""
        self._arrived[shard] = None
        return self._advance()

    def _advance(self) -> list[Decided]:
        decided = []
        while self._next < len(self._order) and self._order[self._next] in self._arrived:
            shard = self._order[self._next]
            self._next += 1
            entry = self._arrived.pop(shard)
            if entry is not None:
                images, payload = entry
                decided.append((shard, payload, self.index.decide(images)))
        return decided
