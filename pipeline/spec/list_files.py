"""Which files `input.url_list` names, and in which format they are read.

The lists people curate ship in parts (LAION-400M as 32 Parquet files, DataComp as thousands), so
`url_list` is one file, a directory, or a glob pattern, local or on an object store:
- a directory's parts are the files directly in it, except hidden ones and those starting with `_`
  (Spark's and Hadoop's `_SUCCESS`, `.crc` files);
- a glob in the file name (`DIR/part-*.parquet`) names the files of DIR it matches;
- parts are read in the order of their names, so a list's rows, and so its keys, are the same on
  every run.
All parts are of one format. `input.input_format`, when not given, comes from the parts' extensions
(`.parquet`, `.csv`, `.tsv`, `.jsonl`, each possibly compressed: `.csv.gz`); an extension that names
another format than the one set is an error that names the format to set, and so is a part whose
format cannot be told. Resolved when a spec is loaded to run, so the spec a job records, and its
fingerprints, always name the format.
"""

from __future__ import annotations

from pipeline.core.messages import one_line, printable
from pipeline.core.storage import Location

FORMATS = ("parquet", "csv", "tsv", "jsonl")
_EXTENSIONS = {"parquet": "parquet", "csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "ndjson": "jsonl"}
_COMPRESSION = ("gz", "bz2", "xz", "zst", "zstd", "lz4")  # fsspec decompresses these by name
_GLOB = "*?["


class ListFilesError(ValueError):
    """What is wrong with `input.url_list` or `input.input_format`, in one line naming the key."""


def format_of(name: str) -> str | None:
    """The list format a file name's extension names, or None."""
    parts = name.lower().split(".")[1:]
    if parts and parts[-1] in _COMPRESSION:
        parts = parts[:-1]
    return _EXTENSIONS.get(parts[-1]) if parts else None


def list_files(url_list: str, input_format: str | None) -> tuple[list[Location], str]:
    """The parts `url_list` names, in reading order, and their format."""
    parts = _parts(url_list)
    named = {part: format_of(part.name) for part in parts}
    if input_format is None:
        unknown = [p for p, fmt in named.items() if fmt is None]
        if unknown:
            raise ListFilesError(
                f"input.input_format: cannot tell the format of {printable(unknown[0])} from its name; "
                f"set input.input_format ({', '.join(FORMATS)})"
            )
        found = sorted(set(named.values()), key=FORMATS.index)
        if len(found) > 1:
            raise ListFilesError(
                f"input.url_list: {printable(url_list)} holds lists of several formats ({', '.join(found)}); "
                "name the files of one format (a glob such as DIR/*.parquet)"
            )
        return parts, found[0]
    for part, fmt in named.items():
        if fmt is not None and fmt != input_format:
            raise ListFilesError(
                f"input.input_format: {printable(part)} is named as {fmt}, but input.input_format is "
                f"{input_format}; set input.input_format: {fmt} (or leave it out: it follows the extension)"
            )
    return parts, input_format


def _parts(url_list: str) -> list[Location]:
    try:
        location = Location.of(url_list)
        if any(c in location.name for c in _GLOB):
            parts = location.parent.glob(location.name)  # one listing of the directory, sorted
            what = "matches no file"
        elif location.is_file():
            return [location]
        elif location.is_dir():
            parts = [p for p in location.files() if not p.name.startswith((".", "_"))]
            what = "is a directory without list files"
        else:
            raise ListFilesError(
                f"input.url_list: no such file: {printable(url_list)} "
                "(a file, a directory or a glob; a local path or an fsspec URI)"
            )
    except (ImportError, ValueError, OSError) as err:  # unknown scheme, backend not installed, no access
        if isinstance(err, ListFilesError):
            raise
        raise ListFilesError(f"input.url_list: cannot open {printable(url_list)}: {one_line(err)}") from None
    if not parts:
        raise ListFilesError(f"input.url_list: {printable(url_list)} {what}")
    return parts
