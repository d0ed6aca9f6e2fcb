"""The whole job on a real local Ray: img2dataset over HTTP on 127.0.0.1, tiny BLIP models, and
outputs read back with the consumers' libraries (pyarrow, webdataset)."""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from PIL import Image
from transformers import BlipConfig

from pipeline.cli import main
from pipeline.job.runner import JobResult, run_job
from pipeline.output.shard_writer import sample_record
from pipeline.spec.config import SpecError
from pipeline.spec.fates import Fate
from pipeline.spec.layout import OutputLayout
from pipeline.synthetic.sample_web import Route, jpeg_bytes, render_scene
from tests.conftest import make_spec, read_records

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, web, tiny_models):
    site, pairs = web
    rows = [(site.url(p.path), p.caption) for p in pairs]
    expected = {site.url(p.path): p.expected for p in pairs}
    site.add("/e2e/blank-caption.jpg", Route(body=jpeg_bytes(render_scene(99)[0])))
    extra = {
        site.url("/e2e/blank-caption.jpg"): ("", "ok"),
        "ftp://127.0.0.1/image.jpg": ("an ftp image", Fate.BLOCKED),
        "file:///etc/passwd": ("a local file", Fate.BLOCKED),
        "not a url": ("no url at all", Fate.INVALID_INPUT),
        None: ("a row without a url", Fate.INVALID_INPUT),
    }
    rows += [(url, caption) for url, (caption, _) in extra.items()]
    expected.update({url: fate for url, (_, fate) in extra.items()})
    tmp = tmp_path_factory.mktemp("e2e")
    spec = make_spec(tmp, rows, tiny_models)
    job = tmp / "job.yaml"
    job.write_text(yaml.safe_dump(spec.to_dict()))
    assert main(["run", str(job), "--set", "captioner.num_captions=2"]) == 0  # the command users type
    return JobResult(json.loads(OutputLayout(Path(spec.output.path)).manifest.read_text()),
                     OutputLayout(Path(spec.output.path))), rows, expected  # fmt: skip


def test_every_input_row_appears_exactly_once_with_its_fate(finished_job):
    result, rows, expected = finished_job
    records = read_records(result.layout)
    assert len(records) == len(rows) > 50
    assert Counter(r["url"] for r in records) == Counter(url for url, _ in rows)
    assert len({r["key"] for r in records}) == len(records)
    for r in records:
        want = expected[r["url"]]
        if want == "ok":
            assert r["status"] in (Fate.KEPT, Fate.FILTERED), r
        else:
            assert r["status"] == want, r
            assert r["error"], r


def test_manifest_counts_add_up_to_the_input(finished_job):
    result, rows, _ = finished_job
    manifest = json.loads(result.layout.manifest.read_text())
    records = read_records(result.layout)
    assert manifest["complete"] is True
    assert manifest["input_rows"] == len(rows)
    assert sum(manifest["counts"].values()) == len(rows)
    assert manifest["counts"] == {f.value: sum(r["status"] == f for r in records) for f in Fate}
    assert all(s["status"] == "done" for s in manifest["shards"])
    assert manifest["models"]["captioner"] == manifest["spec"]["captioner"]["model"]
    assert manifest["versions"]["transformers"]


def test_the_manifest_says_where_the_time_went(finished_job):
    result, _, _ = finished_job
    timings = json.loads(result.layout.manifest.read_text())["timings"]
    scored = [r for r in read_records(result.layout) if r["status"] in (Fate.KEPT, Fate.FILTERED)]
    assert timings["images"] == len(scored)
    assert 0 < timings["startup_s"] <= timings["caption_filter_s"]
    assert timings["download_s"] > 0
    assert all(timings["busy_s"][stage] > 0 for stage in ("preprocess", "caption", "itm", "write"))
    # Busy seconds are measured inside the phase: one actor cannot be busier than the phase is long.
    assert timings["busy_s"]["caption"] + timings["busy_s"]["itm"] < timings["caption_filter_s"]


