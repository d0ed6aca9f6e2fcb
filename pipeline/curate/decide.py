"""The keep rule: from stored scores to kept captions. No model, no GPU.

CapFilt scores every candidate caption (the web alt-text and each synthetic caption) and keeps
those whose ITM match probability is at least the threshold (BLIP's rule: >= 0.5). `filter.keep`
may rank them by ITC instead of ITM, and keep only the k best (BLIP-2's "sample many, keep the
best"). The scores are stored with the output, so a new rule is a re-run of this function, not of
the GPUs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.spec.config import CAPFILT_KEEP, KeepSpec

WEB = "web"
SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class Candidate:
    text: str
    source: str  # WEB or SYNTHETIC
    itm: float
    itc: float | None = None  # None in shards written before ITC was scored


def candidates(
    web_caption: str | None,
    web_itm: float | None,
    synthetic: Sequence[str],
    synthetic_itm: Sequence[float],
    web_itc: float | None = None,
    synthetic_itc: Sequence[float] | None = None,
) -> list[Candidate]:
    """Every scored, non-empty caption of one image, the web one first."""
    found = []
    if web_caption and web_caption.strip() and web_itm is not None:
        found.append(Candidate(web_caption, WEB, float(web_itm), web_itc))
    itcs = synthetic_itc if synthetic_itc is not None else [None] * len(synthetic)
    for text, itm, itc in zip(synthetic, synthetic_itm, itcs, strict=True):
        if text.strip():
            found.append(Candidate(text, SYNTHETIC, float(itm), itc))
    return found


def decide(
    found: Sequence[Candidate], threshold: float, keep: KeepSpec = CAPFILT_KEEP
) -> tuple[list[Candidate], str | None]:
    """Kept captions, best first by `keep.by` (ties keep the web caption first), and the selected one:
    every caption whose ITM passes the threshold, or under `top_k` the k best of them."""
    kept = ranked([c for c in found if c.itm >= threshold], keep.by)
    if keep.rule == "top_k":
        kept = kept[: keep.k]
    return kept, (kept[0].text if kept else None)


def ranked(found: Sequence[Candidate], by: str) -> list[Candidate]:
    """Best first by `by` ("itm" or "itc"); a stable sort, so ties keep their order (the web caption
    first). Raises ValueError when ranking by ITC captions that have no ITC score."""
    if by == "itc":
        if any(c.itc is None for c in found):
            raise ValueError(
                "ranking by ITC needs ITC scores, and this shard was written before capfilt stored them"
            )
        return sorted(found, key=lambda c: -c.itc)
    return sorted(found, key=lambda c: -c.itm)
