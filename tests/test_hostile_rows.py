"""The list side of the hostile-input catalogue: odd rows and odd input files, through the real pipeline.

A bad row ends as a row with a fate, and the job goes on; a bad file is refused with one line before
any work (or, for a malformed row deep in a big file, when `prepare` reaches it, still before any
download). The "Rows" cases are rows of three real jobs run once for the module: the main one (a
Parquet list whose text columns are raw bytes, with two extra columns), one with `caption_col: null`
over a CSV written byte by byte, and one whose URL column holds integers. Their threshold is 0, so
every row that reaches the models is kept and its KEY.json and KEY.txt can be read back too. The
"Input files" cases each run `capfilt run` on a job spec.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml

from pipeline.cli import main
from pipeline.job.runner import JobResult, run_job
from pipeline.output.shard_writer import sample_record
from pipeline.spec.fates import Fate
from pipeline.spec.records import SHARD_SCHEMA
from pipeline.synthetic.sample_web import Route, jpeg_bytes, render_scene
from tests.catalogue import ERROR, SCORED, Case, Section, assert_scored
from tests.conftest import make_spec, read_records

pytestmark = pytest.mark.usefixtures("ray_local")

NO_ROWS = "runs: a complete job with no rows"  # an input file that is fine and empty
LONG_CAPTION = ("a long caption about a red square on a blue ground, " * 200)[:10_000]
CONTROL_CAPTION = "nul \x00 escape \x1b[31mred\x1b[0m crlf \r\n right-to-left \u202eevil"
EXTRA_COLUMNS = ["source", "rank"]

ROWS = [
    Case("empty-caption", 'caption ""', SCORED),
    Case("blank-caption", "caption of spaces and a tab", SCORED),
    Case("null-caption", "caption null", SCORED),
    Case("no-caption-column", "input.caption_col: null (a CSV list with a caption column, ignored)", SCORED),
    Case("long-caption", "a 10,000-character caption: stored whole, scored on its first 35 tokens", SCORED),
    Case("caption-not-utf8", "caption bytes `caf\\xe9 au lait`: stored as `caf\ufffd au lait`", SCORED),
    Case("caption-control-characters", "caption with NUL, ESC sequences, CR LF and U+202E: stored as given", SCORED),
    Case("url-not-utf8", "URL bytes with `\\xff` in a CSV list", Fate.INVALID_INPUT.value, "was not valid UTF-8"),
    Case("url-control-character", "URL with an ESC character", Fate.INVALID_INPUT.value, "contains the character '\\x1b'"),
    Case("url-with-a-space", "URL `http://…/a picture.jpg`", Fate.INVALID_INPUT.value, "contains the character ' '"),
    Case("not-a-url", "URL `not a url`", Fate.INVALID_INPUT.value, "not a url"),
    Case("empty-url", 'URL ""', Fate.INVALID_INPUT.value, "empty url"),
    Case("null-url", "URL null", Fate.INVALID_INPUT.value, "empty url"),
    Case("integer-url", "URL column of Parquet int64: the row's `url` is `12345`", Fate.INVALID_INPUT.value, "no scheme"),
    Case("duplicate-url", "the same URL on two rows: both downloaded and scored, counted in duplicate_urls", SCORED),
    Case("extra-columns", "input.extra_columns [source, rank], a string and an int64 column: carried as strings, "
         "null as null, into the Parquet and KEY.json", SCORED),
]  # fmt: skip

FILES = [
    Case("parquet-that-is-csv", "input_format parquet, the file is CSV", ERROR, "Parquet magic bytes not found"),
    Case("csv-that-is-binary", "input_format csv, the file is binary (every byte value, repeated)", ERROR, "it is binary, not csv text"),
    Case("csv-that-is-gzip", "input_format csv, the file is gzip-compressed but not named .gz", ERROR,
         "it is gzip-compressed, not csv text (name it .gz"),
    Case("malformed-json-line", "jsonl whose third line is not JSON", ERROR, "line 3: not JSON"),
    Case("malformed-csv-row", "a CSV of 40,000 rows whose row 30,000 has four fields: refused when prepared, "
         "before any download", ERROR, "Expected 2 columns, got 4: http://127.0.0.1/bad,too,many,fields (after data row"),
    Case("missing-url-column", "no column `url`", ERROR,
         "input.url_col: column 'url' not found in … urls.csv (columns: link, caption)"),
    Case("missing-caption-column", "no column `caption` (the default caption_col)", ERROR,
         "input.caption_col: column 'caption' not found"),
    Case("missing-extra-column", "input.extra_columns names a column the list lacks", ERROR,
         "input.extra_columns: column 'source' not found"),
    Case("extra-column-named-like-output", "input.extra_columns: [status]", ERROR,
         "input.extra_columns: 'status' is an output column name"),
    Case("empty-csv", "a CSV file of 0 bytes (no header)", ERROR, "Empty CSV file"),
    Case("header-only-csv", "a CSV with its header and no row", NO_ROWS),
    Case("zero-row-parquet", "a Parquet list with its columns and no row", NO_ROWS),
    Case("empty-jsonl", "a JSON Lines file with no line", NO_ROWS),
]  # fmt: skip

CATALOGUE = [
    Section("Rows", "Odd values in the URL list. A URL that cannot be fetched ends `invalid_input` before any "
            "request; an odd caption is stored as given (bytes that are not UTF-8 as U+FFFD) and the image is "
            "still captioned and scored.", tuple(ROWS)),
    Section("Input files", "Files that cannot be read as the list the spec names. Each is refused with one "
            "line naming the file and the problem, exit status 2, before anything is downloaded; an empty list "
            "is a complete job with no rows.", tuple(FILES)),
]  # fmt: skip


# --- the Rows jobs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowsJobs:
    records: dict[str, list[dict[str, Any]]]  # by case name: the case's output rows, in list order
    samples: dict[tuple[str, str], dict[str, Any]]  # by (url, key): the tar's samples, KEY.json decoded
    manifests: dict[str, dict[str, Any]]  # by job: main, no-caption, int-url
    columns: dict[str, list[str]]  # by job: the output Parquet's columns


def _image(site: Any, name: str, seed: int) -> bytes:
    path = f"/rows/{name.replace(' ', '-')}.jpg"
    site.add(path, Route(body=jpeg_bytes(render_scene(seed)[0]), headers=(("Content-Type", "image/jpeg"),)))
    return site.url(path).encode()


def _main_list(site: Any, path: Path) -> list[str]:
    """The main job's list: url and caption as Parquet binary columns, so any bytes fit; two extra
    columns. Returns the case name of each row."""
    image = {name: _image(site, name, 300 + i) for i, name in enumerate(
        ["empty-caption", "blank-caption", "null-caption", "long-caption", "caption-not-utf8",
         "caption-control-characters", "duplicate-url", "extra-columns"])}  # fmt: skip
    rows: list[tuple[str, bytes | None, bytes | None, str | None, int | None]] = [
        ("empty-caption", image["empty-caption"], b"", "web", 1),
        ("blank-caption", image["blank-caption"], b"  \t ", "web", 2),
        ("null-caption", image["null-caption"], None, "web", 3),
        ("long-caption", image["long-caption"], LONG_CAPTION.encode(), "web", 4),
        ("caption-not-utf8", image["caption-not-utf8"], b"caf\xe9 au lait", "web", 5),
        (
            "caption-control-characters",
            image["caption-control-characters"],
            CONTROL_CAPTION.encode(),
            "web",
            6,
        ),
        ("duplicate-url", image["duplicate-url"], b"the first row of a URL listed twice", "web", 7),
        ("url-control-character", site.url("/rows/a\x1bb.jpg").encode(), b"an escape in the url", "web", 8),
        ("url-with-a-space", site.url("/rows/a picture.jpg").encode(), b"a space in the url", "web", 9),
        ("not-a-url", b"not a url", b"no url at all", "web", 10),
        ("empty-url", b"", b"an empty url", "web", 11),
        ("null-url", None, b"a null url", "web", 12),
        ("duplicate-url", image["duplicate-url"], b"the second row of a URL listed twice", "web", 13),
        ("extra-columns", image["extra-columns"], b"extra columns ride along", None, None),
    ]
    names, urls, captions, sources, ranks = zip(*rows, strict=True)
    table = pa.table({
        "url": pa.array(urls, pa.binary()), "caption": pa.array(captions, pa.binary()),
        "source": pa.array(sources, pa.string()), "rank": pa.array(ranks, pa.int64()),
    })  # fmt: skip
    pq.write_table(table, path)
    return list(names)


def _no_caption_list(site: Any, path: Path) -> list[str]:
    """A CSV written byte by byte: a caption column the spec ignores, a URL that is not UTF-8."""
    url = _image(site, "no-caption-column", 400).decode()
    path.write_bytes(
        b"url,caption\n"
        + f"{url},ignored: caption_col is null\n".encode()
        + site.url("/rows/caf\xe9.jpg").encode("latin-1")
        + b",a url that is not utf-8\n"
    )
    return ["no-caption-column", "url-not-utf8"]


def _run(tmp: Path, models: Any, name: str, **input: Any) -> JobResult:
    spec = make_spec(tmp, [], models, out=name, input=input, filter={"threshold": 0.0})
    return run_job(spec, log=lambda _: None)


@pytest.fixture(scope="module")
def rows_jobs(tmp_path_factory, web, tiny_models) -> RowsJobs:
    site, _ = web
    tmp = tmp_path_factory.mktemp("hostile-rows")
    lists = {
        "main": (tmp / "main.parquet", _main_list(site, tmp / "main.parquet"), {"extra_columns": EXTRA_COLUMNS}),
        "no-caption": (tmp / "no-caption.csv", _no_caption_list(site, tmp / "no-caption.csv"),
                       {"input_format": "csv", "caption_col": None}),
    }  # fmt: skip
    pq.write_table(
        pa.table({"url": pa.array([12345], pa.int64()), "caption": ["an integer url"]}), tmp / "int.parquet"
    )
    lists["int-url"] = (tmp / "int.parquet", ["integer-url"], {})
    records: dict[str, list[dict[str, Any]]] = {}
    samples: dict[tuple[str, str], dict[str, Any]] = {}
    manifests, columns = {}, {}
    for job, (url_list, names, input) in lists.items():
        result = _run(tmp, tiny_models, job, url_list=str(url_list), **input)
        assert result.complete
        manifests[job] = result.manifest
        rows = sorted(read_records(result.layout), key=lambda r: r["key"])
        assert len(rows) == len(names)  # row i of the list is the i-th key
        for name, row in zip(names, rows, strict=True):
            records.setdefault(name, []).append(row)
        columns[job] = pq.read_schema(result.layout.shard_parquet("00000")).names
        tars = [str(p) for p in result.layout.shards.glob("*.tar")]  # none where a job kept no row
        for s in wds.WebDataset(tars, shardshuffle=False, empty_check=False) if tars else []:
            record = json.loads(s["json"])  # keys repeat across the jobs; with the URL they do not
            samples[(record["url"], s["__key__"])] = {"json": record, "txt": s["txt"]}
    return RowsJobs(records, samples, manifests, columns)


def _scored(row: dict[str, Any]) -> None:
    assert row["synthetic_captions"] and all(row["synthetic_captions"]), row  # it reached the captioner
    assert len(row["synthetic_itm"]) == len(row["synthetic_captions"])


def _in_tar(jobs: RowsJobs, row: dict[str, Any]) -> dict[str, Any]:
    """The row's sample: its KEY.json is its record, its KEY.txt the selected caption."""
    sample = jobs.samples[(row["url"], row["key"])]
    assert sample["json"] == json.loads(json.dumps(sample_record(row)))
    assert sample["txt"] == row["caption"].encode()
    return sample


