"""What a person running `capfilt run` sees: capfilt's own lines, one live progress display, the
summary. Everything else the run's process prints goes to a log file under the output.

Ray prints from Python loggers, from its C++ core straight to file descriptor 2, and forwards every
worker's stdout and stderr (img2dataset's progress, transformers' weight-loading bars) to the
driver's. No logger setting catches all of that, so for the run the process's descriptors 1 and 2
point at the log file, and the console writes to copies of the terminal's descriptors made before.
`--verbose` leaves the descriptors alone: the console then shows everything, as before.

On a terminal the progress display is one tqdm line that redraws itself (each second, from the
runner's ticker); elsewhere (a pipe, `capfilt logs` of a cluster job) it is a plain line every
`PLAIN_EVERY_S` seconds, so a log of a day-long job stays readable.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pipeline.job.progress import JobProgress, progress_line
from pipeline.spec.layout import OutputLayout

PLAIN_EVERY_S = 30.0
INTERRUPTED = "capfilt: interrupted; finished shards are kept, run again to resume"
INTERRUPT_GRACE_S = 20.0


class Console:
    """capfilt's console for one command. `say` is the runner's log; `capture` hides the rest."""

    def __init__(self, verbose: bool = False, stream: IO[str] | None = None) -> None:
        self.verbose = verbose
        self._stream = stream  # None: the process's stderr, as it is when a line is written
        self._bar: Any = None
        self._last_plain = -PLAIN_EVERY_S
        self.log_file: Path | None = None

    @property
    def stream(self) -> IO[str]:
        return self._stream or sys.stderr

    def say(self, line: str) -> None:
        """One of capfilt's own lines, above the progress display."""
        if self._bar is not None:
            self._bar.clear()
        print(line, file=self.stream, flush=True)
        if self._bar is not None:
            self._bar.refresh()

    @contextlib.contextmanager
    def capture(self, log_file: Path) -> Iterator[None]:
        """For the block, the process's stdout and stderr (Ray's, its workers', the libraries') go
        to `log_file` (appended), unless verbose; the console keeps writing to the terminal."""
        if self.verbose or self.log_file is not None:  # a run inside a captured command: its log
            yield
            return
        log_file.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        outer = self._stream
        self._stream = os.fdopen(os.dup(saved[2]), "w", buffering=1)
        try:
            with open(log_file, "a", buffering=1) as log:
                log.write(f"==== capfilt run, {time.strftime('%Y-%m-%d %H:%M:%S %z')} ====\n")
                for fd in (1, 2):
                    os.dup2(log.fileno(), fd)
                self.log_file = log_file
                self.say(f"capfilt: Ray's and the libraries' output: {log_file} (--verbose shows it here)")
                # Python's own streams too, where something (pytest, a notebook) replaced them
                streams = sys.stdout, sys.stderr
                sys.stdout = sys.stderr = log
                try:
                    yield
                finally:
                    sys.stdout, sys.stderr = streams
                    log.flush()
                    for fd, copy in saved.items():
                        os.dup2(copy, fd)
        finally:
            for copy in saved.values():
                os.close(copy)
            self._stream.close()
            self._stream, self.log_file = outer, None

    def show(self, progress: JobProgress) -> None:
        """Redraw the progress display (the runner calls this about once a second)."""
        if _redrawable(self.stream):
            self._draw(progress.figures())
        elif time.monotonic() - self._last_plain >= PLAIN_EVERY_S:
            self._last_plain = time.monotonic()
            print(f"capfilt: {progress.line()}", file=self.stream, flush=True)

    def finish(self, progress: JobProgress) -> None:
        """The display's last state, left on the console above the summary."""
        figures = progress.figures(running=False)
        if self._bar is None:
            print(f"capfilt: {progress_line(figures)}", file=self.stream, flush=True)
            return
        self._draw(figures)
        self._bar.close()
        self._bar = None

    def _draw(self, figures: dict[str, Any]) -> None:
        from tqdm import tqdm

        shards = figures["shards"]
        if self._bar is None:
            self._bar = tqdm(
                total=shards["total"], file=self.stream, bar_format="{bar:20} {desc}", dynamic_ncols=True
            )
        self._bar.n = shards["committed"]
        self._bar.set_description_str(progress_line(figures), refresh=True)


class Interrupt:
    """Ctrl-C raises KeyboardInterrupt as it always does, and also starts a clock: if the process
    is still there `grace_s` later (in two whole-suite runs a run was still printing its progress a
    minute after Ctrl-C, for a reason not found), it leaves, exit 130, having said so on the
    terminal as it was before any capture. `said` is set by whoever printed the message, so it is
    printed once."""

    def __init__(self, grace_s: float = INTERRUPT_GRACE_S) -> None:
        self.grace_s = grace_s
        self.said = False
        self._terminal = os.dup(2)

    def __enter__(self) -> Interrupt:
        import signal
        import threading

        def interrupted(signum: int, frame: Any) -> None:
            timer = threading.Timer(self.grace_s, self._leave)
            timer.daemon = True
            timer.start()
            raise KeyboardInterrupt

        try:
            self._previous = signal.signal(signal.SIGINT, interrupted)
        except ValueError:  # not the main thread (a test's): Python's own handling stays
            self._previous = None
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        os.close(self._terminal)

    def _leave(self) -> None:
        if not self.said:
            os.write(self._terminal, (INTERRUPTED + "\n").encode())
        os._exit(130)


def captured(
    console: Console | None, layout: OutputLayout, fingerprint: str
) -> contextlib.AbstractContextManager[None]:
    """A run's capture into its `run_log`, or nothing without a console (a library caller's run)."""
    return console.capture(run_log(layout, fingerprint)) if console else contextlib.nullcontext()


def run_log(layout: OutputLayout, fingerprint: str) -> Path:
    """Where a run's captured output goes: OUTPUT/logs/capfilt.log, or for an output in an object
    store (where a file cannot be appended to) a file of the job's in this machine's temporary
    directory, named in the console's first line."""
    if layout.root.local:
        return Path(layout.logs / "capfilt.log")
    return Path(tempfile.gettempdir()) / f"capfilt-{fingerprint[:16]}.log"


def _redrawable(stream: IO[str]) -> bool:
    """A terminal with a width: a line there can be redrawn in place (a pseudo-terminal with no
    size, as some CI runners give, would show an empty line)."""
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):
        return False
