"""A new user's first hour, scripted: the demo, an own job on an own image server, then the usual
mistakes, each through the `capfilt` command in a fresh process, typed as a user types it.

What it holds capfilt to: a run's console is capfilt's own lines, the progress display and the
summary, while Ray's and the libraries' output goes to OUTPUT/logs/capfilt.log; and every mistake is
refused within `MISTAKE_S` seconds, in one line that names what is wrong and what to do, with no
traceback and no work done.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.synthetic.sample_web import Route, StaticSite, jpeg_bytes, render_scene

pytestmark = pytest.mark.slow

CAPFILT = [sys.executable, "-m", "pipeline.cli"]
MISTAKE_S = 5.0


def capfilt(cwd: Path, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run([*CAPFILT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - started


def assert_a_quiet_run(done: subprocess.CompletedProcess[str], output: Path) -> None:
    """Exit 0; stderr only capfilt's lines (where the log is, the job's size, progress); stdout the
    summary; everything Ray and the libraries printed in the output's log file."""
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert lines and all(line.startswith("capfilt: ") for line in lines), done.stderr
    log = output / "logs" / "capfilt.log"
    assert lines[0] == f"capfilt: Ray's and the libraries' output: {log.resolve()} (--verbose shows it here)"
    shards = lines[1].split(" in ")[1].split()[0]
    assert lines[-1].startswith(f"capfilt: shards {shards}/{shards} committed | ")
    assert done.stdout.startswith("fate ")
    assert "shards: " in done.stdout and "output: " in done.stdout
    text = log.read_text()
    assert "streaming_executor" in text and "core_worker" in text  # Ray Data's lines, Ray's C++ core's


def test_a_new_users_first_hour(tmp_path):
    # The demo, as the README's first step.
    done, _ = capfilt(tmp_path, "demo", "--out", "demo", "--rows", "40")
    assert_a_quiet_run(done, tmp_path / "demo" / "output")
    assert "demo finished in" in done.stdout

    # An own job: an own image server, a CSV list without input_format, the demo's models.
    jpeg = (("Content-Type", "image/jpeg"),)
    routes = {
        f"/img/{i}.jpg": Route(body=jpeg_bytes(render_scene(300 + i)[0]), headers=jpeg) for i in range(12)
    }
    with StaticSite(routes) as site:
        lines = ["url,caption", *(f"{site.url(path)},a picture" for path in routes)]
        (tmp_path / "urls.csv").write_text("\n".join(lines) + "\n")
        job = {
            "input": {"url_list": "urls.csv"},
            "download": {"allow_private_networks": True},  # the image server is on 127.0.0.1
            "captioner": {"model": "demo/models/captioner"},
            "filter": {"model": "demo/models/itm"},
            "output": {"path": "out", "shard_size": 4},
        }
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
        done, _ = capfilt(tmp_path, "run", "job.yaml")
        assert_a_quiet_run(done, tmp_path / "out")
    assert f"{'input rows':<18}{12:>10}" in done.stdout

    # The usual mistakes, each refused at once in one line.
    mistakes = [
        (
            ["run", "job.yaml", "--set", "filter.model=demo/models/itm2"],
            "filter.model: no such model directory: demo/models/itm2 (did you mean demo/models/itm?",
        ),
        (
            ["run", "job.yaml", "--set", "captioner.model=demo/models/captionr"],
            "captioner.model: no such model directory: demo/models/captionr (did you mean demo/models/captioner?",
        ),
        (
            ["run", "job.yaml", "--set", "input.input_format=parquet"],
            "urls.csv is named as csv, but input.input_format is parquet; set input.input_format: csv",
        ),
        (
            ["run", "job.yaml", "--set", "output.shard_size=5"],
            "holds downloads made with other settings: output.shard_size was 4, is 5 now",
        ),
        (
            ["run", "job.yaml", "--set", "output.shard_sise=5"],
            "--set output.shard_sise=5: unknown key (did you mean 'shard_size'?)",
        ),
        (
            ["rethreshold", "out", "--threshold", "0.7", "--out", "out/t07"],
            "/out/t07: inside the job's output",
        ),
    ]
    for args, message in mistakes:
        done, seconds = capfilt(tmp_path, *args, timeout=60)
        said = done.stderr.splitlines()
        assert done.returncode == 2, (args, done.stderr[-3000:])
        assert len(said) == 1 and said[0].startswith("capfilt: error: "), (args, done.stderr[-3000:])
        assert message in said[0], (args, said[0])
        assert done.stdout == "" and "Traceback" not in done.stderr
        assert seconds < MISTAKE_S, (args, seconds)
    assert not (tmp_path / "out" / "t07").exists()