def _synthetic_only(caption: str | None) -> Callable[[RowsJobs, dict[str, Any]], None]:
    """A web caption that is empty, blank or absent is stored as it was and is no candidate: the row
    is kept on its synthetic captions."""

    def check(jobs: RowsJobs, row: dict[str, Any]) -> None:
        assert row["web_caption"] == caption
        assert row["web_caption_itm"] is None
        assert row["kept_captions"] and all(c["source"] == "synthetic" for c in row["kept_captions"])
        _in_tar(jobs, row)

    return check


def _stored_as_given(caption: str) -> Callable[[RowsJobs, dict[str, Any]], None]:
    def check(jobs: RowsJobs, row: dict[str, Any]) -> None:
        assert row["web_caption"] == caption
        assert _in_tar(jobs, row)["json"]["web_caption"] == caption
        assert row["web_caption_itm"] is not None  # scored like any caption

    return check


def _url(ending: str) -> Callable[[RowsJobs, dict[str, Any]], None]:
    """The row keeps its URL as given (`ending` is enough to tell it from the others)."""

    def check(jobs: RowsJobs, row: dict[str, Any]) -> None:
        assert row["url"] is not None and row["url"].endswith(ending) and (ending or row["url"] == ""), row[
            "url"
        ]

    return check


def _null_url(jobs: RowsJobs, row: dict[str, Any]) -> None:
    assert row["url"] is None


