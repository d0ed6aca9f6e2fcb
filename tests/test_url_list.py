"""Reading and preparing URL lists without Ray: odd values become strings, files are streamed, repeats
are counted, and a million rows are prepared in flat memory."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.storage import Location
from pipeline.ingest import list_readers, url_list
from pipeline.ingest.duplicates import DuplicateCounter
from pipeline.ingest.prepared_list import PreparedList, PrepareFailed
from pipeline.ingest.url_list import EXTRA_PREFIX, ListPreparation, check_columns, read_batches
from pipeline.ingest.urlpolicy import NetworkPolicy
from pipeline.perf.stream_bench import prepare_timeline
from pipeline.spec.config import InputSpec, SpecError

OPEN = NetworkPolicy(allow_private_networks=True)


def _prepare(spec: InputSpec, out: Path, downloaded: bool = False, shard_size: int = 4) -> int:
    """The whole list prepared into `out`, unstreamed; its rows."""
    preparation = ListPreparation(spec, OPEN, PreparedList(Location.of(out)), shard_size, "fp", downloaded)
    preparation.write()
    return preparation.rows


def _prepared(out: Path, columns: list[str] | None = None) -> pa.Table:
    """The prepared shards, read back with pyarrow in shard order."""
    return pa.concat_tables(pq.read_table(p, columns=columns) for p in sorted(out.glob("*.parquet")))


def _rows(spec: InputSpec) -> list[dict]:
    return [row for batch in read_batches(spec) for row in batch.to_pylist()]


def test_a_csv_with_bytes_that_are_not_utf8_is_read_with_replacement_characters(tmp_path):
    path = tmp_path / "urls.csv"
    path.write_bytes(
        b'url,caption\nhttp://127.0.0.1/a/\xff.jpg,"caf\xe9 \x00 \x1b[0m\r\nnext line"\nhttp://127.0.0.1/b/x.jpg,\n'
    )
    assert _rows(InputSpec(str(path), "csv")) == [
        {"url": "http://127.0.0.1/a/\ufffd.jpg", "caption": "caf\ufffd \x00 \x1b[0m\r\nnext line"},
        {"url": "http://127.0.0.1/b/x.jpg", "caption": ""},  # CSV has no null: an empty field is ""
    ]


def test_parquet_columns_of_any_type_become_strings(tmp_path):
    path = tmp_path / "urls.parquet"
    table = pa.table({
        "url": pa.array([7, None], pa.int64()),
        "caption": pa.array([b"ok", b"\xffbad"], pa.binary()),
        "tags": pa.array([["a", "b"], None]),
        "score": pa.array([0.5, 2.0]),
    })  # fmt: skip
    pq.write_table(table, path)
    spec = InputSpec(str(path), extra_columns=("tags", "score"))
    assert _rows(spec) == [
        {"url": "7", "caption": "ok", f"{EXTRA_PREFIX}tags": '["a", "b"]', f"{EXTRA_PREFIX}score": "0.5"},
        {"url": None, "caption": "\ufffdbad", f"{EXTRA_PREFIX}tags": None, f"{EXTRA_PREFIX}score": "2"},
    ]


def test_json_lines_with_odd_values_are_read_row_by_row_in_the_block_that_has_them(tmp_path):
    path = tmp_path / "urls.jsonl"
    path.write_bytes(
        b'{"url": "http://127.0.0.1/a/1.jpg", "caption": "caf\xe9", "id": 1}\n\n'
        b'{"url": 5, "caption": null, "id": {"nested": true}}\n'
        b'{"url": "http://127.0.0.1/a/3.jpg", "caption": "raw \x1b control", "other": 1}\n'
        b'{"url": "http://127.0.0.1/a/4.jpg", "caption": "\\ud800 lone surrogate", "id": "x"}\n'
    )
    assert _rows(InputSpec(str(path), "jsonl", extra_columns=("id",))) == [
        {"url": "http://127.0.0.1/a/1.jpg", "caption": "caf\ufffd", f"{EXTRA_PREFIX}id": "1"},
        {"url": "5", "caption": None, f"{EXTRA_PREFIX}id": '{"nested": true}'},
        {"url": "http://127.0.0.1/a/3.jpg", "caption": "raw \x1b control", f"{EXTRA_PREFIX}id": None},
        {
            "url": "http://127.0.0.1/a/4.jpg",
            "caption": "\ufffd\ufffd\ufffd lone surrogate",
            f"{EXTRA_PREFIX}id": "x",
        },
    ]


@pytest.mark.parametrize("block_bytes", [16, 256])  # lines longer than a block; blocks of a few lines
def test_json_lines_are_streamed_in_blocks_and_a_malformed_line_is_named(tmp_path, monkeypatch, block_bytes):
    monkeypatch.setattr(list_readers, "BLOCK_BYTES", block_bytes)  # many blocks, each parsed on its own
    lines = [json.dumps({"url": f"http://127.0.0.1/a/{i}.jpg", "caption": f"c{i}"}) for i in range(200)]
    lines[150] = '{"url": 150, "caption": "a number in a block of strings"}'
    path = tmp_path / "urls.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows = _rows(InputSpec(str(path), "jsonl"))
    assert [r["url"] for r in rows] == [
        f"http://127.0.0.1/a/{i}.jpg" if i != 150 else "150" for i in range(200)
    ]

    lines[180] = '{"url": "http://127.0.0.1/a/180.jpg", "caption": '
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SpecError, match=r"as jsonl: line 181: not JSON: Expecting value \(column 50\)$"):
        _rows(InputSpec(str(path), "jsonl"))


def test_a_json_line_too_long_to_be_a_row_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(list_readers, "MAX_LINE_BYTES", 1 << 20)
    path = tmp_path / "urls.jsonl"
    path.write_text('{"url": "http://127.0.0.1/a/1.jpg"}\n[' + '"x", ' * 400_000 + '"x"]\n')
    with pytest.raises(SpecError, match=r"as jsonl: line 2 is longer than 1 MiB$"):
        _rows(InputSpec(str(path), "jsonl", caption_col=None))


def test_the_columns_of_json_lines_come_from_the_first_block(tmp_path):
    path = tmp_path / "urls.jsonl"
    path.write_text(
        '{"url": "http://127.0.0.1/a/1.jpg"}\n{"url": "http://127.0.0.1/a/2.jpg", "caption": "x", "id": 3}\n'
    )
    check_columns(InputSpec(str(path), "jsonl", extra_columns=("id",)))
    with pytest.raises(
        SpecError, match=r"column 'link' not found in .*urls.jsonl \(columns: url, caption, id\)"
    ):
        check_columns(InputSpec(str(path), "jsonl", url_col="link"))


@pytest.mark.parametrize(
    ("bad_row", "says"),
    [
        ("http://127.0.0.1/a/bad.jpg,two,more", "CSV parse error: Expected 2 columns, got 3: http://127.0.0.1/a/bad.jpg,two,more (after data row"),
        ("http://127.0.0.1/a/bad.jpg," + "x" * 600_000, "CSV parse error: a row after data row 39999 is longer than 256 KiB"),
    ],
)  # fmt: skip
def test_a_malformed_csv_row_deep_in_the_file_is_refused_with_its_text_and_nothing_is_left(
    tmp_path, bad_row, says
):
    lines = ["url,caption"] + [f"http://127.0.0.1/a/{i:05d}.jpg,picture {i:05d}" for i in range(50_000)]
    lines[40_000] = bad_row
    path = tmp_path / "urls.csv"
    path.write_text("\n".join(lines) + "\n")
    spec = InputSpec(str(path), "csv")
    check_columns(spec)  # the header and first block are fine
    out = tmp_path / "_input"
    with pytest.raises(SpecError) as raised:  # when the rows are counted, before anything is written
        _prepare(spec, out)
    message = str(raised.value)
    assert message.startswith(f"input.url_list: cannot read {path} as csv: ") and says in message, message
    assert "\n" not in message
    assert not out.exists()


def test_a_control_character_in_a_message_is_escaped(tmp_path):
    path = tmp_path / "urls.csv"
    path.write_bytes(b"link\x1b[2J,caption\nhttp://127.0.0.1/a/1.jpg,x\n")
    with pytest.raises(SpecError) as raised:
        check_columns(InputSpec(str(path), "csv"))
    assert "columns: link\\x1b[2J, caption" in str(raised.value) and "\x1b" not in str(raised.value)


def test_repeated_urls_are_counted_as_a_set_would_count_them():
    rng = random.Random(0)
    urls = [
        rng.choice([f"http://127.0.0.1/a/{rng.randrange(3000)}.jpg", None, "", "  "]) for _ in range(20_000)
    ]
    urls += [
        " http://127.0.0.1/a/1.jpg ",
        "http://127.0.0.1/a/1.jpg",
    ]  # compared stripped, as they are fetched
    counter = DuplicateCounter()
    for start in range(0, len(urls), 999):
        counter.add(urls[start : start + 999])
    given = [u.strip() for u in urls if u and u.strip()]
    assert counter.count() == len(given) - len(set(given)) > 0


def test_prepare_keeps_every_row_counts_repeats_and_the_count_survives_a_resume(tmp_path):
    path = tmp_path / "urls.csv"
    path.write_text(
        "url,caption\nhttp://127.0.0.1/a/1.jpg,one\n http://127.0.0.1/a/1.jpg ,two\nnot a url,x\nnot a url,y\n,z\n,w\n"
    )
    spec = InputSpec(str(path), "csv")
    out = tmp_path / "_input"
    prepared = PreparedList(Location.of(out))
    assert _prepare(spec, out) == 6
    # the second http://127.0.0.1/a/1.jpg and the second "not a url"; "" is no URL
    assert prepared.duplicate_urls() == 2
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "00001.parquet", "_prepared.json"]
    written = _prepared(out).to_pylist()
    assert [r["capfilt_caption"] for r in written] == ["one", "two", "x", "y", "z", "w"]
    assert [r["url"] for r in written] == [
        "http://127.0.0.1/a/1.jpg",
        "http://127.0.0.1/a/1.jpg",
        "",
        "",
        "",
        "",
    ]
    before = [p.stat().st_mtime_ns for p in sorted(out.iterdir())]
    assert _prepare(spec, out, downloaded=True) == 6  # reused, not written again
    assert [p.stat().st_mtime_ns for p in sorted(out.iterdir())] == before and prepared.duplicate_urls() == 2


@pytest.mark.parametrize("shard_size", [1, 7, 16, 50, 64])
def test_the_prepared_shards_are_the_lists_rows_in_order_whatever_the_batches(tmp_path, shard_size):
    urls = [f"http://127.0.0.1:9/{i}.jpg" for i in range(50)]
    table = pa.table({"url": urls, "caption": [f"caption {i}" for i in range(50)]})
    pq.write_table(table, tmp_path / "urls.parquet", row_group_size=16)
    out = tmp_path / "_input"
    assert _prepare(InputSpec(str(tmp_path / "urls.parquet"), "parquet"), out, shard_size=shard_size) == 50
    shards = sorted(out.glob("*.parquet"))
    assert len(shards) == -(-50 // shard_size)
    assert [pq.read_metadata(p).num_rows for p in shards[:-1]] == [shard_size] * (len(shards) - 1)
    assert _prepared(out, ["url"])["url"].to_pylist() == table["url"].to_pylist()


def test_the_first_shard_is_written_while_the_rest_of_the_list_is_still_being_prepared(tmp_path, monkeypatch):
    """Streaming: the download of shard 00000 can start before the list is wholly prepared."""
    path = tmp_path / "urls.csv"
    path.write_text("url\n" + "".join(f"http://127.0.0.1:9/{i}.jpg\n" for i in range(40)))
    monkeypatch.setattr(list_readers, "CSV_BLOCK_BYTES", 64)  # batches of two or three rows
    checked = url_list.check_urls
    out = tmp_path / "_input"
    preparation = ListPreparation(
        InputSpec(str(path), "csv", caption_col=None), OPEN, PreparedList(Location.of(out)), 4, "fp", False
    )
    assert preparation.rows == 40 and not out.exists()
    gate = threading.Event()

    def held(urls, policy):  # once shard 00000 is written, the later batches wait for the test
        if (out / "00000.parquet").exists():
            assert gate.wait(60), "shard 00000 was never taken"
        return checked(urls, policy)

    monkeypatch.setattr(url_list, "check_urls", held)
    writer = threading.Thread(target=preparation.write)
    writer.start()
    PreparedList(Location.of(out)).wait_for("00000")
    assert not (out / "_prepared.json").exists()  # the rest of the list is not prepared yet
    gate.set()
    writer.join(60)
    assert preparation.done and PreparedList(Location.of(out)).rows() == 40


def test_a_list_that_changes_while_it_is_prepared_fails_the_shards_that_wait_for_it(tmp_path):
    path = tmp_path / "urls.csv"
    path.write_text("url\n" + "".join(f"http://127.0.0.1:9/{i}.jpg\n" for i in range(6)))
    out = tmp_path / "_input"
    preparation = ListPreparation(
        InputSpec(str(path), "csv", caption_col=None), OPEN, PreparedList(Location.of(out)), 4, "fp", False
    )
    with path.open("a") as f:  # counted 6 rows; 7 are there when they are read
        f.write("http://127.0.0.1:9/6.jpg\n")
    with pytest.raises(SpecError, match=r"changed while it was read: 6 rows counted, then more than 6 read"):
        preparation.write()
    with pytest.raises(PrepareFailed, match="changed while it was read"):
        PreparedList(Location.of(out)).wait_for("00001")  # never to be written: fails, not waits


MILLION = 1_000_000

# Runs in a fresh interpreter, so that pyarrow's peak and tracemalloc's see only this prepare. The
# first prepare is timed without tracing (tracemalloc slows Python down); the second is traced.
_MEASURE = """
import json, sys, time, tracemalloc
import pyarrow as pa
from pipeline.spec.config import InputSpec
from pipeline.core.storage import Location
from pipeline.ingest.prepared_list import PreparedList
from pipeline.ingest.url_list import ListPreparation
from pipeline.ingest.urlpolicy import NetworkPolicy
from pipeline.perf.stream_bench import prepare_timeline

