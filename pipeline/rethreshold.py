"""`capfilt rethreshold OUT --threshold T --out NEW`: the job's output at another ITM threshold, from
the stored scores, with no model and no GPU.

NEW becomes a complete output of the job's spec with `filter.threshold = T`. Its `downloads/` and
`_input.parquet` are hard links to OUT's files (copies across file systems): no space is spent, and
a later `retry-failed` on OUT, which replaces OUT's raw files, leaves NEW's as they were. Every
output shard is written again by the job's own `ShardWriter` from the scores OUT stores, so the
fates are decided by the very code that decided them the first time. NEW then reads like any job
output: `capfilt inspect` shows it, `capfilt run` with its spec finds it complete, and a further
rethreshold, even to a lower threshold that keeps images OUT filtered, finds their images.

NEW is built in a hidden sibling directory and renamed into place when complete, so an interrupted
rethreshold leaves no half-written NEW behind and can simply be run again.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.job_output import JobOutput, OutputError
from pipeline.layout import OutputLayout, write_json_atomically
from pipeline.manifest import build_manifest, check_accounting
from pipeline.shard_writer import ShardWriter, scores_from_records


def rethreshold(source: JobOutput, threshold: float, target: Path) -> dict[str, Any]:
    """Write the output for `threshold` into `target` (a new directory) and return its manifest."""
    if not 0 <= threshold <= 1:
        raise OutputError(f"--threshold: {threshold} is not an ITM probability between 0 and 1")
    names = source.require_complete("rethreshold it")
    target = target.resolve()
    if target == source.layout.root.resolve():
        raise OutputError(f"--out {target}: must be a new directory; the job's output stays as it is")
    if target.exists() and any(target.iterdir()):
        raise OutputError(f"--out {target}: not empty; rethreshold writes a new output directory")
    if names and not source.layout.downloads.is_dir():
        raise OutputError(
            f"{source.layout.downloads}: missing; the shards are written again from the raw shards "
            "(their images), so rethreshold needs the job's downloads/"
        )
    spec = source.spec
    spec = dataclasses.replace(
        spec,
        filter=dataclasses.replace(spec.filter, threshold=threshold),
        output=dataclasses.replace(spec.output, path=str(target)),
    )
    work = OutputLayout(target.with_name(f".{target.name}.partial"))
    shutil.rmtree(work.root, ignore_errors=True)
    work.root.mkdir(parents=True)
    _link_files(source.layout.downloads, work.downloads)
    if source.layout.prepared_input.exists():
        _link(source.layout.prepared_input, work.prepared_input)

    writer = ShardWriter(work, threshold, spec.fingerprint())
    # Writing a shard is Python-bound (a record per row), so shards go to worker processes.
    jobs = [(writer, source.layout, name) for name in names]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, min(os.cpu_count() or 1, len(names))), mp_context=spawn) as pool:
        reports = dict(zip(names, pool.map(_rewrite, jobs), strict=True))
    manifest = build_manifest(spec, source.input_rows, names, reports, {})
    manifest["rethresholded_from"] = {
        "path": str(source.layout.root.resolve()),
        "threshold": source.threshold,
    }
    check_accounting(manifest)
    write_json_atomically(work.manifest, manifest)
    if target.exists():
        target.rmdir()  # empty, checked above
    work.root.rename(target)
    return manifest


def _rewrite(job: tuple[ShardWriter, OutputLayout, str]) -> dict[str, Any]:
    writer, source, name = job
    return writer.write(name, scores_from_records(pq.read_table(source.shard_parquet(name)).to_pylist()))


def _link_files(source: Path, target: Path) -> None:
    target.mkdir()
    if source.is_dir():
        for path in source.iterdir():
            if path.is_file():
                _link(path, target / path.name)


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed there
        shutil.copy2(source, target)