def _integer_url(jobs: RowsJobs, row: dict[str, Any]) -> None:
    assert (row["url"], row["web_caption"]) == ("12345", "an integer url")


def _extra_columns(jobs: RowsJobs, row: dict[str, Any]) -> None:
    assert jobs.columns["main"] == SHARD_SCHEMA.names + EXTRA_COLUMNS  # after the fixed columns
    assert (row["source"], row["rank"]) == (None, None)  # null stays null
    first = jobs.records["empty-caption"][0]
    assert (first["source"], first["rank"]) == ("web", "1")  # an int64 column as its text
    assert {k: _in_tar(jobs, first)["json"][k] for k in EXTRA_COLUMNS} == {"source": "web", "rank": "1"}
    assert {k: _in_tar(jobs, row)["json"][k] for k in EXTRA_COLUMNS} == {"source": "", "rank": ""}  # typed
    assert jobs.columns["int-url"] == SHARD_SCHEMA.names  # only what the spec asks for


def _duplicate(jobs: RowsJobs, row: dict[str, Any]) -> None:
    first, second = jobs.records["duplicate-url"]
    assert first["url"] == second["url"] and first["key"] != second["key"]
    assert first["web_caption"] != second["web_caption"]
    _scored(second)
    assert jobs.manifests["main"]["duplicate_urls"] == 1  # empty and null URLs are no URL: not counted
    assert jobs.manifests["no-caption"]["duplicate_urls"] == 0


