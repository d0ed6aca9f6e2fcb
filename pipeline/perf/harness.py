"""`capfilt bench perf`: run the pipeline on a local web, and its baselines, and report the figures.

1. End to end and per stage: `capfilt run` on N generated URLs served on 127.0.0.1, with the tiny
   models; the job's manifest says where its time went (`pipeline.core.timings`).
2. Ray tax: the pipeline's caption/filter rate once its actor is ready, over the rate of the same
   stage in a bare loop over the same decoded batches (`bare_loop`). Taken as it was before the
   stream, over downloads already on disk: the job is run again over plain img2dataset's shards of
   the same list (3.), which are what its own download writes, so that the rate is the pipeline's
   and not the downloads' that share its cores. The stream's own rate over the same loop is
   reported beside it.
3. Download: plain img2dataset alone on the same list (`plain_download`) over the moment the job's
   stream had its last shard on disk, the models working beside the downloads.
4. Memory and disk: peak RSS of the driver and the workers, and the peak bytes of raw shards under
   `downloads/` and of the whole output, at each row count; a pipeline that streams keeps memory
   flat and the raw shards bounded by the shards in flight (they are deleted once committed).
5. Model cost: the CapFilt actor over the plain Hugging Face loop at BLIP-base and -large sizes
   (`model_cost`).
"""

from __future__ import annotations

import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.core.timings import actor_busy, steady_images_per_s
from pipeline.curate.tiny_models import IMAGE_SIZE, write_tiny_models
from pipeline.perf.bare_loop import bare_images_per_s, decoded_chunks
from pipeline.perf.bench_web import bench_site, bench_spec
from pipeline.perf.disk_watch import DiskWatch
from pipeline.perf.engine_bench import EngineSettings, format_engine_report, run_engine_bench
from pipeline.perf.job_run import JobRun, rerun_over_downloads, run_watched
from pipeline.perf.model_cost import compare
from pipeline.perf.plain_download import plain_download_s
from pipeline.perf.process_watch import cores
from pipeline.spec.config import JobSpec
from pipeline.spec.layout import OutputLayout

BARE_LOOP_IMAGES = 4000  # enough for a steady rate; all of them are held decoded in memory
RAY_TAX_TARGET = 0.9
DOWNLOAD_RATIO_TARGET = 0.95
MEMORY_SPREAD_TARGET = 0.2  # peaks within ±20 % over the row counts


@dataclass(frozen=True)
class PerfSettings:
    work: Path
    rows: tuple[int, ...] = (1000, 5000, 20000)
    batch_size: int = 64
    architectures: tuple[str, ...] = ("base", "large")
    model_images: int = 8
    model_batch: int = 4
    new_tokens: int = 20


def run_perf(settings: PerfSettings, log: Any = print) -> dict[str, Any]:
    """Every figure of the bench, as one JSON-ready dict."""
    models = write_tiny_models(settings.work / "tiny-models")
    report: dict[str, Any] = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "settings": _settings(settings),
        "peak_rss_mb": {},
    }
    report["peak_disk_mb"] = {}
    largest = max(settings.rows)
    for rows in sorted(settings.rows):
        root = settings.work / f"rows-{rows}"
        shutil.rmtree(root, ignore_errors=True)  # a fresh job: an old output would only be resumed
        site, url_list = bench_site(rows)
        try:
            spec = bench_spec(root, url_list, models, IMAGE_SIZE, settings.batch_size)
            log(f"perf: capfilt run on {rows} rows ...")
            layout = OutputLayout(spec.output.path)
            with DiskWatch(layout.downloads.path) as raw, DiskWatch(layout.root.path) as output:
                run = run_watched(spec, root / "job.yaml")
            report["peak_rss_mb"][str(rows)] = run.peaks.memory_mb()
            report["peak_disk_mb"][str(rows)] = {"raw_shards": raw.peak_mb(), "output": output.peak_mb()}
            if rows == largest:
                report["pipeline"] = pipeline_figures(run, rows)
                report.update(_baselines(spec, run, root, log))
        finally:
            site.stop()
    report["memory_spread"] = memory_spread(report["peak_rss_mb"])
    report["model_cost"] = []
    for architecture in settings.architectures:
        log(f"perf: model cost, {architecture} architecture ...")
        report["model_cost"].append(
            compare(
                architecture,
                settings.model_images,
                settings.model_batch,
                settings.new_tokens,
                _device(),
                cache_dir=settings.work / "architectures",
            )
        )
    if settings.architectures:  # the engine's figures at the largest size asked for
        engine = EngineSettings(settings.work, architecture=settings.architectures[-1])
        report.update(run_engine_bench(engine, log))
    return report


def _baselines(spec: JobSpec, run: JobRun, root: Path, log: Any) -> dict[str, Any]:
    """Plain img2dataset on the job's list, the job's caption/filter alone over those downloads, and
    the bare loop over the same decoded batches."""
    log("perf: plain img2dataset on the same list ...")
    # Ratios are taken of the rounded figures, so that they agree with what is reported.
    plain = round(plain_download_s(spec, root / "plain-img2dataset"), 3)
    capfilt = run.timings["download_s"]
    log("perf: caption/filter alone, over those downloads ...")
    layout = OutputLayout(spec.output.path)
    layout.downloads.rmtree()  # the job's own, deleted as it committed (only their stats are left)
    (root / "plain-img2dataset").rename(layout.downloads.path)
    alone = rerun_over_downloads(spec, root / "job-alone.yaml")
    log("perf: bare loop over the same decoded batches ...")
    bare = round(bare_images_per_s(spec, decoded_chunks(spec, BARE_LOOP_IMAGES)), 1)
    over_downloads = round(steady_images_per_s(alone.timings), 1)
    streaming = round(steady_images_per_s(run.timings), 1)
    return {
        "download": {"capfilt_s": capfilt, "img2dataset_s": plain},
        "download_ratio": round(plain / capfilt, 3) if capfilt > 0 else 0.0,
        "bare_loop_images_per_s": bare,
        "caption_filter_alone": {
            "images_per_s": over_downloads,
            "actor_busy": round(actor_busy(alone.timings, len(alone.manifest["actors"])), 3),
            "cpu_busy": round(alone.peaks.cpu_busy, 3),
        },
        "ray_tax": round(over_downloads / bare, 3) if bare > 0 else 0.0,
        "ray_tax_streaming": round(streaming / bare, 3) if bare > 0 else 0.0,
    }


