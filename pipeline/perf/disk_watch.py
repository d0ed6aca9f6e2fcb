"""The most bytes a directory held while something ran: what a job's raw shards and output take on
disk at their peak, sampled, since nothing else records it."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path


class DiskWatch:
    """The most bytes under a directory, sampled every half second while the `with` runs."""

    def __init__(self, root: str | Path, interval: float = 0.5) -> None:
        self.root, self.interval, self.peak = Path(root), interval, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DiskWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, _bytes_under(self.root))
        self.peak = max(self.peak, _bytes_under(self.root))


def _bytes_under(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):  # renamed or removed between the listing and the stat
                total += os.stat(os.path.join(folder, name)).st_size
    return total