CHECKS: dict[str, Callable[[RowsJobs, dict[str, Any]], None]] = {
    "empty-caption": _synthetic_only(""),
    "blank-caption": _synthetic_only("  \t "),
    "null-caption": _synthetic_only(None),
    "no-caption-column": _synthetic_only(None),  # the list's caption column was not read
    "long-caption": _stored_as_given(LONG_CAPTION),
    "caption-not-utf8": _stored_as_given("caf\ufffd au lait"),
    "caption-control-characters": _stored_as_given(CONTROL_CAPTION),
    "url-not-utf8": _url("/rows/caf\ufffd.jpg"),
    "url-control-character": _url("/rows/a\x1bb.jpg"),
    "url-with-a-space": _url("/rows/a picture.jpg"),
    "not-a-url": _url("not a url"),
    "empty-url": _url(""),
    "null-url": _null_url,
    "integer-url": _integer_url,
    "duplicate-url": _duplicate,
    "extra-columns": _extra_columns,
}


@pytest.mark.parametrize("case", ROWS, ids=lambda c: c.id)
def test_rows(rows_jobs, case):
    row = rows_jobs.records[case.name][0]
    if case.outcome == SCORED:
        assert_scored(row)
        _scored(row)
    else:
        assert row["status"] == case.outcome, row
        assert case.says in row["error"], row["error"]
        assert row["synthetic_captions"] is None and row["width"] is None
    CHECKS[case.name](rows_jobs, row)


def test_every_row_of_the_rows_jobs_is_a_case_and_the_fates_add_up(rows_jobs):
    assert set(CHECKS) == {c.name for c in ROWS} == set(rows_jobs.records)
    for manifest in rows_jobs.manifests.values():
        assert manifest["complete"] and sum(manifest["counts"].values()) == manifest["input_rows"]


# --- the Input files cases ----------------------------------------------------------------------------


def _write_list(case: str, tmp: Path) -> tuple[Path, dict[str, Any]]:
    """The case's list file and its input section."""
    csv = "url,caption\nhttp://127.0.0.1:9/a.jpg,a picture\n"
    writers: dict[str, tuple[str, Callable[[Path], Any], dict[str, Any]]] = {
        "parquet-that-is-csv": ("urls.parquet", lambda p: p.write_text(csv), {}),
        "csv-that-is-binary": ("urls.csv", lambda p: p.write_bytes(bytes(range(256)) * 20), {"input_format": "csv"}),
        "csv-that-is-gzip": ("urls.csv", lambda p: p.write_bytes(__import__("gzip").compress(csv.encode())),
                             {"input_format": "csv"}),
        "malformed-json-line": ("urls.jsonl", lambda p: p.write_text(
            '{"url": "http://127.0.0.1:9/a.jpg", "caption": "a"}\n{"url": "http://127.0.0.1:9/b.jpg"}\n'
            '{"url": "http://127.0.0.1:9/c.jpg", "caption": \n'), {"input_format": "jsonl"}),
        "malformed-csv-row": ("urls.csv", _malformed_csv, {"input_format": "csv"}),
        "missing-url-column": ("urls.csv", lambda p: p.write_text(csv.replace("url,", "link,", 1)),
                               {"input_format": "csv"}),
        "missing-caption-column": ("urls.csv", lambda p: p.write_text("url\nhttp://127.0.0.1:9/a.jpg\n"),
                                   {"input_format": "csv"}),
        "missing-extra-column": ("urls.csv", lambda p: p.write_text(csv),
                                 {"input_format": "csv", "extra_columns": ["source"]}),
        "extra-column-named-like-output": ("urls.csv", lambda p: p.write_text(csv),
                                                     {"input_format": "csv", "extra_columns": ["status"]}),
        "empty-csv": ("urls.csv", lambda p: p.write_bytes(b""), {"input_format": "csv"}),
        "header-only-csv": ("urls.csv", lambda p: p.write_text("url,caption\n"), {"input_format": "csv"}),
        "zero-row-parquet": ("urls.parquet", lambda p: pq.write_table(
            pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}), p), {}),
        "empty-jsonl": ("urls.jsonl", lambda p: p.write_bytes(b""), {"input_format": "jsonl"}),
    }  # fmt: skip
    name, write, input = writers[case]
    path = tmp / name
    write(path)
    return path, input


