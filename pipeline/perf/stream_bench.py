"""`capfilt bench stream`: what running a job as a stream buys, on a loopback web.

1. First shard: the same job on a short and a long list (600 and 9,600 URLs, every request answered
   after 40 ms, 200-row shards): seconds from `capfilt run` to its first committed shard (the first
   `done.json`). A stream commits shard 0 after downloading a few shards, whatever the list's length.
2. Overlap: a 20,000-URL job end to end against its two halves alone, in the same run: the download
   alone (plain img2dataset on the same prepared list, a process per core) and caption/filter alone
   (the same job run again over its own downloads, its shards removed). End to end within 1.15x of
   the slower half means they overlap; the sum would mean they take turns.
3. Prepare: a 1,000,000-row list (CSV and Parquet, on local disk, no Ray): seconds until input shard
   00000 is prepared, which is all the first download waits for, against the whole list's prepare,
   which it waited for before the list was prepared shard by shard.
4. Memory and disk: the driver's peak RSS at each size; the peak bytes of raw shards under
   `downloads/` in the first-shard runs (a raw shard goes once committed, so the peak follows the
   shards in flight, not the list), and under the whole output in the overlap run (which runs with
   `output.keep_downloads: true`, for its second half).

Each job runs as `capfilt run` in a child process (`job_run`), with the tiny models and one actor.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline.core.storage import Location
from pipeline.curate.tiny_models import IMAGE_SIZE, write_tiny_models
from pipeline.ingest.prepared_list import PreparedList
from pipeline.ingest.url_list import ListPreparation
from pipeline.ingest.urlpolicy import NetworkPolicy
from pipeline.perf.bench_web import bench_site, bench_spec
from pipeline.perf.disk_watch import DiskWatch
from pipeline.perf.harness import machine
from pipeline.perf.job_run import JobRun, keeping_downloads, rerun_over_downloads, run_watched
from pipeline.perf.plain_download import plain_download_s
from pipeline.perf.process_watch import busy_share
from pipeline.spec.config import InputSpec
from pipeline.spec.layout import OutputLayout, shard_name

FIRST_SHARD_RATIO_TARGET = 1.3  # long list's first commit over the short list's
FIRST_SHARD_SHARE_TARGET = 0.5  # the long list's first commit, as a share of its run
OVERLAP_TARGET = 1.15  # end to end over the slower half


@dataclass(frozen=True)
class StreamSettings:
    work: Path
    first_rows: tuple[int, int] = (600, 9600)
    first_shard_size: int = 200
    request_s: float = 0.04
    overlap_rows: int = 20000
    overlap_shard_size: int = 1000
    batch_size: int = 64
    prepare_rows: int = 1_000_000
    prepare_shard_size: int = 10_000  # output.shard_size's default


def run_stream_bench(settings: StreamSettings, log: Any = print) -> dict[str, Any]:
    """Every figure of the bench, as one JSON-ready dict."""
    models = write_tiny_models(settings.work / "tiny-models")
    report: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    report["settings"] = _settings(settings)
    first = {}
    for rows in settings.first_rows:
        log(f"stream: {rows} rows at {settings.request_s * 1000:.0f} ms a request ...")
        first[str(rows)] = _first_shard(settings, models, rows)
    short, long = (first[str(r)] for r in settings.first_rows)
    report["first_shard"] = {
        **first,
        "ratio": round(long["first_commit_s"] / short["first_commit_s"], 3),
        "share_of_long_run": round(long["first_commit_s"] / long["wall_s"], 3),
    }
    log(f"stream: preparing a {settings.prepare_rows}-row list ...")
    prepare_at = settings.work / "prepare"
    report["prepare"] = prepare_timeline(prepare_at, settings.prepare_rows, settings.prepare_shard_size)
    log(f"stream: {settings.overlap_rows} rows end to end, then each half alone ...")
    report["overlap"] = _overlap(settings, models)
    return report


def _first_shard(settings: StreamSettings, models: Any, rows: int) -> dict[str, Any]:
    root = settings.work / f"first-{rows}"
    shutil.rmtree(root, ignore_errors=True)
    site, url_list = bench_site(rows, request_s=settings.request_s)
    try:
        spec = bench_spec(root, url_list, models, IMAGE_SIZE, settings.batch_size, settings.first_shard_size)
        with DiskWatch(OutputLayout(spec.output.path).downloads.path) as raw:
            run = run_watched(spec, root / "job.yaml")
        return {**_figures(run, spec.output.path), "peak_raw_mb": raw.peak_mb()}
    finally:
        site.stop()


def _overlap(settings: StreamSettings, models: Any) -> dict[str, Any]:
    root = settings.work / f"overlap-{settings.overlap_rows}"
    shutil.rmtree(root, ignore_errors=True)
    site, url_list = bench_site(settings.overlap_rows)
    try:
        shard_size = settings.overlap_shard_size
        spec = bench_spec(root, url_list, models, IMAGE_SIZE, settings.batch_size, shard_size)
        spec = keeping_downloads(spec)  # for caption/filter alone over them below
        with DiskWatch(root / "output") as disk:
            both = run_watched(spec, root / "job.yaml")
        alone = rerun_over_downloads(spec, root / "job-again.yaml")
        before = psutil.cpu_times()
        download = round(plain_download_s(spec, root / "plain-img2dataset"), 3)
        download_busy = busy_share(before, psutil.cpu_times())
    finally:
        site.stop()
    stream, capfilt = both.timings["caption_filter_s"], alone.timings["caption_filter_s"]
    slower, faster = max(download, capfilt), min(download, capfilt)
    return {
        "rows": settings.overlap_rows,
        "end_to_end_s": stream,
        "download_alone_s": download,
        "caption_filter_alone_s": capfilt,
        "ratio_to_slower_half": round(stream / slower, 3),
        # 1: the faster half was hidden entirely behind the slower; 0: the halves took turns.
        "overlap_fraction": round((download + capfilt - stream) / faster, 3),
        # The machine's CPU busy share in each: where both halves need the same cores, end to end
        # cannot beat the sum of their CPU work over the cores, whatever the overlap.
        "cpu_busy": {
            "end_to_end": round(both.peaks.cpu_busy, 3),
            "download_alone": round(download_busy, 3),
            "caption_filter_alone": round(alone.peaks.cpu_busy, 3),
        },
        "end_to_end": _figures(both, spec.output.path),
        "peak_disk_mb": disk.peak_mb(),
    }


def prepare_timeline(work: Path, rows: int, shard_size: int) -> dict[str, dict[str, float]]:
    """Per list format: seconds until input shard 00000 is written and until the list is prepared
    (counting the rows included), as the job's driver thread prepares it."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    urls = [f"http://127.0.0.1:9/images/{i % 97:02d}/photo-{i:09d}.jpg" for i in range(rows)]
    table = pa.table({"url": urls, "caption": [f"a photograph of item {i} on a table" for i in range(rows)]})
    pq.write_table(table, work / "urls.parquet")
    pa_csv.write_csv(table, work / "urls.csv")
    timeline = {}
    for fmt in ("csv", "parquet"):
        out = PreparedList(Location.of(work / f"_input-{fmt}"))
        start = time.perf_counter()
        spec = InputSpec(str(work / f"urls.{fmt}"), fmt)
        policy = NetworkPolicy(allow_private_networks=True)
        preparation = ListPreparation(spec, policy, out, shard_size, "bench", downloaded=False)
        counted = time.perf_counter() - start
        writer = threading.Thread(target=preparation.write)
        writer.start()
        while not out.shard(shard_name(0)).exists() and writer.is_alive():
            time.sleep(0.002)
        first = time.perf_counter() - start
        writer.join()
        if not preparation.done:
            raise RuntimeError(f"preparing the {fmt} list failed")
        whole = time.perf_counter() - start
        timeline[fmt] = {
            "rows": preparation.rows,
            "count_s": round(counted, 3),
            "first_shard_s": round(first, 3),
            "whole_list_s": round(whole, 3),
            "first_over_whole": round(first / whole, 4),
        }
    return timeline


