"""How far a running job is: the figures a person watching it wants, and nothing Ray.

The runner feeds it (a shard downloaded, images scored, a shard committed or failed); the console
shows `line()` live, and the manifest carries `figures()` while the job runs and after, which is
where `capfilt status` reads a cluster job's progress. Rates are over this run's wall time, so a
resumed run's figures are its own; shards done by an earlier run count as committed from the start.
The ETA extrapolates this run's commits since its first (the models' loading and the first
download are paid once, before it): unknown until the first commit.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from pipeline.spec.fates import Fate


class JobProgress:
    """Thread-safe counters of one run. `clock` is the seam a test sets."""

    def __init__(self, shards: int, done_before: int, rows: int, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self.shards = shards
        self._done_before = done_before
        self.input_rows = rows
        self._committed = 0  # by this run
        self._first_commit_at = 0.0
        self._failed = 0
        self._rows_downloaded = 0
        self._images_scored = 0
        self._rows_committed = 0
        self._kept = 0

    def downloaded(self, rows: int) -> None:
        with self._lock:
            self._rows_downloaded += rows

    def scored(self, images: int) -> None:
        with self._lock:
            self._images_scored += images

    def committed(self, report: dict[str, Any]) -> None:
        """A shard's writer report: its `rows` and its `counts` by fate."""
        with self._lock:
            self._committed += 1
            if self._committed == 1:
                self._first_commit_at = self._clock()
            self._rows_committed += int(report["rows"])
            self._kept += int(report["counts"].get(Fate.KEPT, 0))

    def failed(self) -> None:
        with self._lock:
            self._failed += 1

    def figures(self, running: bool = True) -> dict[str, Any]:
        """The manifest's `progress`: counts, rates per second of this run, kept % of the rows in
        the shards this run committed, and the ETA in seconds (None: no commit yet, or done)."""
        with self._lock:
            now = self._clock()
            elapsed = max(now - self._started, 1e-9)
            committed = self._done_before + self._committed
            left = self.shards - committed - self._failed
            if self._committed > 1:
                per_shard: float | None = (now - self._first_commit_at) / (self._committed - 1)
            else:
                per_shard = elapsed if self._committed else None
            eta = left * per_shard if running and per_shard is not None and left else None
            kept = 100 * self._kept / self._rows_committed if self._rows_committed else None
            return {
                "running": running,
                "elapsed_s": round(elapsed, 1),
                "shards": {"total": self.shards, "committed": committed, "failed": self._failed},
                "input_rows": self.input_rows,
                "rows_downloaded": self._rows_downloaded,
                "images_scored": self._images_scored,
                "rows_downloaded_per_s": round(self._rows_downloaded / elapsed, 1),
                "images_scored_per_s": round(self._images_scored / elapsed, 1),
                "kept_percent": None if kept is None else round(kept, 1),
                "eta_s": None if eta is None else round(eta),
            }

    def line(self, running: bool = True) -> str:
        return progress_line(self.figures(running))


def progress_line(figures: dict[str, Any]) -> str:
    """One line of a `figures()` dict, as the console and `capfilt status` show it."""
    shards = figures["shards"]
    parts = [f"shards {shards['committed']}/{shards['total']} committed"]
    if shards["failed"]:
        parts[0] += f" ({shards['failed']} failed)"
    parts.append(f"{figures['rows_downloaded_per_s']:.0f} rows/s downloaded")
    parts.append(f"{figures['images_scored_per_s']:.0f} images/s scored")
    kept = figures["kept_percent"]
    parts.append(f"kept {kept:.1f}%" if kept is not None else "kept -")
    if figures["running"]:
        eta = figures["eta_s"]
        parts.append(f"ETA {clock_time(eta)}" if eta is not None else "ETA -")
    parts.append(f"{clock_time(figures['elapsed_s'])} elapsed")
    return " | ".join(parts)


def clock_time(seconds: float) -> str:
    """H:MM:SS, or M:SS under an hour."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