def _malformed_csv(path: Path) -> None:
    lines = ["url,caption"] + [f"http://127.0.0.1:9/{i}.jpg,picture {i}" for i in range(40_000)]
    lines[30_000] = "http://127.0.0.1/bad,too,many,fields"
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("case", FILES, ids=lambda c: c.id)
def test_input_files(case, tmp_path, tiny_models, capsys):
    url_list, input = _write_list(case.name, tmp_path)
    spec = make_spec(tmp_path, [], tiny_models).to_dict()
    spec["input"] = {"url_list": str(url_list), **input}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    status = main(["run", str(job)])
    err = capsys.readouterr().err
    out = Path(spec["output"]["path"])
    if case.outcome == ERROR:
        assert status == 2
        lines = [line for line in err.splitlines() if line.startswith("capfilt: error:")]
        assert len(lines) == 1 and "\n" not in lines[0].strip(), err
        assert all(part in lines[0] for part in case.says.split(" … ")), lines[0]
        assert str(url_list) in lines[0] or case.name == "extra-column-named-like-output"
        assert not (out / "downloads").exists() and not (out / "manifest.json").exists()  # no work
    else:
        assert status == 0, err
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["complete"] and manifest["input_rows"] == 0 and manifest["shards"] == []
        assert manifest["duplicate_urls"] == 0


# --- extra columns through retry-failed ---------------------------------------------------------------


@pytest.mark.slow
def test_retry_failed_keeps_the_extra_columns_of_the_rows_it_retries(tmp_path, web, tiny_models):
    from pipeline.job.retry import retry_failed
    from pipeline.output.job_output import JobOutput

    site, _ = web
    body = jpeg_bytes(render_scene(450)[0])
    site.add("/rows/retry-good.jpg", Route(body=body))
    site.add("/rows/retry-flaky.jpg", Route(status=503))
    good, flaky = site.url("/rows/retry-good.jpg"), site.url("/rows/retry-flaky.jpg")
    table = {
        "url": [good, flaky, good],
        "caption": ["good", "flaky", "good again"],
        "source": ["a", "b", None],
    }
    pq.write_table(pa.table(table), tmp_path / "urls.parquet")  # make_spec's URL list
    spec = make_spec(
        tmp_path,
        [],
        tiny_models,
        input={"extra_columns": ["source"]},
        filter={"threshold": 0.0, "dedup": {"exact": False}},  # one picture thrice: every row kept
        output={"keep_downloads": True},
    )
    first = run_job(spec, log=lambda _: None)
    assert first.manifest["counts"][Fate.DOWNLOAD_FAILED] == 1 and first.manifest["duplicate_urls"] == 1

    site.add("/rows/retry-flaky.jpg", Route(body=body))  # back
    retried = retry_failed(JobOutput.open(first.layout.root), log=lambda _: None)
    records = sorted(read_records(first.layout), key=lambda r: r["key"])
    assert [(r["web_caption"], r["source"]) for r in records] == [
        ("good", "a"),
        ("flaky", "b"),  # the retried row's, not lost in the retry job
        ("good again", None),
    ]
    assert all(r["status"] == Fate.KEPT for r in records)
    tars = [str(p) for p in first.layout.shards.glob("*.tar")]
    sources = {
        s["__key__"]: json.loads(s["json"])["source"] for s in wds.WebDataset(tars, shardshuffle=False)
    }
    assert sources == {r["key"]: r["source"] or "" for r in records}  # the JSON's strings are never null
    assert pq.read_schema(first.layout.shard_parquet("00000")).names == [*SHARD_SCHEMA.names, "source"]
    assert retried.manifest["duplicate_urls"] == 1