def _figures(run: JobRun, output: str) -> dict[str, Any]:
    """Seconds from `capfilt run` to the first commit and to the end, and the driver's peak memory."""
    markers = OutputLayout(output).shards.glob("*.done.json")
    first = min(os.stat(m).st_mtime for m in markers) - run.started_at
    return {
        "rows": run.manifest["input_rows"],
        "shards": len(run.manifest["shards"]),
        "wall_s": round(run.wall_s, 2),
        "first_commit_s": round(first, 2),
        "driver_peak_mb": run.peaks.memory_mb()["driver_mb"],
        "cpu_busy": round(run.peaks.cpu_busy, 3),
        "timings": run.timings,
    }


def _settings(settings: StreamSettings) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()}


def format_stream_report(report: dict[str, Any]) -> str:
    """The figures as the table `capfilt bench stream` prints."""
    m, f, o = report["machine"], report["first_shard"], report["overlap"]
    short, long = (f[str(r)] for r in report["settings"]["first_rows"])
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['gpu']}; torch {m['torch']}; {report['date']}",
        "first committed shard (s from `capfilt run`), run wall (s), driver peak MB, raw shards' peak MB:",
    ]
    for run in (short, long):
        lines.append(
            f"  {run['rows']:>6} rows ({run['shards']} shards): first {run['first_commit_s']:>6} of "
            f"{run['wall_s']:>7}; driver {run['driver_peak_mb']} MB; raw {run['peak_raw_mb']} MB"
        )
    lines += [
        f"  long / short first commit: {f['ratio']:.3f} (target <= {FIRST_SHARD_RATIO_TARGET}); "
        f"long run's first commit at {f['share_of_long_run']:.0%} of it "
        f"(target < {FIRST_SHARD_SHARE_TARGET:.0%})",
        f"overlap, {o['rows']} rows: end to end {o['end_to_end_s']} s; "
        f"download alone {o['download_alone_s']} s, caption/filter alone {o['caption_filter_alone_s']} s",
        f"  end to end / slower half: {o['ratio_to_slower_half']:.3f} (target <= {OVERLAP_TARGET}); "
        f"overlap fraction {o['overlap_fraction']:.2f}; driver {o['end_to_end']['driver_peak_mb']} MB; "
        f"output peak {o['peak_disk_mb']} MB (downloads kept)",
        "  machine CPU busy: end to end {end_to_end:.0%}, download alone {download_alone:.0%}, "
        "caption/filter alone {caption_filter_alone:.0%}".format(**o["cpu_busy"]),
        "prepare (s until input shard 00000 is written, which the first download waits for; whole list):",
    ]
    for fmt, p in report["prepare"].items():
        lines.append(
            f"  {p['rows']} rows, {fmt}: first shard {p['first_shard_s']} s (the count {p['count_s']} s) "
            f"of {p['whole_list_s']} s: {p['first_over_whole']:.1%}"
        )
    return "\n".join(lines)
