"""Rows and kept rows by what curators slice a web crawl by: the URL's domain, the image's size as
downloaded, the web caption's length. The report's tables; computed per shard with pyarrow.

A crawl can hold millions of domains, so the domain table counts at most `MAX_KEYS` of them exactly
and every domain first seen after that under `OTHER`: memory stays bounded whatever the job, and the
top domains, which appear early in any shard, are exact.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_KEYS = 50_000
OTHER = "(other domains)"
NO_DOMAIN = "(no domain)"
# Bands of the shorter side as downloaded: BLIP's authors kept LAION images whose shorter side exceeds 256.
SIZE_BANDS = (
    (0, "< 64 px"),
    (64, "64-127 px"),
    (128, "128-255 px"),
    (256, "256-511 px"),
    (512, "512-1023 px"),
    (1024, ">= 1024 px"),
)
WORD_BANDS = (
    (0, "no words"),
    (1, "1-2 words"),
    (3, "3-5 words"),
    (6, "6-10 words"),
    (11, "11-20 words"),
    (21, "21-40 words"),
    (41, "> 40 words"),
)
NOT_DECODED = "not decoded"
_HOST = r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?(?P<host>\[[^\]]*\]|[^/:?#]*)"


@dataclass
class Breakdown:
    """Rows and kept rows per key, for at most `MAX_KEYS` keys (then `OTHER`)."""

    rows: Counter[str] = field(default_factory=Counter)
    kept: Counter[str] = field(default_factory=Counter)

    def add(self, keys: list[str], kept: np.ndarray) -> None:
        for key, is_kept in zip(keys, kept.tolist(), strict=True):
            if key not in self.rows and len(self.rows) >= MAX_KEYS:
                key = OTHER
            self.rows[key] += 1
            self.kept[key] += is_kept

    def top(self, n: int) -> list[tuple[str, int, int]]:
        """The `n` keys with the most rows: (key, rows, kept)."""
        return [(key, rows, self.kept[key]) for key, rows in self.rows.most_common(n)]

    def in_order(self, keys: list[str]) -> list[tuple[str, int, int]]:
        """The given keys that have rows, in that order: (key, rows, kept)."""
        return [(key, self.rows[key], self.kept[key]) for key in keys if self.rows[key]]


@dataclass
class Breakdowns:
    domains: Breakdown = field(default_factory=Breakdown)
    sizes: Breakdown = field(default_factory=Breakdown)
    caption_words: Breakdown = field(default_factory=Breakdown)

    def add(self, table: pa.Table, kept: np.ndarray) -> None:
        """One shard's rows (its Parquet table) and which of them were kept."""
        self.domains.add(_domains(table["url"]), kept)
        if "original_width" in table.column_names:  # a shard written before capfilt stored it has none
            self.sizes.add(_size_bands(table["original_width"], table["original_height"]), kept)
        self.caption_words.add(_word_bands(table["web_caption"]), kept)

    @property
    def size_order(self) -> list[str]:
        return [label for _, label in SIZE_BANDS] + [NOT_DECODED]

    @property
    def word_order(self) -> list[str]:
        return [label for _, label in WORD_BANDS]


def _domains(urls: pa.ChunkedArray) -> list[str]:
    hosts = pc.struct_field(pc.extract_regex(pc.fill_null(urls, ""), _HOST), "host")
    return [h.lower() if h else NO_DOMAIN for h in hosts.to_pylist()]


def _size_bands(width: pa.ChunkedArray, height: pa.ChunkedArray) -> list[str]:
    shorter = pc.min_element_wise(width, height).to_numpy(zero_copy_only=False)
    return [_band(SIZE_BANDS, side) if side == side else NOT_DECODED for side in shorter.tolist()]


def _word_bands(captions: pa.ChunkedArray) -> list[str]:
    words = pc.count_substring_regex(pc.fill_null(captions, ""), r"\S+")
    return [_band(WORD_BANDS, n) for n in words.to_numpy(zero_copy_only=False).tolist()]


def _band(bands: tuple[tuple[int, str], ...], value: float) -> str:
    return next(label for start, label in reversed(bands) if value >= start)
