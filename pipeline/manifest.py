"""manifest.json: the job's record. Spec as run, versions, models, per-shard status and counts.

It is rebuilt from the shard reports at the end of every run (and of a resumed one), so it always
describes what is on disk. The per-fate counts must add up to the input rows once every shard is
done; `check_accounting` is the guard that says so.
"""

from __future__ import annotations

import importlib.metadata
import time
from typing import Any

from pipeline import __version__
from pipeline.config import JobSpec
from pipeline.fates import add_counts, count_fates

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
) -> dict[str, Any]:
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
        "models": {"captioner": spec.captioner.model, "filter": spec.filter.model},
        "versions": package_versions(),
        "input_rows": input_rows,
        "complete": complete,
        "counts": totals,
        "shards": shards,
        # Where the run that wrote this manifest scored its chunks: one entry per CapFilt actor.
        "actors": list(actors),
        # Where that run's time went (`pipeline.timings`); empty for a manifest no run wrote.
        "timings": timings or {},
    }


def check_accounting(manifest: dict[str, Any]) -> None:
    """A complete job accounts for every input row exactly once; anything else is a bug."""
    if manifest["complete"] and sum(manifest["counts"].values()) != manifest["input_rows"]:
        raise RuntimeError(
            f"accounting error: fates sum to {sum(manifest['counts'].values())}, "
            f"input has {manifest['input_rows']} rows"
        )