def test_downloaded_rows_carry_captions_and_scores(finished_job, tiny_models):
    result, _, _ = finished_job
    size = BlipConfig.from_pretrained(tiny_models.itm).image_text_hidden_size
    scored = [r for r in read_records(result.layout) if r["status"] in (Fate.KEPT, Fate.FILTERED)]
    assert len(scored) >= 40
    for r in scored:
        assert len(r["synthetic_captions"]) == len(r["synthetic_itm"]) == 2
        assert all(0 <= s <= 1 for s in r["synthetic_itm"])
        assert r["width"] and r["height"] and len(r["sha256"]) == 64
        if r["web_caption"] and r["web_caption"].strip():
            assert 0 <= r["web_caption_itm"] <= 1
        else:
            assert r["web_caption_itm"] is None
        kept_texts = {c["text"] for c in r["kept_captions"]}
        assert (r["status"] == Fate.KEPT) == bool(kept_texts)
        assert r["caption"] is None or r["caption"] in kept_texts
        assert len(r["synthetic_itc"]) == 2 and all(-1 <= s <= 1 for s in r["synthetic_itc"])
        assert (r["web_caption_itc"] is None) == (r["web_caption_itm"] is None)
        assert len(r["image_embedding"]) == size and abs(np.linalg.norm(r["image_embedding"]) - 1) < 1e-2


def test_every_scored_image_has_its_embedding_in_a_fixed_size_column(finished_job, tiny_models):
    """One Arrow type in every shard (a fixed-size float16 list of the checkpoint's size), so the shards
    read as one table; null where nothing was scored."""
    result, _, _ = finished_job
    size = BlipConfig.from_pretrained(tiny_models.itm).image_text_hidden_size
    table = pa.concat_tables([pq.read_table(p) for p in result.layout.shard_parquets()])
    assert table.schema.field("image_embedding").type == pa.list_(pa.float16(), size)
    embeddings = table.column("image_embedding").to_pylist()
    scored = [s in (Fate.KEPT, Fate.FILTERED) for s in table.column("status").to_pylist()]
    assert [e is not None for e in embeddings] == scored
    vectors = np.array([e for e in embeddings if e is not None], dtype=np.float32)
    assert len(np.unique(vectors.round(2), axis=0)) == len(vectors)  # one per image, not one for all


def test_the_tar_holds_exactly_the_kept_rows_and_webdataset_reads_it(finished_job):
    result, _, _ = finished_job
    records = {r["key"]: r for r in read_records(result.layout)}
    kept = {k for k, r in records.items() if r["status"] == Fate.KEPT}
    tars = sorted(str(p) for p in result.layout.shards.glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode())
    assert {s["__key__"] for s in samples} == kept
    for s in samples:
        record = records[s["__key__"]]
        assert s["txt"] == record["caption"]
        assert s["json"] == json.loads(json.dumps(sample_record(record)))
        image = Image.open(io.BytesIO(s["jpg"])) if isinstance(s["jpg"], bytes) else s["jpg"]
        assert image.size == (record["width"], record["height"])


def test_private_addresses_are_blocked_before_any_request(tmp_path, web, tiny_models):
    site, _ = web
    paths = [f"/policy/{i}.jpg" for i in range(3)]
    for i, path in enumerate(paths):
        site.add(path, Route(body=jpeg_bytes(render_scene(i)[0])))
    rows = [(site.url(p), "a picture") for p in paths]
    spec = make_spec(tmp_path, rows, tiny_models, download={"allow_private_networks": False})
    result = run_job(spec, log=lambda _: None)
    assert result.manifest["counts"][Fate.BLOCKED] == 3
    assert all("127.0.0.1" in r["error"] for r in read_records(result.layout))
    assert [site.hits(p) for p in paths] == [0, 0, 0]


