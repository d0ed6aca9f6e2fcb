"""URL lists in parts: a file, a directory or a glob of files of one format, its format told by the
extensions when the spec does not name it, every part read in name order."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.storage import Location
from pipeline.ingest.prepared_list import PreparedList
from pipeline.ingest.url_list import ListPreparation, check_columns, read_batches
from pipeline.ingest.urlpolicy import NetworkPolicy
from pipeline.spec.config import InputSpec, SpecError, spec_from_dict
from pipeline.spec.list_files import ListFilesError, format_of, list_files


def _csv(path: Path, first: int, n: int) -> None:
    path.write_text(
        "url,caption\n"
        + "".join(f"http://127.0.0.1:9/{i}.jpg,caption {i}\n" for i in range(first, first + n))
    )


def _parts(tmp_path: Path) -> Path:
    """A directory as Spark leaves one: parts out of creation order, a marker and a hidden file."""
    parts = tmp_path / "list"
    parts.mkdir()
    _csv(parts / "part-00001.csv", 3, 2)
    _csv(parts / "part-00000.csv", 0, 3)
    (parts / "_SUCCESS").write_text("")
    (parts / ".part-00000.csv.crc").write_bytes(b"\x00\x01")
    return parts


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("a.parquet", "parquet"), ("part-0.snappy.parquet", "parquet"), ("a.CSV", "csv"), ("a.csv.gz", "csv"),
     ("a.tsv.zst", "tsv"), ("a.jsonl", "jsonl"), ("a.ndjson", "jsonl"), ("a.txt", None), ("README", None),
     ("a.gz", None)],
)  # fmt: skip
def test_format_of_reads_the_extension_through_a_compression_suffix(name, fmt):
    assert format_of(name) == fmt


def test_a_directory_is_its_list_files_in_name_order(tmp_path):
    parts = _parts(tmp_path)
    found, fmt = list_files(str(parts), None)
    assert [p.name for p in found] == ["part-00000.csv", "part-00001.csv"] and fmt == "csv"
    rows = [r for batch in read_batches(InputSpec(str(parts))) for r in batch.to_pylist()]
    assert [r["caption"] for r in rows] == [f"caption {i}" for i in range(5)]


def test_a_glob_names_the_files_it_matches_and_compressed_parts_are_read(tmp_path):
    (tmp_path / "b").mkdir()
    _csv(tmp_path / "b" / "x.csv", 0, 2)
    with gzip.open(tmp_path / "b" / "y.csv.gz", "wt") as f:
        f.write("url,caption\nhttp://127.0.0.1:9/g.jpg,zipped\n")
    _csv(tmp_path / "b" / "z.tsv", 0, 1)  # not matched
    spec = InputSpec(str(tmp_path / "b" / "*.csv*"))
    assert [r["caption"] for b in read_batches(spec) for r in b.to_pylist()] == [
        "caption 0",
        "caption 1",
        "zipped",
    ]


def test_prepare_over_parts_keeps_every_row_in_order_and_an_added_part_is_new_input(tmp_path):
    parts = _parts(tmp_path)
    spec = InputSpec(str(parts))
    out = PreparedList(Location.of(tmp_path / "_input"))
    policy = NetworkPolicy(allow_private_networks=True)
    preparation = ListPreparation(spec, policy, out, 10, "fp", downloaded=False)
    preparation.write()
    assert preparation.rows == 5
    assert out.read("00000")["capfilt_caption"].to_pylist() == [f"caption {i}" for i in range(5)]
    _csv(parts / "part-00002.csv", 5, 1)
    with pytest.raises(SpecError, match="holds downloads made from another URL list"):
        ListPreparation(spec, policy, out, 10, "fp", downloaded=True)


def test_the_spec_records_the_format_it_read(tmp_path):
    parts = _parts(tmp_path)
    spec = spec_from_dict({"input": {"url_list": str(parts)}, "output": {"path": str(tmp_path / "out")}})
    assert spec.input.input_format == "csv"
    pq.write_table(pa.table({"url": ["u"], "caption": ["c"]}), tmp_path / "one.parquet")
    before = spec_from_dict({"input": {"url_list": str(tmp_path / "one.parquet"), "input_format": "parquet"},
                             "output": {"path": "out"}})  # fmt: skip
    after = spec_from_dict({"input": {"url_list": str(tmp_path / "one.parquet")}, "output": {"path": "out"}})
    assert after == before  # a job written before the format was inferred keeps its fingerprints


@pytest.mark.parametrize(
    ("files", "url_list", "given", "message"),
    [
        (["urls.csv"], "urls.csv", "parquet",
         r"^input.input_format: .*urls.csv is named as csv, but input.input_format is parquet; set input.input_format: csv"),
        (["urls.txt"], "urls.txt", None, r"^input.input_format: cannot tell the format of .*urls.txt from its name; set input.input_format"),
        (["d/a.csv", "d/b.parquet"], "d", None, r"^input.url_list: .*d holds lists of several formats \(parquet, csv\)"),
        (["d/_SUCCESS"], "d", None, r"^input.url_list: .*d is a directory without list files"),
        (["d/a.csv"], "d/*.parquet", None, r"^input.url_list: .*d/\*.parquet matches no file"),
        ([], "nothing.csv", None, r"^input.url_list: no such file: .*nothing.csv \(a file, a directory or a glob"),
    ],
)  # fmt: skip
def test_what_cannot_be_read_as_one_list_is_one_line_naming_what_to_set(
    tmp_path, files, url_list, given, message
):
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("url\n")
    url_list = str(tmp_path / url_list)
    with pytest.raises(ListFilesError, match=message):
        list_files(url_list, given)
    with pytest.raises(SpecError, match=message):
        spec_from_dict({"input": {"url_list": url_list, "input_format": given}, "output": {"path": "out"}})


def test_a_later_part_without_a_named_column_is_refused_naming_the_part(tmp_path):
    parts = _parts(tmp_path)
    (parts / "part-00002.csv").write_text("link,caption\nhttp://127.0.0.1:9/x.jpg,x\n")
    check_columns(InputSpec(str(parts)))  # the first part has the columns: checked before any work
    with pytest.raises(SpecError, match=r"^input.url_col: column 'url' not found in .*part-00002.csv"):
        list(read_batches(InputSpec(str(parts))))
