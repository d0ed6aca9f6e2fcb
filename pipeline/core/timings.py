"""Where a run's time went: wall seconds per phase, busy seconds per stage.

Each stage times its own work and the figure rides back with the chunk (`preprocess_s`, `caption_s`,
`itm_s`) or the writer's result; the runner adds them up. Busy seconds are summed over all workers,
so `images / busy` is one worker's rate, and `actor_busy` how busy the CapFilt actors were in the
steady window (from their models' loading to the phase's end): an actor busy 60 % of it is a GPU
waiting 40 %. The manifest carries these figures for the run that wrote it, and `capfilt bench perf`
reads them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

STAGES = ("preprocess", "caption", "itm", "write")
SCORING_SECONDS = ("caption_s", "itm_s")  # what the CapFilt stage reports; a split chunk's halves add up


@contextmanager
def stopwatch(into: dict[str, float], name: str) -> Iterator[None]:
    """Add the seconds the block took to `into[name]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        into[name] = into.get(name, 0.0) + time.perf_counter() - start


@dataclass
class RunTimings:
    """One run's figures. `startup_s` runs from the caption/filter phase's start to the moment the
    first CapFilt actor had its models loaded: a cost paid once per job, not per image."""

    download_s: float = 0.0
    caption_filter_s: float = 0.0
    startup_s: float | None = None
    images: int = 0
    busy_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    def add_chunk(self, chunk: dict[str, Any], since_start: float) -> None:
        """Count a scored chunk's images and its stages' seconds. `since_start`: seconds from the
        phase's start to the moment its actor was ready (`time.time()` of two processes, on one
        clock where they share a machine, NTP-close where they do not, hence never below 0).
        Seconds spent on a failed attempt before a split or a retry are not counted."""
        since_start = max(0.0, since_start)
        self.startup_s = since_start if self.startup_s is None else min(self.startup_s, since_start)
        self.images += sum(1 for err in chunk["decode_errors"] if not err)
        for stage in ("preprocess", "caption", "itm"):
            self.busy_s[stage] += float(chunk[f"{stage}_s"])

    def steady_images_per_s(self) -> float:
        return steady_images_per_s(self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        return {
            "download_s": round(self.download_s, 3),
            "caption_filter_s": round(self.caption_filter_s, 3),
            "startup_s": round(self.startup_s or 0.0, 3),
            "images": self.images,
            "busy_s": {k: round(v, 3) for k, v in self.busy_s.items()},
        }

    def summary(self) -> str:
        """One log line: the phase's rate and where the busy time went."""
        busy = ", ".join(f"{k} {v:.1f} s" for k, v in self.busy_s.items())
        return (f"capfilt: download {self.download_s:.1f} s; caption/filter {self.images} images in "
                f"{self.caption_filter_s:.1f} s ({self.steady_images_per_s():.0f}/s once the models were "
                f"loaded, after {self.startup_s or 0.0:.1f} s); busy: {busy}")  # fmt: skip


def steady_images_per_s(timings: dict[str, Any]) -> float:
    """Images per second once an actor was ready, from a manifest's `timings`: the rate a long job
    runs at (the models' one-time loading left out)."""
    seconds = timings["caption_filter_s"] - timings["startup_s"]
    return timings["images"] / seconds if seconds > 0 else 0.0


def actor_busy(timings: dict[str, Any], actors: int) -> float:
    """The share of the steady window the CapFilt actors spent in the models: below 1, a GPU waited."""
    seconds = (timings["caption_filter_s"] - timings["startup_s"]) * max(1, actors)
    return (timings["busy_s"]["caption"] + timings["busy_s"]["itm"]) / seconds if seconds > 0 else 0.0