@pytest.mark.slow
def test_resume_redoes_only_the_missing_shard_and_equals_a_clean_run(tmp_path, web, tiny_models):
    site, pairs = web
    rows = [(site.url(p.path), p.caption) for p in pairs if p.expected == "ok"][:40]
    spec = make_spec(tmp_path, rows, tiny_models)
    first = run_job(spec, log=lambda _: None)
    layout = first.layout
    shards = sorted(p.stem for p in layout.shards.glob("*.parquet"))
    assert len(shards) == 3
    before = {p.name: os.stat(p).st_mtime_ns for p in layout.shards.iterdir()}
    layout.shard_parquet(shards[1]).unlink()

    second = run_job(spec, log=lambda _: None)
    after = {p.name: os.stat(p).st_mtime_ns for p in layout.shards.iterdir()}
    rewritten = {name for name in after if before.get(name) != after[name]}
    shard = shards[1]  # its files, and sizes.json, written with the manifest
    assert rewritten == {f"{shard}{end}" for end in (".parquet", ".tar", ".done.json", "_stats.json")} | {
        "sizes.json"
    }
    assert second.manifest["counts"] == first.manifest["counts"]

    clean = run_job(make_spec(tmp_path, rows, tiny_models, out="clean"), log=lambda _: None)
    for name in shards:
        resumed_table = pq.read_table(layout.shard_parquet(name))
        clean_table = pq.read_table(clean.layout.shard_parquet(name))
        assert resumed_table.equals(clean_table), name


def test_an_empty_url_list_is_a_complete_job_with_no_rows(tmp_path, tiny_models):
    result = run_job(make_spec(tmp_path, [], tiny_models), log=lambda _: None)
    assert result.complete and result.manifest["input_rows"] == 0 and result.manifest["shards"] == []


@pytest.mark.slow
def test_a_list_in_parts_is_one_job_in_the_parts_name_order(tmp_path, web, tiny_models):
    site, pairs = web
    rows = [(site.url(p.path), p.caption) for p in pairs if p.expected == "ok"][:10]
    parts = tmp_path / "list"
    parts.mkdir()
    for name, part in (("part-1.csv", rows[6:]), ("part-0.csv", rows[:6])):  # written out of order
        text = "url,caption\n" + "".join(f"{url},{caption.replace(',', ' ')}\n" for url, caption in part)
        (parts / name).write_text(text)
    spec = make_spec(tmp_path, [], tiny_models, input={"url_list": str(parts), "input_format": None})
    result = run_job(spec, log=lambda _: None)
    assert result.complete and result.manifest["input_rows"] == 10
    assert result.manifest["spec"]["input"]["input_format"] == "csv"
    records = sorted(read_records(result.layout), key=lambda r: r["key"])
    assert [r["url"] for r in records] == [url for url, _ in rows]


@pytest.mark.slow
def test_a_changed_threshold_makes_old_shards_stale(tmp_path, web, tiny_models):
    site, pairs = web
    rows = [(site.url(p.path), p.caption) for p in pairs if p.expected == "ok"][:8]
    first = run_job(make_spec(tmp_path, rows, tiny_models), log=lambda _: None)
    assert first.manifest["counts"][Fate.KEPT] == 8  # random tiny models score everything near 0.56
    strict = run_job(make_spec(tmp_path, rows, tiny_models, filter={"threshold": 0.99}), log=lambda _: None)
    assert strict.manifest["counts"][Fate.FILTERED] == 8
    # nothing kept: the first run's tar is gone, not left beside the new Parquet, and sizes.json is empty
    assert list(strict.layout.shards.glob("*.tar")) == []
    assert (strict.layout.shards / "sizes.json").read_json() == {}


@pytest.mark.slow
def test_new_download_settings_into_old_downloads_are_refused(tmp_path, web, tiny_models):
    site, pairs = web
    rows = [(site.url(p.path), p.caption) for p in pairs if p.expected == "ok"][:4]
    run_job(make_spec(tmp_path, rows, tiny_models), log=lambda _: None)
    # Each refusal names the setting that changed, with both values.
    changed = [
        ({"download": {"image_size": 32}}, "download.image_size was 64, is 32 now"),
        ({"output": {"shard_size": 8}}, "output.shard_size was 16, is 8 now"),
    ]
    for sections, named in changed:
        with pytest.raises(
            SpecError, match=rf"output\.path: .* holds downloads made with other settings: {named};"
        ):
            run_job(make_spec(tmp_path, rows, tiny_models, **sections), log=lambda _: None)
