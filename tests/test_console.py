"""The console of a run: its progress figures, the log file that takes everything else the process
prints (its own, a child's, straight to the descriptors as Ray's C++ core does), and the plain
progress lines where there is no terminal to redraw."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

from pipeline.job import console as console_module
from pipeline.job.console import Console
from pipeline.job.progress import JobProgress, clock_time, progress_line


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def shard(rows: int, kept: int) -> dict:
    return {"rows": rows, "counts": {"kept": kept, "filtered": rows - kept}}


def test_progress_counts_this_run_and_extrapolates_from_its_first_commit():
    clock = Clock()
    progress = JobProgress(shards=10, done_before=2, rows=1000, clock=clock)
    start = progress.figures()
    assert start["shards"] == {"total": 10, "committed": 2, "failed": 0}
    assert start["eta_s"] is None and start["kept_percent"] is None

    clock.now = 10.0
    progress.downloaded(300)
    progress.scored(270)
    clock.now = 20.0
    progress.committed(shard(100, 60))
    assert progress.figures()["eta_s"] == 7 * 20  # one commit: the whole run so far per shard

    clock.now = 30.0
    progress.committed(shard(100, 40))
    progress.failed()
    figures = progress.figures()
    assert figures["shards"] == {"total": 10, "committed": 4, "failed": 1}
    assert figures["eta_s"] == 5 * 10  # since the first commit: 10 s a shard, 5 shards left
    assert figures["kept_percent"] == 50.0
    assert figures["rows_downloaded_per_s"] == 10.0 and figures["images_scored_per_s"] == 9.0
    assert progress.line() == (
        "shards 4/10 committed (1 failed) | 10 rows/s downloaded | 9 images/s scored | kept 50.0% | "
        "ETA 0:50 | 0:30 elapsed"
    )
    assert progress.figures(running=False)["eta_s"] is None
    assert "ETA" not in progress.line(running=False)


def test_a_progress_line_reads_a_manifests_figures_as_written():
    figures = JobProgress(shards=3, done_before=3, rows=30).figures(running=False)
    assert progress_line(figures).startswith("shards 3/3 committed | 0 rows/s downloaded")
    assert clock_time(59.6) == "1:00" and clock_time(3661) == "1:01:01"


def test_capture_sends_everything_the_process_prints_to_the_log_and_capfilts_lines_to_the_console(
    tmp_path, capfd
):
    log = tmp_path / "out" / "logs" / "capfilt.log"
    console = Console()
    with console.capture(log):
        print("print from python")
        os.write(2, b"straight to descriptor 2\n")
        child = "import sys; print('a child on stdout'); sys.stderr.write('a child on stderr\\n')"
        subprocess.run([sys.executable, "-c", child], check=True)  # a worker, the C++ core: inherited fds
        console.say("capfilt: a line of ours")
    print("after the run")
    out, err = capfd.readouterr()
    assert out == "after the run\n"
    assert err.splitlines() == [
        f"capfilt: Ray's and the libraries' output: {log} (--verbose shows it here)",
        "capfilt: a line of ours",
    ]
    text = log.read_text()
    for line in ("print from python", "straight to descriptor 2", "a child on stdout", "a child on stderr"):
        assert line in text
    assert "a line of ours" not in text


def test_verbose_leaves_everything_on_the_console_and_writes_no_log(tmp_path, capfd):
    log = tmp_path / "capfilt.log"
    with Console(verbose=True).capture(log):
        os.write(2, b"straight to descriptor 2\n")
    assert capfd.readouterr().err == "straight to descriptor 2\n"
    assert not log.exists()


def test_without_a_terminal_progress_is_a_plain_line_now_and_then_and_the_last_one_at_the_end(monkeypatch):
    stream = io.StringIO()
    console = Console(stream=stream)
    progress = JobProgress(shards=2, done_before=0, rows=20)
    console.show(progress)
    console.show(progress)  # within PLAIN_EVERY_S of the first: nothing
    monkeypatch.setattr(console_module, "PLAIN_EVERY_S", 0.0)
    progress.committed(shard(10, 5))
    console.show(progress)
    progress.committed(shard(10, 5))
    console.finish(progress)
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == [
        "capfilt: shards 0/2 committed",
        "capfilt: shards 1/2 committed",
        "capfilt: shards 2/2 committed",
    ]
    assert "ETA" in lines[1] and "ETA" not in lines[2]


SWALLOWS_CTRL_C = """
import sys, time
from pipeline.job.console import Interrupt
with Interrupt(grace_s=1.0):
    while True:  # something that catches the interrupt and goes on blocking
        try:
            print("ready", flush=True)  # inside the try: the interrupt cannot arrive outside it
            time.sleep(60)
        except KeyboardInterrupt:
            pass
"""


def test_ctrl_c_ends_the_process_even_when_something_swallows_it():
    process = subprocess.Popen(
        [sys.executable, "-c", SWALLOWS_CTRL_C], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "ready\n"
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert stderr == "capfilt: interrupted; finished shards are kept, run again to resume\n"
    assert time.monotonic() - started < 10
