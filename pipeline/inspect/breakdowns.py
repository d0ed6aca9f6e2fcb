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

    def add(self, keys: pa.Array | pa.ChunkedArray, kept: np.ndarray) -> None:
        """One shard's key per row and whether the row was kept: grouped by pyarrow, then counted."""
        grouped = pa.table({"key": keys, "kept": pa.array(kept.astype(np.int64))}).group_by("key")
        counts = grouped.aggregate([("kept", "sum"), ("kept", "count")])
        for key, kept_rows, rows in zip(
            *(counts[c].to_pylist() for c in ("key", "kept_sum", "kept_count")), strict=True
        ):
            if key not in self.rows and len(self.rows) >= MAX_KEYS:
                key = OTHER
            self.rows[key] += rows
            self.kept[key] += kept_rows

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


def _domains(urls: pa.ChunkedArray) -> pa.ChunkedArray:
    hosts = pc.utf8_lower(pc.struct_field(pc.extract_regex(pc.fill_null(urls, ""), _HOST), "host"))
    return pc.if_else(pc.fill_null(pc.not_equal(hosts, ""), False), hosts, NO_DOMAIN)


def _size_bands(width: pa.ChunkedArray, height: pa.ChunkedArray) -> pa.Array:
    shorter = pc.min_element_wise(width, height).to_numpy(zero_copy_only=False).astype(np.float64)
    labels = _banded(SIZE_BANDS, np.nan_to_num(shorter, nan=0))
    return pa.array(np.where(np.isnan(shorter), NOT_DECODED, labels))


def _word_bands(captions: pa.ChunkedArray) -> pa.Array:
    words = pc.count_substring_regex(pc.fill_null(captions, ""), r"\S+").to_numpy(zero_copy_only=False)
    return pa.array(_banded(WORD_BANDS, words))


def _banded(bands: tuple[tuple[int, str], ...], values: np.ndarray) -> np.ndarray:
    """Each value's band label: the last band whose start it reaches."""
    starts = np.array([start for start, _ in bands])
    labels = np.array([label for _, label in bands], dtype=object)
    return labels[np.searchsorted(starts, values, side="right") - 1]
