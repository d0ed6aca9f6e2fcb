"""Where a run's time went: wall seconds of the stream, busy seconds per stage.

Download, caption/filter and write run as one stream (`job.runner`): `caption_filter_s` is its wall
time, `download_s` the moment in it when the last shard was on disk, `first_commit_s` the moment the
first shard was committed (what a person watching a long job waits for), and `shards_in_flight` the
bound on shards between download and commit with the most the run ever had.

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

STAGES = ("download", "preprocess", "caption", "itm", "write")
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
    first_commit_s: float | None = None
    images: int = 0
    busy_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    shards_in_flight: dict[str, int] = field(default_factory=dict)

    def add_download(self, chunk: dict[str, Any], since_start: float) -> None:
        """Count a shard's download once (its chunk 0 carries it); `since_start`: when it ended."""
        if chunk["chunk"] == 0:
            self.busy_s["download"] += float(chunk["download_s"])
            self.download_s = max(self.download_s, since_start)

    def add_commit(self, seconds: float, since_start: float) -> None:
        self.busy_s["write"] += seconds
        self.first_commit_s = min(self.first_commit_s or since_start, since_start)

    def add_chunk(self, chunk: dict[str, Any], since_start: float) -> int:
        """Count a scored chunk's images and its stages' seconds. `since_start`: seconds from the
        phase's start to the moment its actor was ready (`time.time()` of two processes, on one
        clock where they share a machine, NTP-close where they do not, hence never below 0).
        Seconds spent on a failed attempt before a split or a retry are not counted. Returns the
        chunk's images."""
        since_start = max(0.0, since_start)
        self.startup_s = since_start if self.startup_s is None else min(self.startup_s, since_start)
        images = sum(1 for err in chunk["decode_errors"] if not err)
        self.images += images
        for stage in ("preprocess", "caption", "itm"):
            self.busy_s[stage] += float(chunk[f"{stage}_s"])
        return images

    def steady_images_per_s(self) -> float:
        return steady_images_per_s(self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        return {
            "download_s": round(self.download_s, 3),
            "caption_filter_s": round(self.caption_filter_s, 3),
            "startup_s": round(self.startup_s or 0.0, 3),
            "first_commit_s": round(self.first_commit_s or 0.0, 3),
            "images": self.images,
            "busy_s": {k: round(v, 3) for k, v in self.busy_s.items()},
            "shards_in_flight": self.shards_in_flight,
        }

    def summary(self) -> str:
        """One log line: the phase's rate and where the busy time went."""
        busy = ", ".join(f"{k} {v:.1f} s" for k, v in self.busy_s.items())
        return (f"capfilt: first shard committed after {self.first_commit_s or 0.0:.1f} s, last shard "
                f"downloaded after {self.download_s:.1f} s; {self.images} images in "
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
