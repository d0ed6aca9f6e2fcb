"""Who may write an output directory, and what may already be in it, decided before a job writes.

A job resumes whatever it finds under `output.path`, and `--overwrite` deletes it, so both must be
sure the directory is what they think it is:

- a directory that holds anything capfilt does not write (`notes.txt`, someone's dataset) is
  refused: resuming into it would mix the two, and a mistyped `output.path` should not become a
  job. An empty or new directory is a new job; one holding only capfilt's names resumes;
- `--overwrite` empties the directory first, whatever it holds, but never the filesystem root, the
  home directory or the working directory (nor a directory above one of them), nor a whole bucket:
  those are typos;
- one run at a time: two runs writing the same shards would each take the other's half-written
  files for their own. Locally the claim is `flock` on `OUTPUT/.capfilt.lock`, held for the whole
  job; the kernel releases it when the process dies, so a crashed run never leaves a stale lock.
  An object store has no atomic create-if-absent that fsspec offers across stores, so there is no
  lock there: the run says so in one line (docs/job-spec.md lists it as a known limit).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from pipeline.core.messages import one_line, printable
from pipeline.core.storage import Location, temporary_name
from pipeline.spec.config import SpecError
from pipeline.spec.layout import IN_PROGRESS, RETRY_DIR, OutputLayout

LOCK_NAME = ".capfilt.lock"
REFUSE_EXAMPLES = 3  # foreign names shown in the refusal

Log = Callable[[str], None]


def capfilt_names(root: Location) -> frozenset[str]:
    """Every name capfilt writes directly under an output directory (img2dataset's `_tmp` lives
    under `downloads/`; the files of `downloads/` and `shards/` are not looked at)."""
    layout = OutputLayout(root)
    whole = [layout.manifest]  # written under a temporary name, then renamed
    temporary = [temporary_name(p.path).rpartition("/")[2] for p in whole]
    directories = [
        layout.prepared_input.name,
        layout.downloads.name,
        layout.shards.name,
        layout.logs.name,
        RETRY_DIR,
    ]
    earlier = ["_input.parquet"]  # the prepared list of outputs written before it was one file a shard
    return frozenset([*(p.name for p in whole), *temporary, *directories, *earlier, LOCK_NAME, IN_PROGRESS])


@contextlib.contextmanager
def claim_output(
    root: Location,
    overwrite: bool,
    key: str = "output.path",
    log: Log = print,
    reads: Sequence[tuple[str, str]] = (),
) -> Iterator[None]:
    """Make `root` this run's output until the block ends: refuse what it must not write into, empty
    it under `overwrite`, and hold the lock. Nothing is written before the checks pass; `key` names
    the setting in the messages (`output.path`, or `--out` for rethreshold). `reads`: (key, path) of
    what the job reads (its URL list, model directories); `--overwrite` refuses to delete one."""
    if root.is_file():
        raise SpecError(f"{key}: {printable(root)} is a file; name a directory (new or empty) for the output")
    if overwrite:
        _refuse_precious(root, key)
        _refuse_reads_inside(root, key, reads)
    else:
        _refuse_foreign(root, key)
    try:
        root.mkdir()
    except OSError as err:
        raise SpecError(f"{key}: cannot create {printable(root)}: {one_line(err)}") from None
    with lock_output(root, key, log):
        if overwrite:
            _empty(root, key, log)
        yield


@contextlib.contextmanager
def lock_output(root: Location, key: str = "output.path", log: Log = print) -> Iterator[None]:
    """Hold `root`'s lock until the block ends, or refuse at once (naming the holder) when another
    process holds it. `root` must exist. What `retry-failed` takes on the output it rewrites."""
    if not root.local:
        log(f"capfilt: {printable(root)} is in an object store, which capfilt cannot lock: "
            "make sure no other run writes it at the same time")  # fmt: skip
        yield
        return
    path = os.path.join(root.path, LOCK_NAME)
    try:
        # O_NOFOLLOW: a link planted under the lock's name must not make capfilt truncate its target.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise SpecError(f"{key}: cannot create the lock file {printable(path)}: {one_line(err)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy = f"is being written by another capfilt run ({_holder(fd)}); wait for it or stop it"
            raise SpecError(f"{key}: {printable(root)} {busy}") from None
        except OSError as err:  # a filesystem without locks (some network mounts): say so, go on
            log(f"capfilt: cannot lock {printable(root)} ({one_line(err)}): "
                "make sure no other run writes it at the same time")  # fmt: skip
        else:
            since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a new holder)


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it; it may be writing it at this very moment."""
    try:
        found = json.loads(os.pread(fd, 4096, 0))
        return f"pid {int(found['pid'])} on host {printable(found['host'])} since {printable(found['since'])}"
    except (OSError, ValueError, TypeError, KeyError):
        return "pid and host not known yet"


