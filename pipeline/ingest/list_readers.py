"""A URL list file, whatever its format, read as a stream of record batches that one odd value cannot break.

Lists scraped from the web are dirty: a byte that is not UTF-8 in one caption, a URL column of
integers, a JSON line whose `url` is a number or holds a raw control character. One such row must not
fail a list of millions (`url_list` gives the row a fate instead), so text is read as bytes and
decoded here, with U+FFFD for what is not UTF-8, and other types become strings (`as_strings`).
Only what makes the file itself unreadable is an error (`UnreadableList`): not that format, a
malformed CSV row or JSON line. Each format is streamed: memory holds one block, not the list.

JSON Lines are cut into blocks at line ends here and each block is parsed by pyarrow with every
wanted column typed as binary, so no block's type inference can disagree with another's. pyarrow's
own streaming reader (`pyarrow.json.open_json`, in pyarrow 26) was not enough: one value of another
type (`"url": 5`) fails the whole read, it cannot go on after an error, and its row numbers restart
in every block. A block pyarrow refuses is parsed again line by line with Python's `json`, which
turns numbers and objects into their JSON text and names the line of a malformed one.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from typing import IO, Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json

from pipeline.core.messages import one_line
from pipeline.core.storage import Location, parquet_file

BATCH_ROWS = 65536  # Parquet batches
BLOCK_BYTES = 1 << 20  # JSON Lines blocks (pyarrow's default block size)
# pyarrow's streaming CSV reader reads ahead many blocks, however slowly its batches are taken; small
# blocks keep what it holds small (tests/test_url_list.py's million-row test bounds the whole prepare).
CSV_BLOCK_BYTES = 1 << 18
MAX_LINE_BYTES = 64 << 20  # one JSON line; the block that holds it is read whole
_SNIFF_BYTES = 4096
_BOM = b"\xef\xbb\xbf"
_BINARY_BYTES = [c for c in range(32) if c not in b"\t\n\r\x0c\x1b"]
# Binary formats a text list is sometimes by mistake, by their first bytes.
_MAGIC = {
    b"PAR1": ("a Parquet file", ""),
    b"\x1f\x8b": ("gzip-compressed", " (name it .gz to have it decompressed)"),
    b"PK\x03\x04": ("a zip archive", ""),
    b"\x28\xb5\x2f\xfd": ("zstd-compressed", " (name it .zst to have it decompressed)"),
}


class UnreadableList(ValueError):
    """Why a file cannot be read as the format the spec names, in one line."""


def column_names(source: Location, fmt: str) -> list[str] | None:
    """The list's column names, from its schema or first block; None for a JSON Lines file with no
    line at all, whose columns cannot be known (it has no rows either)."""
    if fmt == "parquet":
        return parquet_file(source).schema_arrow.names
    _check_text(source, fmt)
    if fmt in ("csv", "tsv"):
        with _pyarrow_input(source) as stream:
            read = pa_csv.ReadOptions(block_size=CSV_BLOCK_BYTES)
            return pa_csv.open_csv(stream, read_options=read, parse_options=_csv_options(fmt)).schema.names
    with _byte_stream(source) as stream:
        for first_line, block in _line_blocks(stream):
            if block.strip():
                return _jsonl_names(block, first_line)
    return None


def batches(source: Location, fmt: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The list's `columns` (distinct names, all present: see `column_names`) in batches, in order.
    Text comes as binary or string arrays, the rest as stored; `as_strings` makes any of them strings."""
    if fmt == "parquet":
        yield from parquet_file(source).iter_batches(batch_size=BATCH_ROWS, columns=columns)
    elif fmt in ("csv", "tsv"):
        yield from _csv_batches(source, fmt, columns)
    else:
        yield from _jsonl_batches(source, columns)


def as_strings(column: pa.Array) -> pa.Array:
    """A column as strings, null kept null. Arrow's cast when it can (strings, valid UTF-8 bytes,
    numbers, dictionaries); else bytes are decoded with U+FFFD for what is not UTF-8, and nested
    values become their JSON text."""
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), pa.string())
    try:
        return column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return pa.array([_text(v) for v in column.to_pylist()], pa.string())


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):  # a lone surrogate (JSON's "\ud800") is not UTF-8 either
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return json.dumps(value, ensure_ascii=False, default=str)


# -- CSV and TSV ------------------------------------------------------------------------------------


def _csv_options(fmt: str) -> pa_csv.ParseOptions:
    # Quoted values may hold line breaks: alt-text does.
    return pa_csv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)


