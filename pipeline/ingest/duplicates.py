"""Counting the rows of a URL list whose URL an earlier row already had, in memory that does not
grow with the list.

Every row is its own sample: a URL listed twice is downloaded and scored twice. That is the honest
reading of a list (two rows may carry different captions or extra columns), but a list with many
repeats costs downloads and GPU time, so the job says how many there were (`duplicate_urls` in the
manifest) instead of silently merging or dropping rows.

A list has billions of rows, so URLs are not kept, and neither are their hashes in memory: each URL
becomes its 64-bit hash (Python's `hash`, SipHash, stable within the process that counts), written to
one of 256 spill files on the driver's temporary disk by the hash's top byte (8 bytes a row on disk:
3.2 GB at 400M rows). The count is taken at the end one spill file at a time, so memory holds one
batch while counting and 1/256 of the hashes at the end (12.5 MB at 400M rows). Two different URLs
that share a hash would count as one repeat: about n²/2⁶⁵ of them in n rows (0.03 in a billion).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

PARTS = 256  # spill files, by the hash's top byte


class DuplicateCounter:
    """Feed it the URLs of each batch in order; `count()` is the rows whose URL came earlier.

    URLs are compared stripped of surrounding whitespace, as they are fetched; a null or empty URL
    is no URL and never counts. A context manager: leaving it removes the spill files (so does
    `count()`, which can be called once)."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="capfilt-url-hashes-")
        self._paths = [Path(self._dir.name) / f"{i:03d}" for i in range(PARTS)]
        self._files = [path.open("wb") for path in self._paths]
        self._urls = 0

    def __enter__(self) -> DuplicateCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, urls: Iterable[str | None]) -> None:
        hashes = np.fromiter((hash(s) for u in urls if u and (s := u.strip())), dtype=np.int64)
        self._urls += len(hashes)
        part = hashes.view(np.uint64) >> np.uint64(56)
        order = np.argsort(part, kind="stable")
        hashes, part = hashes[order], part[order]
        edges = np.searchsorted(part, np.arange(PARTS + 1, dtype=np.uint64))
        for i in np.flatnonzero(edges[1:] > edges[:-1]):
            self._files[i].write(hashes[edges[i] : edges[i + 1]].tobytes())

    def count(self) -> int:
        """Rows (with a URL) whose URL an earlier row had: all of them less the distinct URLs."""
        for file in self._files:
            file.close()
        distinct = sum(len(np.unique(np.fromfile(path, dtype=np.int64))) for path in self._paths)
        self.close()
        return self._urls - distinct

    def close(self) -> None:
        for file in self._files:
            file.close()
        self._dir.cleanup()
