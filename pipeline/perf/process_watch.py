"""Peak memory of a process tree and the machine's CPU use while it runs, sampled from /proc.

A job's driver is the process `capfilt run` starts; the local Ray it starts (GCS, raylet) and the
Ray workers (stage tasks and actors, named `ray::...`) are its descendants. Sampling their resident
memory a few times a second finds the peaks a streaming pipeline must keep flat. A peak between two
samples can be missed, so the interval is short next to a chunk's time. RSS counts pages shared
with Ray's object store in every process that maps them; the figures are an upper bound, compared
with each other, not added to a machine's total.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import psutil

MB = 1024 * 1024


@dataclass
class Peaks:
    driver_mb: float = 0.0
    worker_mb: float = 0.0  # the largest single Ray worker
    workers_total_mb: float = 0.0  # all Ray workers together, at one sample
    ray_system_mb: float = 0.0  # GCS, raylet, dashboard and the like, together
    cpu_busy: float = 0.0  # share of all the machine's cores busy over the watch

    def memory_mb(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in vars(self).items() if k.endswith("_mb")}


class ProcessWatch:
    """Samples `pid` and its descendants every `interval` seconds until `stop()` (or the `with` ends)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peaks = Peaks()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._cpu_start = psutil.cpu_times()

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> Peaks:
        if not self._done.is_set():
            self._done.set()
            self._thread.join()
            self.peaks.cpu_busy = busy_share(self._cpu_start, psutil.cpu_times())
        return self.peaks

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        try:
            tree = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        workers, system = [], 0.0
        for process in tree:
            try:
                rss = process.memory_info().rss / MB
                name = (process.cmdline() or [""])[0]
            except psutil.Error:  # it ended between the listing and the reading
                continue
            if process.pid == self.root.pid:
                self.peaks.driver_mb = max(self.peaks.driver_mb, rss)
            elif name.startswith("ray::"):
                workers.append(rss)
            else:
                system += rss
        self.peaks.worker_mb = max(self.peaks.worker_mb, *workers, 0.0)
        self.peaks.workers_total_mb = max(self.peaks.workers_total_mb, sum(workers))
        self.peaks.ray_system_mb = max(self.peaks.ray_system_mb, system)


def busy_share(start: psutil._common.scputimes, end: psutil._common.scputimes) -> float:
    """1 - idle share of all the CPU time that passed between two `psutil.cpu_times()` readings."""
    total = sum(end) - sum(start)
    idle = (end.idle + getattr(end, "iowait", 0.0)) - (start.idle + getattr(start, "iowait", 0.0))
    return 1 - idle / total if total > 0 else 0.0


def cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count; macOS has no
    CPU sets, so there it is the machine's count)."""
    affinity = getattr(psutil.Process(), "cpu_affinity", None)
    return (len(affinity()) if affinity else 0) or psutil.cpu_count() or 1