def _csv_batches(source: Location, fmt: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    convert = pa_csv.ConvertOptions(include_columns=columns, column_types=dict.fromkeys(columns, pa.binary()))
    read = pa_csv.ReadOptions(block_size=CSV_BLOCK_BYTES)
    rows = 0
    with _pyarrow_input(source) as stream:
        try:
            for batch in pa_csv.open_csv(stream, read_options=read, parse_options=_csv_options(fmt),
                                         convert_options=convert):  # fmt: skip
                rows += batch.num_rows
                yield batch
        except pa.ArrowInvalid as err:  # pyarrow names the row's text, not its number
            if "straddl" in str(err):  # its own words ask for a bigger block: not the user's to give
                raise UnreadableList(
                    f"CSV parse error: a row after data row {rows} is longer than {CSV_BLOCK_BYTES >> 10} "
                    "KiB, or a quote there opens a value that never closes"
                ) from None
            raise UnreadableList(f"{one_line(err)} (after data row {rows})") from None


# -- JSON Lines ------------------------------------------------------------------------------------


def _jsonl_batches(source: Location, columns: list[str]) -> Iterator[pa.RecordBatch]:
    options = pa_json.ParseOptions(
        explicit_schema=pa.schema([(c, pa.binary()) for c in columns]), unexpected_field_behavior="ignore"
    )
    with _byte_stream(source) as stream:
        for first_line, block in _line_blocks(stream):
            if not block.strip():
                continue
            try:
                table = pa_json.read_json(io.BytesIO(block), parse_options=options).select(columns)
            except (pa.ArrowInvalid, UnicodeDecodeError):  # one odd value: this block, line by line
                yield _parsed_lines(block, first_line, columns)
                continue
            yield from table.to_batches()


def _jsonl_names(block: bytes, first_line: int) -> list[str]:
    try:
        return pa_json.read_json(io.BytesIO(block)).schema.names
    except (pa.ArrowInvalid, UnicodeDecodeError):
        names: dict[str, None] = {}
        for _, record in _records(block, first_line):
            names.update(dict.fromkeys(record))
        return list(names)


def _parsed_lines(block: bytes, first_line: int, columns: list[str]) -> pa.RecordBatch:
    values: dict[str, list[str | None]] = {c: [] for c in columns}
    for _, record in _records(block, first_line):
        for c in columns:
            values[c].append(_text(record.get(c)))
    return pa.RecordBatch.from_arrays([pa.array(values[c], pa.string()) for c in columns], names=columns)


def _records(block: bytes, first_line: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is an error."""
    for number, line in enumerate(block.split(b"\n"), start=first_line):
        if not line.strip():
            continue
        try:
            # strict=False: a raw control character inside a string is the string's, not an error
            record = json.loads(line.decode("utf-8", "replace"), strict=False)
        except json.JSONDecodeError as err:
            raise UnreadableList(f"line {number}: not JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(record, dict):
            raise UnreadableList(f"line {number}: a JSON {type(record).__name__}, not an object")
        yield number, record


def _line_blocks(stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(number of the block's first line, block): about BLOCK_BYTES each, cut after a line end. A
    line longer than MAX_LINE_BYTES (a whole JSON document on one line, say) is refused."""
    parts: list[bytes] = []  # read since the last cut, none of them holding a line end
    held, line = 0, 1
    while True:
        data = stream.read(BLOCK_BYTES)
        if line == 1 and not parts and data.startswith(_BOM):
            data = data[len(_BOM) :]
        if not data:
            if parts:
                yield line, b"".join(parts)
            return
        end = data.find(b"\n")  # of the line that `parts` began
        if held + (len(data) if end < 0 else end) > MAX_LINE_BYTES:
            raise UnreadableList(f"line {line} is longer than {MAX_LINE_BYTES >> 20} MiB")
        if end < 0:
            parts.append(data)
            held += len(data)
            continue
        cut = data.rfind(b"\n") + 1
        block = b"".join([*parts, data[:cut]])
        parts, held = ([data[cut:]], len(data) - cut) if cut < len(data) else ([], 0)
        yield line, block
        line += block.count(b"\n")


# -- opening ---------------------------------------------------------------------------------------


def _check_text(source: Location, fmt: str) -> None:
    """A binary file named as text fails here with what it is, not with a parse error about its bytes."""
    with _byte_stream(source) as stream:
        head = stream.read(_SNIFF_BYTES)
    for magic, (what, hint) in _MAGIC.items():
        if head.startswith(magic):
            raise UnreadableList(f"it is {what}, not {fmt} text{hint}")
    # A hostile caption may hold a control character or two; binary data is one byte in ten of them.
    controls = sum(head.count(bytes([c])) for c in _BINARY_BYTES)
    if controls > max(8, len(head) // 20):
        raise UnreadableList(
            f"it is binary, not {fmt} text ({controls} of its first {len(head)} bytes are control characters)"
        )


@contextlib.contextmanager
def _pyarrow_input(source: Location) -> Iterator[Any]:
    """What pyarrow's CSV reader gets: the path locally (it infers compression from the name), else an
    fsspec stream that decompresses by the name the same way."""
    if source.local:
        yield source.path
        return
    with _byte_stream(source) as stream:
        yield stream


@contextlib.contextmanager
def _byte_stream(source: Location) -> Iterator[IO[bytes]]:
    """The file's bytes, decompressed by its name: by pyarrow locally, as pyarrow's CSV reader does
    (.gz, .bz2, .zst, .lz4), else by fsspec (.gz, .bz2, .xz, .zip)."""
    opened = (
        pa.input_stream(source.path, compression="detect")
        if source.local
        else source.fs.open(source.path, "rb", compression="infer")
    )
    with opened as stream:
        yield stream
