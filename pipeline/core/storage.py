"""Where a file lives: a local or shared POSIX path, or an object in an object store, through fsspec.

`output.path` and `input.url_list` may be a plain path or an fsspec URI (`s3://bucket/prefix`,
`gs://…`, `az://…`, `file:///…`). img2dataset already reads and writes through fsspec, so capfilt
uses the same stack and the same credentials (each backend's standard chain; for S3 also
`AWS_ENDPOINT_URL` for MinIO and the like).

`Location` is a small pathlib-like handle (a filesystem and a path on it) with only the operations
capfilt needs. The two kinds of storage differ in what a write can promise:

- local/shared POSIX: a file is written under a temporary name beside it and renamed into place
  (`os.replace`), so a reader sees the old file or the new one, never half of one;
- object store: there is no rename. The data is staged in a local temporary file and uploaded as
  one object (one PUT, or a multipart upload completed at the end), which appears whole when the
  upload completes and not at all when it fails. What the rename gave on POSIX, the order of writes
  gives here: a shard's `done.json` goes after its tar and Parquet, the manifest after the shards.

On a local path a `Location` is also an `os.PathLike`, so pyarrow, tarfile and `open` take it as
they took a `pathlib.Path`; on an object store it refuses to be one (use `open`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+://")


def is_uri(value: str | os.PathLike[str]) -> bool:
    """`scheme://…`: an fsspec URI, as opposed to a plain local path (which is resolved as before)."""
    return isinstance(value, str) and bool(_URI.match(value))


@dataclass(frozen=True)
class Location:
    """A file or directory (a prefix, on an object store) on a filesystem. Picklable: Ray tasks and
    worker processes get it with its filesystem's options, and find credentials on their own node."""

    fs: fsspec.AbstractFileSystem
    path: str  # the backend's path: "/abs/dir" locally, "bucket/prefix" on S3
    shown: str = field(compare=False)  # as the user wrote it; for messages

    @classmethod
    def of(cls, value: str | os.PathLike[str] | Location) -> Location:
        if isinstance(value, Location):
            return value
        text = os.fspath(value)
        fs, path = fsspec.core.url_to_fs(text)
        return cls(fs, path.rstrip("/") or path, text.rstrip("/") or text)

    @property
    def local(self) -> bool:
        """A POSIX filesystem: rename is atomic, hard links exist, directories are real."""
        return isinstance(self.fs, LocalFileSystem)

    @property
    def uri(self) -> str:
        """What other fsspec users (img2dataset, the loader) are given: a path locally, else a URI."""
        return self.path if self.local else self.fs.unstrip_protocol(self.path)

    @property
    def is_bucket(self) -> bool:
        """An object store's bucket (container) itself, not a prefix inside it."""
        return not self.local and "/" not in self.path.strip("/")

    def __str__(self) -> str:
        return self.shown

    def __fspath__(self) -> str:
        if not self.local:
            raise TypeError(f"{self.uri} is in an object store, not a local path: open it with .open()")
        return self.path

    def __lt__(self, other: Location) -> bool:
        return self.path < other.path

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.shown.rstrip('/')}/{name}")

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rpartition("/")[2]

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def parent(self) -> Location:
        return Location(self.fs, self.path.rpartition("/")[0] or "/", self.shown.rpartition("/")[0] or "/")

    def with_name(self, name: str) -> Location:
        return self.parent / name

    # -- reading ------------------------------------------------------------------------------------

    def _fresh(self) -> None:
        """Object stores' listings are cached per process, and other processes (Ray workers,
        img2dataset) write here: list afresh."""
        if not self.local:
            self.fs.invalidate_cache()

    def exists(self) -> bool:
        self._fresh()
        return bool(self.fs.exists(self.path))

    def is_file(self) -> bool:
        self._fresh()
        return bool(self.fs.isfile(self.path))

    def is_dir(self) -> bool:
        """A directory; on an object store, a prefix with at least one object under it."""
        self._fresh()
        return bool(self.fs.isdir(self.path))

    def iterdir(self) -> Iterator[Location]:
        self._fresh()
        if not self.fs.isdir(self.path):
            return
        for entry in sorted(self.fs.ls(self.path, detail=False)):
            name = entry.rstrip("/").rpartition("/")[2]
            if name:
                yield self / name

    def files(self) -> list[Location]:
        """The files directly in this directory, sorted (one listing, also on an object store)."""
        self._fresh()
        if not self.fs.isdir(self.path):
            return []
        entries = self.fs.ls(self.path, detail=True)
        return sorted(self / e["name"].rstrip("/").rpartition("/")[2] for e in entries if e["type"] == "file")

    def resolve(self) -> Location:
        """Locally, the real path (symlinks and `..` resolved); a URI already is one."""
        if not self.local:
            return self
        real = os.path.realpath(self.path)
        return Location(self.fs, real, real)

    def glob(self, pattern: str) -> list[Location]:
        """The files in this directory whose names match `pattern` (one level, no `**`), sorted.
        Matched on the names of one listing: the directory's own path is never read as a pattern
        (a `[` in it matches nothing in fsspec's glob, as pathlib's never did)."""
        return [p for p in self.files() if fnmatch.fnmatchcase(p.name, pattern)]

    def open(self, mode: str = "rb") -> IO[Any]:
        if self.local:
            return open(self.path, mode)
        return self.fs.open(self.path, mode)

    def read_bytes(self) -> bytes:
        with self.open("rb") as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self) -> Any:
        return json.loads(self.read_text())

    def identity(self) -> str:
        """Size and version of a file: an edited file is a different one. Local: size and mtime in
        ns (as `stat` gave before); an object: size and ETag (or its modification time)."""
        if self.local:
            stat = os.stat(self.path)
            return f"{stat.st_size}:{stat.st_mtime_ns}"
        info = self.fs.info(self.path)
        version = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime")
        version = version or info.get("LastModified") or info.get("last_modified") or info.get("updated")
        return f"{info['size']}:{str(version).strip(chr(34))}"

    # -- writing ------------------------------------------------------------------------------------

    def mkdir(self) -> None:
        """Locally, the directory and its parents; an object store has no directories (a prefix exists
        once an object is under it), so nothing is made there."""
        if self.local:
            os.makedirs(self.path, exist_ok=True)

    @contextlib.contextmanager
    def writing(self) -> Iterator[IO[bytes]]:
        """A binary stream whose content replaces this file whole when the block ends without error,
        and is thrown away when it raises (see the module docstring for how, per backend)."""
        if self.local:
            tmp = temporary_name(self.path)
            try:
                with open(tmp, "wb") as stream:
                    yield stream
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            os.replace(tmp, self.path)
            return
        with tempfile.NamedTemporaryFile(prefix="capfilt-", suffix=f"-{self.name}") as staged:
            yield staged  # type: ignore[misc]
            staged.flush()
            self.fs.put_file(staged.name, self.path)

    def write_bytes(self, data: bytes) -> None:
        with self.writing() as stream:
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def write_json(self, value: Any) -> None:
        self.write_bytes((json.dumps(value, indent=2, sort_keys=False) + "\n").encode())

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            if self.local:
                os.unlink(self.path)
            else:
                self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        """This directory (prefix) and everything under it; nothing when it does not exist. Never a
        whole bucket: s3fs would delete the bucket itself."""
        if not self.local and self.is_bucket:
            raise ValueError(f"{self.uri}: will not delete a whole bucket")
        if self.local:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.exists():
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path, recursive=True)

    def link_to(self, target: Location) -> None:
        """`target` becomes a copy of this file that costs no transfer where the storage allows:
        a hard link on one POSIX filesystem, a server-side copy within one object store, and a
        streamed copy otherwise (another filesystem, links not allowed)."""
        if self.local and target.local:
            try:
                os.link(self.path, target.path)
            except OSError:
                shutil.copy2(self.path, target.path)
        elif type(self.fs) is type(target.fs) and self.fs == target.fs:
            self.fs.copy(self.path, target.path)
        else:
            with self.open("rb") as source, target.writing() as sink:
                shutil.copyfileobj(source, sink, 1 << 20)

    def rename(self, target: Location) -> None:
        """Atomic on POSIX only: callers use it for local paths."""
        if not (self.local and target.local):
            raise ValueError(f"{self.uri}: rename is not atomic on an object store")
        os.replace(self.path, target.path)


def temporary_name(path: str) -> str:
    """The name a local file is written under before it is renamed to `path` (an absolute path)."""
    head, _, name = path.rpartition("/")
    return f"{head}/.{name}.tmp"


def read_parquet(location: Location, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file as a table: by its path locally (pyarrow's own reader, memory-mapped as before),
    through the fsspec filesystem otherwise."""
    if location.local:
        return pq.read_table(location.path, columns=columns)
    return pq.read_table(location.path, columns=columns, filesystem=location.fs)


def parquet_file(location: Location) -> pq.ParquetFile:
    """A Parquet file's metadata and batches, without reading it whole."""
    if location.local:
        return pq.ParquetFile(location.path)
    return pq.ParquetFile(location.path, filesystem=location.fs)