def pipeline_figures(run: JobRun, rows: int) -> dict[str, Any]:
    """Rates of the whole run and of each stage; busy shares of the actor and the machine."""
    t = run.timings
    counts = run.manifest["counts"]
    downloaded = counts["kept"] + counts["filtered"] + counts["decode_failed"]

    def rate(n: float, seconds: float) -> float:
        return round(n / seconds, 1) if seconds > 0 else 0.0

    return {
        "rows": rows,
        "wall_s": round(run.wall_s, 2),
        "rows_per_s": rate(rows, run.wall_s),
        "download_images_per_s": rate(downloaded, t["download_s"]),
        "caption_filter_images_per_s": round(steady_images_per_s(t), 1),
        "startup_s": t["startup_s"],
        # One worker's rate: images/s, but rows/s for the writer (it writes every row of a shard).
        "per_worker_per_s": {
            stage: rate(rows if stage == "write" else t["images"], s) for stage, s in t["busy_s"].items()
        },
        "actor_busy": round(actor_busy(t, len(run.manifest["actors"])), 3),
        "cpu_busy": round(run.peaks.cpu_busy, 3),
    }


def memory_spread(peaks: dict[str, dict[str, float]]) -> dict[str, float]:
    """(largest / smallest - 1) of each peak over the row counts: 0.2 is the ±20 % target's edge."""
    spread = {}
    for role in ("driver_mb", "worker_mb"):
        values = [p[role] for p in peaks.values()]
        spread[role] = round(max(values) / min(values) - 1, 3) if min(values) > 0 else 0.0
    return spread


def machine() -> dict[str, Any]:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": cores(),
        "gpu": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _settings(settings: PerfSettings) -> dict[str, Any]:
    return {
        "rows": list(settings.rows),
        "batch_size": settings.batch_size,
        "architectures": list(settings.architectures),
        "model_images": settings.model_images,
        "model_batch": settings.model_batch,
        "new_tokens": settings.new_tokens,
    }


def format_report(report: dict[str, Any]) -> str:
    """The figures as the table `capfilt bench perf` prints."""
    p = report["pipeline"]
    m = report["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['gpu']}; torch {m['torch']}; {report['date']}",
        f"end to end: {p['rows']} rows in {p['wall_s']} s ({p['rows_per_s']} rows/s, Ray start included)",
        f"  download              {p['download_images_per_s']:>8} images/s",
        f"  caption+filter        {p['caption_filter_images_per_s']:>8} images/s once the actor was ready "
        f"(after {p['startup_s']} s)",
    ]
    per_worker = p["per_worker_per_s"].items()
    lines += [f"  {stage:<20}  {rate:>8} {'rows' if stage == 'write' else 'images'}/s per worker"
              for stage, rate in per_worker]  # fmt: skip
    lines += [
        f"  CapFilt actor busy    {p['actor_busy']:>8.0%}   machine CPU busy {p['cpu_busy']:.0%}",
        f"ray tax (pipeline / bare loop): {report['ray_tax']:.3f}  "
        f"({report['caption_filter_alone']['images_per_s']} images/s over downloads on disk, bare loop "
        f"{report['bare_loop_images_per_s']}; target >= {RAY_TAX_TARGET}); the stream beside its "
        f"downloads {report['ray_tax_streaming']:.3f}",
        f"download (capfilt / plain img2dataset): {report['download_ratio']:.3f}  "
        f"({report['download']['capfilt_s']} s vs {report['download']['img2dataset_s']} s; "
        f"target >= {DOWNLOAD_RATIO_TARGET})",
        "peak RSS (MB)          driver   largest worker   all workers   ray system",
    ]
    for rows, peaks in report["peak_rss_mb"].items():
        lines.append(
            f"  {rows:>7} rows       {peaks['driver_mb']:>8} {peaks['worker_mb']:>16} "
            f"{peaks['workers_total_mb']:>13} {peaks['ray_system_mb']:>12}"
        )
    spread = report["memory_spread"]
    lines.append(
        f"  spread over row counts: driver {spread['driver_mb']:+.0%}, worker {spread['worker_mb']:+.0%} "
        f"(target within {MEMORY_SPREAD_TARGET:.0%})"
    )
    lines.append("peak disk (MB)     raw shards under downloads/   whole output")
    for rows, disk in report["peak_disk_mb"].items():
        lines.append(f"  {rows:>7} rows       {disk['raw_shards']:>26} {disk['output']:>14}")
    for cost in report["model_cost"]:
        lines.append(
            f"model cost, {cost['architecture']} on {cost['device']} (batch {cost['batch']}): capfilt "
            f"{cost['capfilt_images_per_s']:.2f} vs plain HF {cost['plain_images_per_s']:.2f} images/s "
            f"= {cost['ratio']:.2f}x"
        )
    if "engine" in report:
        lines.append(format_engine_report(report))
    return "\n".join(lines)
