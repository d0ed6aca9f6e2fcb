"""Counting the rows of a URL list whose URL an earlier row already had, in flat memory per row.

Every row is its own sample: a URL listed twice is downloaded and scored twice. That is the honest
reading of a list (two rows may carry different captions or extra columns), but a list with many
repeats costs downloads and GPU time, so the job says how many there were (`duplicate_urls` in the
manifest) instead of silently merging or dropping rows.

A list has billions of rows, so URLs are not kept: each distinct URL of a batch is held as its 64-bit
hash (Python's `hash`, SipHash, stable within the process that counts), 8 bytes per row at most. The
count is taken at the end one sixteenth of the hash range at a time, which adds 9/16 of a byte per
row. Two different URLs that share a hash would count as one repeat: about n²/2⁶⁵ of them in n
rows (0.03 in a billion).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

_PARTS = 16  # the final count sorts one part of the hash range at a time


class DuplicateCounter:
    """Feed it the URLs of each batch in order; `count()` is the rows whose URL came earlier.

    URLs are compared stripped of surrounding whitespace, as they are fetched; a null or empty URL
    is no URL and never counts."""

    def __init__(self) -> None:
        self._batches: list[np.ndarray] = []  # each batch's distinct hashes, sorted
        self._urls = 0

    def add(self, urls: Iterable[str | None]) -> None:
        hashes = np.fromiter((hash(s) for u in urls if u and (s := u.strip())), dtype=np.int64)
        distinct = np.unique(hashes)
        self._urls += len(hashes)
        if len(distinct):
            self._batches.append(distinct)

    def count(self) -> int:
        """Rows (with a URL) whose URL an earlier row had: all of them less the distinct URLs."""
        width = 2**64 // _PARTS
        edges = [np.int64(-(2**63) + i * width) for i in range(_PARTS)]
        distinct = 0
        for i, low in enumerate(edges):
            high = edges[i + 1] if i + 1 < _PARTS else None
            part = np.concatenate([_slice(b, low, high) for b in self._batches] or [np.empty(0, np.int64)])
            part.sort()
            distinct += int(len(part) > 0) + int(np.count_nonzero(part[1:] != part[:-1]))
        return self._urls - distinct


def _slice(sorted_hashes: np.ndarray, low: np.int64, high: np.int64 | None) -> np.ndarray:
    """The hashes in [low, high) of a sorted array: a view, no copy."""
    start = np.searchsorted(sorted_hashes, low, side="left")
    stop = len(sorted_hashes) if high is None else np.searchsorted(sorted_hashes, high, side="left")
    return sorted_hashes[start:stop]
