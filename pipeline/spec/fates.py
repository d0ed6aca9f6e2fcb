"""The fates an input row can end in, and the one place they are counted.

Every input row ends in exactly one fate; the manifest's counts add up to the input rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from enum import StrEnum


class Fate(StrEnum):
    KEPT = "kept"  # at least one caption passed the ITM filter
    FILTERED = "filtered"  # the image is fine, no caption passed
    DUPLICATE_IMAGE = "duplicate_image"  # kept, but an earlier kept row shows the same image (dedup)
    DOWNLOAD_FAILED = "download_failed"  # HTTP error, timeout, refused connection
    DECODE_FAILED = "decode_failed"  # the bytes are not a decodable image
    WRONG_SIZE = "wrong_size"  # an image the size rules refuse (download.min_image_size, max_aspect_ratio)
    INVALID_INPUT = "invalid_input"  # the row itself is unusable (no URL, not a URL)
    BLOCKED = "blocked"  # policy: scheme, private address, opt-out header


def count_fates(statuses: Iterable[str]) -> dict[str, int]:
    """Counts per fate, every fate present (zeros included) so reports line up."""
    counts = Counter(statuses)
    unknown = set(counts) - {f.value for f in Fate}
    if unknown:
        raise ValueError(f"unknown fate(s): {sorted(unknown, key=repr)}")
    return {f.value: counts.get(f.value, 0) for f in Fate}


def add_counts(total: Mapping[str, int], more: Mapping[str, int]) -> dict[str, int]:
    return {f.value: total.get(f.value, 0) + more.get(f.value, 0) for f in Fate}
