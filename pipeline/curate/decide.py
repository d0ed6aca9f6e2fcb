"""The keep rule: from stored ITM scores to kept captions. No model, no GPU.

CapFilt scores every candidate caption (the web alt-text and each synthetic caption) and keeps
those whose ITM match probability is at least the threshold (BLIP's rule: >= 0.5). The scores are
stored with the output, so a new threshold is a re-run of this function, not of the GPUs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

WEB = "web"
SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class Candidate:
    text: str
    source: str  # WEB or SYNTHETIC
    itm: float


def candidates(
    web_caption: str | None,
    web_itm: float | None,
    synthetic: Sequence[str],
    synthetic_itm: Sequence[float],
) -> list[Candidate]:
    """Every scored, non-empty caption of one image, the web one first."""
    found = []
    if web_caption and web_caption.strip() and web_itm is not None:
        found.append(Candidate(web_caption, WEB, float(web_itm)))
    for text, itm in zip(synthetic, synthetic_itm, strict=True):
        if text.strip():
            found.append(Candidate(text, SYNTHETIC, float(itm)))
    return found


def decide(found: Sequence[Candidate], threshold: float) -> tuple[list[Candidate], str | None]:
    """Kept captions, best first (ties keep the web caption first), and the selected one."""
    kept = sorted((c for c in found if c.itm >= threshold), key=lambda c: -c.itm)
    return kept, (kept[0].text if kept else None)
