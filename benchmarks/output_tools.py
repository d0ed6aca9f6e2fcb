"""How fast `inspect`, its HTML report and `rethreshold` are on an output of LAION-like shard sizes.

    python benchmarks/output_tools.py [--shards 20] [--rows 10000] [--dir /tmp/capfilt-bench]

Builds a job output without models or network: raw shards shaped as img2dataset writes them (70 %
downloaded, a 1 KB JPEG each; the rest failed), scores drawn at random, and output shards written
by the pipeline's own `ShardWriter`. Then times the three tools on it and prints rows per second and
the process's peak memory. Numbers depend on the disk; run it on the one your outputs live on.
"""

from __future__ import annotations

import argparse
import io
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from pipeline.inspect.inspection import inspect_output
from pipeline.inspect.report_html import write_report
from pipeline.job.rethreshold import rethreshold
from pipeline.output.job_output import JobOutput
from pipeline.output.manifest import build_manifest
from pipeline.output.shard_writer import Scores, ShardWriter
from pipeline.spec.config import spec_from_dict
from pipeline.spec.layout import OutputLayout, write_json_atomically


def build_output(root: Path, shards: int, rows: int, seed: int = 0) -> int:
    """Write a complete synthetic job output under root/output; return its input rows."""
    rng = np.random.default_rng(seed)
    image = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 80, 40)).save(image, format="JPEG")
    jpeg = image.getvalue()
    url_list = root / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://example.invalid/x.jpg"], "caption": ["x"]}), url_list)
    spec = spec_from_dict({"input": {"url_list": str(url_list)}, "output": {"path": str(root / "output")}})
    spec = spec_from_dict({**spec.to_dict(), "output": {"path": str(root / "output"), "shard_size": rows}})
    layout = OutputLayout(Path(spec.output.path))
    layout.downloads.mkdir()
    writer = ShardWriter(layout, spec.filter.threshold, spec.fingerprint())
    names, reports = [], {}
    for s in range(shards):
        name = f"{s:05d}"
        keys = [f"{s:05d}{i:05d}" for i in range(rows)]
        downloaded = rng.random(rows) < 0.7
        raw = [_raw_row(k, ok) for k, ok in zip(keys, downloaded, strict=True)]
        pq.write_table(pa.Table.from_pylist(raw), layout.raw_parquet(name))
        with wds.TarWriter(str(layout.raw_tar(name))) as tar:  # as img2dataset writes it
            for k in (k for k, ok in zip(keys, downloaded, strict=True) if ok):
                tar.write({"__key__": k, "jpg": jpeg, "json": b"{}"})
        web = rng.beta(0.6, 0.4, rows)
        synthetic = rng.beta(3, 0.5, rows)
        scores = {k: Scores("", [f"synthetic caption {k}"], float(w), [float(y)])
                  for k, ok, w, y in zip(keys, downloaded, web, synthetic, strict=True) if ok}  # fmt: skip
        reports[name] = writer.write(name, scores)
        names.append(name)
    write_json_atomically(layout.manifest, build_manifest(spec, shards * rows, names, reports, {}))
    return shards * rows


def _raw_row(key: str, downloaded: bool) -> dict:
    """A row of img2dataset's shard Parquet, with the columns capfilt carries through it."""
    url = f"http://example.invalid/{key}.jpg"
    size = 64 if downloaded else None
    return {
        "capfilt_url": url, "capfilt_caption": f"web caption {key}", "capfilt_fate": None,
        "capfilt_error": None, "url": url, "key": key,
        "status": "success" if downloaded else "failed_to_download",
        "error_message": None if downloaded else "timed out", "width": size, "height": size,
        "original_width": size, "original_height": size, "sha256": "0" * 64 if downloaded else None,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--rows", type=int, default=10000, help="rows per shard")
    parser.add_argument("--dir", default="/tmp/capfilt-bench")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)

    started = time.perf_counter()
    rows = build_output(root, args.shards, args.rows)
    print(f"built {rows} rows in {args.shards} shards in {time.perf_counter() - started:.1f} s")
    output = JobOutput.open(root / "output")

    started = time.perf_counter()
    found = inspect_output(output)
    seconds = time.perf_counter() - started
    print(f"inspect:      {seconds:6.2f} s  {rows / seconds:>10,.0f} rows/s  (kept {found.counts['kept']})")
    started = time.perf_counter()
    write_report(found, output, root / "report.html")
    size = (root / "report.html").stat().st_size
    print(f"html report:  {time.perf_counter() - started:6.2f} s  ({size / 1e6:.1f} MB)")
    started = time.perf_counter()
    manifest = rethreshold(output, 0.8, root / "strict")
    seconds = time.perf_counter() - started
    kept = manifest["counts"]["kept"]
    print(f"rethreshold:  {seconds:6.2f} s  {rows / seconds:>10,.0f} rows/s  (kept {kept} at 0.8)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory of this process: {peak:.0f} MB")


if __name__ == "__main__":
    main()
