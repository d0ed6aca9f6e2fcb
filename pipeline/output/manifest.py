"""manifest.json: the job's record. Spec as run, versions, models, per-shard status and counts.

It is rebuilt from the shard reports at the end of every run (and of a resumed one), so it always
describes what is on disk. The per-fate counts must add up to the input rows once every shard is
done; `check_accounting` is the guard that says so. `duplicate_urls` comes from the prepared input
list, where `url_list.prepare` counted it.
"""

from __future__ import annotations

import importlib.metadata
import time
from typing import Any

from pipeline import __version__
from pipeline.ingest.prepared_list import PreparedList
from pipeline.spec.config import JobSpec
from pipeline.spec.fates import add_counts, count_fates
from pipeline.spec.layout import OutputLayout, write_json_atomically
from pipeline.spec.records import SCHEMA_VERSION

DONE = "done"
PENDING = "pending"
FAILED = "failed"


def package_versions() -> dict[str, str]:
    found = {"capfilt": __version__}
    for name in ("torch", "transformers", "ray", "img2dataset", "webdataset", "pyarrow"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def build_manifest(
    spec: JobSpec,
    input_rows: int,
    shard_names: list[str],
    reports: dict[str, dict[str, Any]],
    errors: dict[str, str],
    actors: list[dict[str, Any]] | tuple[()] = (),
    timings: dict[str, Any] | None = None,
    duplicate_urls: int | None = None,
    progress: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest. `duplicate_urls`, when not given, is read from the prepared input list under
    `spec.output.path` (null when there is none there)."""
    shards = []
    totals = count_fates([])
    for name in shard_names:
        report = reports.get(name)
        if report is not None:
            totals = add_counts(totals, report["counts"])
            shards.append({"shard": name, "status": DONE, "rows": report["rows"], "counts": report["counts"]})
        else:
            status = FAILED if name in errors else PENDING
            shards.append({"shard": name, "status": status, "error": errors.get(name)})
    complete = all(s["status"] == DONE for s in shards)
    return {
        "capfilt_version": __version__,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "spec": spec.to_dict(),
        "fingerprint": spec.fingerprint(),
        "shard_schema": SCHEMA_VERSION,  # of the Parquet columns (`schemas/shard.schema.json`)
        "models": {"captioner": spec.captioner.model, "filter": spec.filter.model},
        "versions": package_versions(),
        "input_rows": input_rows,
        # Rows whose URL an earlier row had: each is still its own sample, downloaded and scored.
        "duplicate_urls": duplicate_urls if duplicate_urls is not None else _duplicate_urls(spec),
        "complete": complete,
        "counts": totals,
        "shards": shards,
        # Where the run that wrote this manifest scored its chunks: one entry per CapFilt actor.
        "actors": list(actors),
        # Where that run's time went (`pipeline.core.timings`); empty for a manifest no run wrote.
        "timings": timings or {},
        # How far the run that wrote this manifest got (`pipeline.job.progress`), rewritten while it
        # runs; empty for a manifest no run wrote.
        "progress": progress or {},
    }


def write_manifest(layout: OutputLayout, manifest: dict[str, Any]) -> None:
    """The manifest, and first `shards/sizes.json`, the samples in each tar: {"00000.tar": 812, ...}
    for the shards written so far that kept a row (a shard that kept none has no tar). Trainers that
    read img2dataset-style folders (OpenCLIP's `--dataset-type webdataset`) count the samples from it."""
    sizes = {
        f"{s['shard']}.tar": s["counts"]["kept"]
        for s in manifest["shards"]
        if s["status"] == DONE and s["counts"]["kept"]
    }
    path = layout.shards / "sizes.json"
    if not path.exists() or path.read_json() != sizes:  # a run that finds all done rewrites nothing
        layout.shards.mkdir()
        write_json_atomically(path, sizes)
    write_json_atomically(layout.manifest, manifest)


def _duplicate_urls(spec: JobSpec) -> int | None:
    try:
        return PreparedList(OutputLayout(spec.output.path).prepared_input).duplicate_urls()
    except (OSError, ValueError, ImportError):  # an output moved, a backend not installed here
        return None


def check_accounting(manifest: dict[str, Any]) -> None:
    """A complete job accounts for every input row exactly once; anything else is a bug."""
    if manifest["complete"] and sum(manifest["counts"].values()) != manifest["input_rows"]:
        raise RuntimeError(
            f"accounting error: fates sum to {sum(manifest['counts'].values())}, "
            f"input has {manifest['input_rows']} rows"
        )