def _refuse_foreign(root: Location, key: str) -> None:
    try:
        names = {p.name for p in root.iterdir()}
    except OSError as err:
        raise SpecError(f"{key}: cannot list {printable(root)}: {one_line(err)}") from None
    foreign = sorted(names - capfilt_names(root))
    if foreign:
        more = ", ..." if foreign[REFUSE_EXAMPLES:] else ""
        examples = ", ".join(map(printable, foreign[:REFUSE_EXAMPLES])) + more
        raise SpecError(
            f"{key}: {printable(root)} holds files that are not a capfilt output (e.g. {examples}); use an "
            "empty or new directory, or pass --overwrite to delete its contents and start afresh"
        )


def _refuse_precious(root: Location, key: str) -> None:
    """--overwrite of `/`, home or the working directory, or of a directory holding one, is a typo;
    so is a whole bucket."""
    if not root.local:
        if root.is_bucket:
            raise SpecError(
                f"{key}: --overwrite will not delete a whole bucket, {printable(root)} (name a prefix in it)"
            )
        return
    target = Path(os.path.realpath(root.path))
    for name, place in _precious_places():
        if target == place or target in place.parents:
            what = name if target == place else f"it holds {name}, {printable(place)}"
            raise SpecError(f"{key}: --overwrite will not delete the contents of {printable(root)} ({what})")


def _refuse_reads_inside(root: Location, key: str, reads: Sequence[tuple[str, str]]) -> None:
    """The job's own inputs inside `root` would be deleted before the job reads them."""
    if not root.local:
        return
    target = Path(os.path.realpath(root.path))
    for name, value in reads:
        if os.path.exists(value) and target in Path(os.path.realpath(value)).parents:
            raise SpecError(
                f"{key}: --overwrite will not delete the contents of {printable(root)}: it holds {name}, "
                f"{printable(value)}"
            )


def _precious_places() -> Iterator[tuple[str, Path]]:
    """The filesystem root, home and the working directory, as real paths; one that cannot be told
    (no HOME, a working directory since deleted) is left out."""
    yield "the filesystem root", Path("/")
    for name, where in (("the home directory", Path.home), ("the working directory", Path.cwd)):
        try:
            yield name, Path(os.path.realpath(where()))
        except (OSError, RuntimeError):
            continue


def _empty(root: Location, key: str, log: Log) -> None:
    """Delete everything in `root` but the lock this run holds. A symbolic link is removed, never
    followed."""
    try:
        entries = [p for p in root.iterdir() if p.name != LOCK_NAME]
    except OSError as err:
        raise SpecError(f"{key}: cannot list {printable(root)}: {one_line(err)}") from None
    for entry in entries:
        try:
            if not entry.local and entry.is_dir():
                entry.rmtree()
            elif not entry.local:
                entry.unlink(missing_ok=True)
            elif os.path.isdir(entry.path) and not os.path.islink(entry.path):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError as err:
            raise SpecError(
                f"{key}: --overwrite could not delete {printable(entry)}: {one_line(err)}"
            ) from None
    if entries:
        log(f"capfilt: --overwrite: deleted the {len(entries)} entries in {printable(root)}")
