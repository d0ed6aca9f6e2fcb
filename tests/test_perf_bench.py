"""`capfilt bench perf`: the memory watch reads real processes, and the harness runs end to end.

The figures themselves are the benchmark's business (docs/performance.md); here, that each one is
produced, from the runs it names, and means what it says.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

from pipeline.cli import main
from pipeline.perf.harness import memory_spread
from pipeline.perf.process_watch import ProcessWatch

_HOLD = "import time; block = bytearray({mb} * 1024 * 1024); block[::4096] = b'x' * len(block[::4096]); time.sleep(30)"


def test_the_watch_tells_the_driver_from_a_ray_worker_below_it():
    # A driver holding 150 MB whose child, named as Ray names its workers, holds 300 MB.
    child = f'exec -a "ray::FakeWorker" {sys.executable} -c "{_HOLD.format(mb=300)}"'
    driver = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess; subprocess.Popen(['bash', '-c', {child!r}]); " + _HOLD.format(mb=150),
        ]
    )
    watched = psutil.Process(driver.pid)
    try:
        with ProcessWatch(driver.pid, interval=0.05) as watch:
            deadline = time.monotonic() + 20
            while watch.peaks.worker_mb < 300 and time.monotonic() < deadline:
                time.sleep(0.1)
        peaks = watch.peaks
    finally:
        for process in watched.children(recursive=True):
            process.kill()
        driver.kill()
        driver.wait()
    assert 150 <= peaks.driver_mb < 250
    assert 300 <= peaks.worker_mb < 400
    assert peaks.workers_total_mb >= peaks.worker_mb
    assert 0 < peaks.cpu_busy <= 1


def test_memory_spread_is_the_largest_peak_over_the_smallest():
    peaks = {
        "1000": {"driver_mb": 500.0, "worker_mb": 400.0},
        "20000": {"driver_mb": 550.0, "worker_mb": 600.0},
    }
    assert memory_spread(peaks) == {"driver_mb": 0.1, "worker_mb": 0.5}


@pytest.mark.slow
def test_bench_perf_runs_the_job_and_its_baselines_and_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "perf.json"
    argv = ["bench", "perf", "--rows", "100", "--batch-size", "16", "--architectures", "tiny",
            "--model-images", "4", "--dir", str(tmp_path / "work"), "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    pipeline = report["pipeline"]
    assert pipeline["rows"] == 100 and pipeline["wall_s"] > 0
    assert pipeline["caption_filter_images_per_s"] > 0 and 0 < pipeline["actor_busy"] <= 1
    assert set(pipeline["per_worker_per_s"]) == {"download", "preprocess", "caption", "itm", "write"}
    bare = report["bare_loop_images_per_s"]
    assert report["ray_tax"] == round(report["caption_filter_alone"]["images_per_s"] / bare, 3)
    assert report["ray_tax_streaming"] == round(pipeline["caption_filter_images_per_s"] / bare, 3)
    assert report["download_ratio"] == round(
        report["download"]["img2dataset_s"] / report["download"]["capfilt_s"], 3
    )
    assert list(report["peak_rss_mb"]) == ["100"] and report["peak_rss_mb"]["100"]["driver_mb"] > 50
    assert list(report["peak_disk_mb"]) == ["100"] and report["peak_disk_mb"]["100"]["output"] > 0
    [cost] = report["model_cost"]
    assert cost["architecture"] == "tiny" and cost["ratio"] > 0
    assert report["engine"]["architecture"] == "tiny" and report["engine"]["vs_plain_k5"] > 0
    # The runs it reports on: a complete job, run again over plain img2dataset's shards of the same
    # list (its own were deleted as it committed them).
    output = tmp_path / "work" / "rows-100" / "output"
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["complete"] and manifest["input_rows"] == 100
    assert [p.name for p in (output / "downloads").glob("*.tar")] == ["00000.tar"]
    assert "ray tax" in capsys.readouterr().out


ENGINE_KEYS = {"flops_ratio_k1", "flops_ratio_k5", "matmul_fraction", "vs_plain_k1", "vs_plain_k5"}
ENGINE_KEYS |= {"own_vs_generate_tiny", "device", "itc_share_k1", "itc_share_k5"}


def test_bench_engine_writes_the_issue_figures(tmp_path, capsys):
    out = tmp_path / "engine.json"
    assert (
        main(["bench", "engine", "--architecture", "tiny", "--dir", str(tmp_path), "--json", str(out)]) == 0
    )
    engine = json.loads(out.read_text())["engine"]
    assert set(engine) >= ENGINE_KEYS and engine["device"] == "cpu" and engine["architecture"] == "tiny"
    assert 1.0 <= engine["flops_ratio_k5"] <= 1.2 and engine["minimum_flops_per_image_k5"] > 0
    assert engine["achieved_gflops_k1"] == pytest.approx(
        engine["flops_per_image_k1"] * engine["capfilt_images_per_s_k1"] / 1e9
    )
    assert engine["matmul_fraction"] == pytest.approx(engine["achieved_gflops_k1"] / engine["matmul_gflops"])
    for k in (1, 5):
        ratio = engine[f"capfilt_images_per_s_k{k}"] / engine[f"plain_images_per_s_k{k}"]
        assert engine[f"vs_plain_k{k}"] == pytest.approx(ratio) and ratio > 0
    assert all(0 < engine[f"itc_share_k{k}"] < 1 for k in (1, 5))
    printed = capsys.readouterr().out
    assert "own decoder vs generate" in printed and "ITC's share of the actor's time" in printed