url_list, warm, out, traced = sys.argv[1:]
policy = NetworkPolicy(allow_private_networks=True)

def prepare(path, into):
    preparation = ListPreparation(InputSpec(path, "csv"), policy, PreparedList(Location.of(into)), 10_000, "fp", False)
    preparation.write()
    return preparation.rows

prepare(warm, warm + ".prepared")  # imports, caches
arrow_before = pa.default_memory_pool().max_memory()
start = time.perf_counter()
rows = prepare(url_list, out)
seconds = time.perf_counter() - start
arrow_peak = pa.default_memory_pool().max_memory() - arrow_before
tracemalloc.start()
prepare(url_list, traced)
python_peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"rows": rows, "seconds": seconds, "arrow_peak": arrow_peak, "python_peak": python_peak}))
"""


def _million_url(i: int) -> str:
    j = i - 1 if i % 1000 == 999 else i  # every thousandth row repeats the one before it
    return f"http://127.0.0.1:9/images/2024/05/{j % 97:02d}/photo-of-the-day-{j:07d}.jpg"


@pytest.mark.slow
def test_a_million_rows_are_prepared_in_order_in_flat_memory(tmp_path, capsys):
    url_list = tmp_path / "million.csv"
    with url_list.open("w") as f:
        f.write("url,caption\n")
        for start in range(0, MILLION, 100_000):
            f.write("".join(f"{_million_url(i)},a photograph of item {i} on a wooden kitchen table\n"
                            for i in range(start, start + 100_000)))  # fmt: skip
    warm = tmp_path / "warm.csv"
    warm.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a\n")
    out = tmp_path / "_input"
    measured = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(url_list), str(warm), str(out), str(tmp_path / "traced")],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    found = json.loads(measured.stdout.strip().splitlines()[-1])
    size = url_list.stat().st_size
    held = found["arrow_peak"] + found["python_peak"]
    with capsys.disabled():
        print(f"\nprepare of {MILLION} rows ({size / 1e6:.0f} MB CSV): {found['seconds']:.1f} s; peak held: "
              f"pyarrow {found['arrow_peak'] / 1e6:.1f} MB + Python {found['python_peak'] / 1e6:.1f} MB "
              f"= {held / size:.1%} of the file")  # fmt: skip
    assert found["rows"] == MILLION
    assert held < size / 4  # the list is never held: one block and its batch
    assert found["python_peak"] < 4 * MILLION  # URL hashes spill to disk: held, they would be 8 bytes a row
    assert PreparedList(Location.of(out)).duplicate_urls() == MILLION // 1000
    index = 0
    shards = sorted(out.glob("*.parquet"))
    assert len(shards) == MILLION // 10_000
    for batch in (
        b for p in shards for b in pq.ParquetFile(p).iter_batches(65536, columns=["url", "capfilt_fate"])
    ):
        assert batch.column("url").to_pylist() == [
            _million_url(i) for i in range(index, index + batch.num_rows)
        ]
        assert batch.column("capfilt_fate").null_count == batch.num_rows
        index += batch.num_rows
    assert index == MILLION


def test_the_stream_bench_times_the_first_prepared_shard_against_the_whole_list(tmp_path):
    timeline = prepare_timeline(tmp_path / "prepare", 20_000, 1000)
    assert set(timeline) == {"csv", "parquet"}
    for figures in timeline.values():
        assert figures["rows"] == 20_000
        assert 0 <= figures["count_s"] <= figures["first_shard_s"] <= figures["whole_list_s"]
        ratio = figures["first_shard_s"] / figures["whole_list_s"]
        assert figures["first_over_whole"] == pytest.approx(ratio, abs=0.02)
    prepared = PreparedList(Location.of(tmp_path / "prepare" / "_input-csv"))
    assert prepared.rows() == 20_000 and prepared.duplicate_urls() == 0
