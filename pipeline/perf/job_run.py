"""One job run as a user runs it: `capfilt run JOB.yaml` in its own process, watched.

Its own process, so that the driver's memory is the job's alone (not the bench's models and
decoded batches), and the local Ray it starts is its own.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.perf.process_watch import Peaks, ProcessWatch
from pipeline.spec.config import JobSpec
from pipeline.spec.layout import OutputLayout


@dataclass(frozen=True)
class JobRun:
    wall_s: float
    started_at: float  # time.time() when `capfilt run` was started
    manifest: dict[str, Any]
    peaks: Peaks
    log: str

    @property
    def timings(self) -> dict[str, Any]:
        return self.manifest["timings"]


def run_watched(spec: JobSpec, job_file: Path, timeout_s: float | None = None) -> JobRun:
    """Run the job to the end in a child process; raise with its log's tail if it did not complete,
    or if it was still running after `timeout_s` (then it is killed)."""
    job_file.write_text(yaml.safe_dump(spec.to_dict()))
    log_file = job_file.with_suffix(".log")
    start, started_at = time.perf_counter(), time.time()
    with log_file.open("w") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", str(job_file)], stdout=log, stderr=subprocess.STDOUT
        )
        with ProcessWatch(child.pid) as watch:
            try:
                code: int | str = child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                code = f"nothing: killed after {timeout_s:g} s"
    wall = time.perf_counter() - start
    text = log_file.read_text()
    if code != 0:
        raise RuntimeError(f"capfilt run {job_file} exited {code}:\n" + "\n".join(text.splitlines()[-30:]))
    manifest = OutputLayout(spec.output.path).manifest.read_json()
    return JobRun(wall, started_at, manifest, watch.peaks, text)


def keeping_downloads(spec: JobSpec) -> JobSpec:
    """The job with `output.keep_downloads: true`: its raw shards stay for a run over them after it."""
    return dataclasses.replace(spec, output=dataclasses.replace(spec.output, keep_downloads=True))


def rerun_over_downloads(spec: JobSpec, job_file: Path) -> JobRun:
    """Caption/filter alone: the same job run again over the raw shards under its `downloads/`, its
    committed shards and manifest removed, so that every shard is scored and written with nothing to
    fetch. The raw shards are kept, for whatever reads them next."""
    layout = OutputLayout(spec.output.path)
    layout.shards.rmtree()
    layout.manifest.unlink()
    return run_watched(keeping_downloads(spec), job_file)
