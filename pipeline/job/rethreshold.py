"""`capfilt rethreshold OUT --threshold T [--keep top_k --k K --by itc] [--near-threshold C] --out NEW`:
the job's output at another ITM threshold, keep rule or near-dedup threshold, from the stored scores,
pixel hashes and embeddings, with no model and no GPU.

NEW becomes a complete output of the job's spec with `filter.threshold = T` (and `filter.keep`). The
files of its `downloads/` and `_input/` are hard links to OUT's files (copies across file systems): no
space is spent, and a later `retry-failed` on OUT, which replaces OUT's raw files, leaves NEW's as they
were. Every output shard is written again by the job's own `ShardWriter` from the scores OUT stores,
so the fates are decided by the very code that decided them the first time; dedup decides again over
the rows the new rule keeps, in input order, from the stored pixel hashes and embeddings. NEW then
reads like any job output: `capfilt inspect` shows it, `capfilt run` with its spec finds it complete,
and a further rethreshold, even to a lower threshold that keeps images OUT filtered, finds their
images.

On a local or shared filesystem NEW is built in a hidden sibling directory and renamed into place
when complete, so an interrupted rethreshold leaves no half-written NEW behind and can simply be run
again. An object store has no atomic rename of a prefix, so there NEW is built in place, the raw
files are server-side copies (`fs.copy`) instead of hard links, and its `manifest.json` is written
last: a NEW without a manifest is not an output (`capfilt inspect` refuses it; the loader, given
the prefix, does not check), and rethreshold into it again starts over, which it does only where its
own in-progress marker (`.capfilt-rethreshold`, written first) says the prefix is its own. A bucket
itself is refused as NEW.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.core.storage import Location, read_parquet
from pipeline.curate.dedup import DuplicateIndex, KeptImage
from pipeline.job.output_guard import claim_output
from pipeline.output.job_output import JobOutput, OutputError
from pipeline.output.manifest import build_manifest, check_accounting, write_manifest
from pipeline.output.shard_writer import Scores, ShardWriter, scores_from_records
from pipeline.spec.config import DedupSpec, KeepSpec
from pipeline.spec.layout import IN_PROGRESS, OutputLayout


def rethreshold(
    source: JobOutput,
    threshold: float | None,
    target: str | Path | Location,
    keep: KeepSpec | None = None,
    dedup: DedupSpec | None = None,
) -> dict[str, Any]:
    """Write the output for `threshold`, the keep rule `keep` and the dedup rule `dedup` (None: the
    job's) into `target` (a new directory or prefix, a local path or an fsspec URI) and return its
    manifest."""
    if threshold is None and keep is None and dedup is None:
        raise OutputError(
            "name what changes: --threshold, the keep rule (--keep, --k, --by) or --near-threshold"
        )
    near = dedup.near_threshold if dedup is not None else None
    if near is not None and not 0 < near <= 1:
        raise OutputError(f"--near-threshold: {near} is not a cosine in (0, 1]")
    if near is not None and not source.spec.output.image_embeddings:
        raise OutputError(
            f"--near-threshold: {source.layout.root}: its job did not store image embeddings "
            "(output.image_embeddings: false), which near dedup compares"
        )
    if keep is not None and keep.k < 1:
        raise OutputError(f"--k: {keep.k}: keep at least 1 caption per image")
    if keep is not None and keep.by == "itc" and not source.has_itc_scores():
        raise OutputError(
            f"--by itc: {source.layout.root}: its shards were written before capfilt stored ITC scores; "
            "rank by itm, or run its job again with this capfilt"
        )
    threshold = source.threshold if threshold is None else threshold
    if not 0 <= threshold <= 1:
        raise OutputError(f"--threshold: {threshold} is not an ITM probability between 0 and 1")
    names = source.require_complete("rethreshold it")
    target = Location.of(target).resolve()
    root = source.layout.root.resolve()
    if target == root:
        raise OutputError(f"--out {target}: must be a new directory; the job's output stays as it is")
    if target.uri.startswith(root.uri.rstrip("/") + "/"):
        # Inside OUT it would be a stranger there: `capfilt run` on OUT then refuses it, and its
        # --overwrite would delete the downloads too.
        raise OutputError(
            f"--out {target}: inside the job's output {root}; write it beside it, e.g. "
            f"{root.parent / (root.name + '-' + target.name)}"
        )
    if target.is_bucket:
        raise OutputError(f"--out {target}: name a prefix inside the bucket (e.g. {target.uri}/new)")
    if any(target.iterdir()) and not _interrupted_here(target):
        raise OutputError(f"--out {target}: not empty; rethreshold writes a new output directory")
    source.require_downloads(names, "rethreshold (it writes the shards again from their images)")
    spec = source.spec
    spec = dataclasses.replace(
        spec,
        filter=dataclasses.replace(
            spec.filter, threshold=threshold, keep=keep or spec.filter.keep, dedup=dedup or spec.filter.dedup
        ),
        output=dataclasses.replace(spec.output, path=target.uri),
    )
    # Locally: built aside and renamed at the end. On an object store: in place, manifest last.
    work = OutputLayout(target.with_name(f".{target.name}.partial") if target.local else target)
    # Emptied and locked (`output_guard`): a second rethreshold into the same NEW is refused, not mixed in.
    with claim_output(work.root, overwrite=True, key="--out", log=lambda _: None):
        if not target.local:  # first, so that only a prefix this wrote is ever started over
            (work.root / IN_PROGRESS).write_text(source.layout.root.resolve().uri)
        old, new = source.layout, work
        for directory, into in [(old.downloads, new.downloads), (old.prepared_input, new.prepared_input)]:
            into.mkdir()
            for path in directory.files():
                path.link_to(into / path.name)

        writer = ShardWriter.of(spec, work, source.embedding_size())
        index = DuplicateIndex(spec.filter.dedup, source.embedding_size())
        # Reading a shard's rows and writing it are Python-bound (a record per row), so both go to worker
        # processes; between them dedup decides, here, in input order, over what the new rule keeps.
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max(1, min(os.cpu_count() or 1, len(names))), mp_context=spawn) as pool:
            shards = [(writer, source.layout, name) for name in names]
            kept = pool.map(_kept_images, shards) if index.active else [[] for _ in names]
            jobs = [(*shard, index.decide(images)) for shard, images in zip(shards, kept, strict=True)]
            reports = dict(zip(names, pool.map(_rewrite, jobs), strict=True))
        duplicates = source.manifest.get("duplicate_urls")  # the new directory has no prepared list
        manifest = build_manifest(spec, source.input_rows, names, reports, {}, duplicate_urls=duplicates)
        manifest["rethresholded_from"] = {
            "path": source.layout.root.resolve().uri,
            "threshold": source.threshold,
            "keep": dataclasses.asdict(source.spec.filter.keep),
            "dedup": dataclasses.asdict(source.spec.filter.dedup),
        }
        check_accounting(manifest)
        write_manifest(work, manifest)
        if target.local:
            if target.exists():
                os.rmdir(target)  # empty, checked above
            work.root.rename(target)
        else:
            (work.root / IN_PROGRESS).unlink(missing_ok=True)
        return manifest


def _interrupted_here(target: Location) -> bool:
    """An object-store NEW that an interrupted rethreshold left: its in-progress marker and capfilt's
    names, no manifest (built in place there, so this is what the hidden partial directory is
    locally). Without the marker a prefix is someone's data, and is never deleted."""
    names = {p.name for p in target.iterdir()}
    return (
        not target.local and IN_PROGRESS in names and names <= {IN_PROGRESS, "downloads", "shards", "_input"}
    )


def _kept_images(shard: tuple[ShardWriter, OutputLayout, str]) -> list[KeptImage]:
    writer, source, name = shard
    return writer.kept_images(_stored_scores(source, name))


def _rewrite(job: tuple[ShardWriter, OutputLayout, str, dict[str, str]]) -> dict[str, Any]:
    writer, source, name, duplicates = job
    return writer.write(name, _stored_scores(source, name), duplicates)


def _stored_scores(source: OutputLayout, name: str) -> dict[str, Scores]:
    return scores_from_records(read_parquet(source.shard_parquet(name)).to_pylist())
