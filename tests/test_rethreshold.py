"""`capfilt rethreshold`: the output at another threshold from the stored scores, through the job's own
shard writer, with no model; every row still accounted for."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.cli import main
from pipeline.curate.decide import candidates
from pipeline.job.rethreshold import rethreshold
from pipeline.job.retry import retry_failed
from pipeline.job.runner import run_job
from pipeline.output.job_output import JobOutput, OutputError
from pipeline.spec.config import KeepSpec, typed_spec
from pipeline.spec.fates import Fate
from pipeline.spec.layout import OutputLayout
from tests.conftest import make_spec, read_records, tar_keys


def test_the_jobs_own_threshold_reproduces_its_shards_byte_for_byte(curated_job, tmp_path):
    source = curated_job.layout
    assert main(["rethreshold", str(source.root), "--threshold", "0.5", "--out", str(tmp_path / "same")]) == 0
    new = OutputLayout(tmp_path / "same")
    names = sorted(p.name for p in source.shards.glob("*.tar")) + [p.name for p in source.shard_parquets()]
    assert len(names) == 10
    for name in names:
        assert (new.shards / name).read_bytes() == (source.shards / name).read_bytes(), name
    manifest = json.loads(new.manifest.read_text())
    assert manifest["counts"] == curated_job.manifest["counts"] and manifest["complete"]
    assert manifest["duplicate_urls"] == curated_job.manifest["duplicate_urls"] == 0
    assert manifest["rethresholded_from"] == {
        "path": str(source.root.resolve()),
        "threshold": 0.5,
        "keep": {"rule": "threshold", "k": 1, "by": "itm"},
        "dedup": {"exact": True, "near_threshold": None},
    }
    for raw in source.downloads.iterdir():  # hard links: no space spent, and OUT's later changes stay OUT's
        assert os.path.samefile(raw, new.downloads / raw.name), raw.name


@pytest.mark.slow
def test_higher_thresholds_keep_fewer_and_account_for_every_row(curated_job, tmp_path):
    original = read_records(curated_job.layout)
    kept_counts = []
    for t in (0.5, 0.9, 0.98, 0.99, 1.0):
        manifest = rethreshold(JobOutput.open(curated_job.layout.root), t, tmp_path / f"t{t}")
        layout = OutputLayout(tmp_path / f"t{t}")
        records = read_records(layout)
        assert sorted(r["key"] for r in records) == sorted(r["key"] for r in original)
        assert sum(manifest["counts"].values()) == manifest["input_rows"] == len(original)
        assert manifest["counts"] == {f.value: sum(r["status"] == f for r in records) for f in Fate}
        for old, new in zip(
            sorted(original, key=lambda r: r["key"]), sorted(records, key=lambda r: r["key"]), strict=True
        ):
            if old["status"] not in (Fate.KEPT, Fate.FILTERED):
                assert new == old  # failure fates do not depend on the threshold
                continue
            found = candidates(
                new["web_caption"], new["web_caption_itm"], new["synthetic_captions"], new["synthetic_itm"]
            )
            assert new["status"] == ("kept" if any(c.itm >= t for c in found) else "filtered")
            assert all(c["itm"] >= t for c in new["kept_captions"])
        assert tar_keys(layout) == Counter(r["key"] for r in records if r["status"] == "kept")
        kept_counts.append(manifest["counts"]["kept"])
    assert kept_counts == sorted(kept_counts, reverse=True)
    assert kept_counts[0] > kept_counts[-2] > kept_counts[-1] == 0


def test_top_k_by_itc_keeps_the_best_itc_caption_that_passes_itm(curated_job, tmp_path):
    """BLIP-2's "sample many, keep the best", from the stored scores: the same rows kept as the job (a
    row keeps a caption iff one passes), each with the single passing caption of highest ITC."""
    out = tmp_path / "top1"
    args = ["rethreshold", str(curated_job.layout.root), "--keep", "top_k", "--k", "1", "--by", "itc"]
    assert main([*args, "--out", str(out)]) == 0
    original = {r["key"]: r for r in read_records(curated_job.layout)}
    records = {r["key"]: r for r in read_records(OutputLayout(out))}
    assert {k: r["status"] for k, r in records.items()} == {k: r["status"] for k, r in original.items()}
    several = 0
    for key, r in records.items():
        if r["status"] != Fate.KEPT:
            continue
        passing = [c for c in original[key]["kept_captions"]]
        several += len(passing) > 1
        best = max(passing, key=lambda c: c["itc"])
        assert r["kept_captions"] == [best] and r["caption"] == best["text"]
    assert several >= 5  # the rule had a choice to make
    changed = sum(records[k]["caption"] != original[k]["caption"] for k in records)
    assert changed > 0  # ITC and ITM disagree somewhere: --by is not a no-op
    spec = JobOutput.open(out).spec.filter.keep
    assert (spec.rule, spec.k, spec.by) == ("top_k", 1, "itc")
    texts = {
        s["__key__"]: s["txt"].decode()
        for s in wds.WebDataset(sorted(map(str, OutputLayout(out).shards.glob("*.tar"))), shardshuffle=False)
    }
    assert texts == {k: r["caption"] for k, r in records.items() if r["status"] == Fate.KEPT}


def test_a_lower_threshold_keeps_images_the_job_filtered_with_their_pictures(curated_job, tmp_path):
    filtered = {r["key"] for r in read_records(curated_job.layout) if r["status"] == "filtered"}
    assert filtered
    rethreshold(JobOutput.open(curated_job.layout.root), 0.0, tmp_path / "all")
    layout = OutputLayout(tmp_path / "all")
    now = {r["key"]: r for r in read_records(layout)}
    assert all(now[k]["status"] == "kept" for k in filtered)
    images = {
        s["__key__"]: s["jpg"]
        for s in wds.WebDataset([str(p) for p in layout.shards.glob("*.tar")], shardshuffle=False)
    }
    assert filtered <= set(images) and all(images[k][:2] == b"\xff\xd8" for k in filtered)
    # a rethreshold of a rethreshold finds the raw shards through the link
    rethreshold(JobOutput.open(layout.root), 0.5, tmp_path / "back")
    for name in sorted(p.name for p in curated_job.layout.shards.glob("*.tar")):
        assert (tmp_path / "back" / "shards" / name).read_bytes() == (
            curated_job.layout.shards / name
        ).read_bytes()


def test_a_rethresholded_output_is_a_complete_job_output_for_its_spec(curated_job, tmp_path, ray_local):
    manifest = rethreshold(JobOutput.open(curated_job.layout.root), 0.9, tmp_path / "strict")
    logs = []
    result = run_job(typed_spec(manifest["spec"]), log=logs.append)
    assert result.complete and result.manifest["counts"] == manifest["counts"]
    assert any("5 already done, 0 to caption and filter" in line for line in logs), logs


def test_an_interrupted_rethreshold_leaves_no_new_output_and_runs_again(curated_job, tmp_path, monkeypatch):
    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(
        "pipeline.job.rethreshold.check_accounting", interrupted
    )  # after every shard is written
    with pytest.raises(KeyboardInterrupt):
        rethreshold(JobOutput.open(curated_job.layout.root), 0.9, tmp_path / "new")
    assert not (tmp_path / "new").exists() and (tmp_path / ".new.partial").is_dir()
    monkeypatch.undo()
    manifest = rethreshold(JobOutput.open(curated_job.layout.root), 0.9, tmp_path / "new")
    assert manifest["complete"] and not (tmp_path / ".new.partial").exists()
    assert [s.status for s in JobOutput.open(tmp_path / "new").shards()] == ["done"] * 5


def test_an_empty_job_rethresholds_to_an_empty_output(tmp_path, tiny_models, ray_local):
    result = run_job(make_spec(tmp_path, [], tiny_models), log=lambda _: None)
    manifest = rethreshold(JobOutput.open(result.layout.root), 0.7, tmp_path / "new")
    assert manifest["complete"] and manifest["input_rows"] == 0 and manifest["shards"] == []


def test_refusals_name_what_is_wrong(curated_job, tmp_path, capsys):
    source = str(curated_job.layout.root)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    cases = [
        (["--threshold", "1.5", "--out", str(tmp_path / "a")], "--threshold: 1.5 is not an ITM probability"),
        (["--threshold", "0.6", "--out", source], "must be a new directory"),
        (
            ["--threshold", "0.7", "--out", f"{source}/t07"],
            f"inside the job's output {source}; write it beside",
        ),
        (
            ["--near-threshold", "0", "--out", str(tmp_path / "a")],
            "--near-threshold: 0.0 is not a cosine in (0, 1]",
        ),
        (["--threshold", "0.6", "--out", str(tmp_path / "full")], "not empty"),
        (["--out", str(tmp_path / "a")], "name what changes"),
        (["--keep", "top_k", "--k", "0", "--out", str(tmp_path / "a")], "--k: 0"),
    ]
    for args, message in cases:
        assert main(["rethreshold", source, *args]) == 2
        assert message in capsys.readouterr().err

    half = tmp_path / "half"
    shutil.copytree(curated_job.layout.root, half, symlinks=True)
    OutputLayout(half).shard_report("00001").unlink()
    with pytest.raises(OutputError, match=r"not complete \(1 of 5 shards not written, first 00001\)"):
        rethreshold(JobOutput.open(half), 0.6, tmp_path / "b")
    shutil.rmtree(OutputLayout(half).downloads)
    OutputLayout(half).shard_report("00001").write_text(
        (curated_job.layout.shards / "00001.done.json").read_text()
    )
    with pytest.raises(OutputError, match=r"raw downloads of 5 of 5 shards are gone .* rethreshold"):
        rethreshold(JobOutput.open(half), 0.6, tmp_path / "c")


def test_an_output_of_shard_schema_1_reads_under_the_new_names(curated_job, tmp_path):
    """An output as capfilt wrote it before schema 2 (web text in `caption`, training text in
    `selected_caption`, no ITC): inspect and rethreshold read it under the new names, rethreshold
    writes it anew in schema 2, and what would mix the two schemas is refused."""
    old = tmp_path / "v1"
    shutil.copytree(curated_job.layout.root, old, symlinks=True)
    layout = OutputLayout(old)
    v1 = {"caption": "selected_caption", "web_caption": "caption", "web_caption_itm": "caption_itm"}
    for path in layout.shard_parquets():
        table = pq.read_table(path.path).drop_columns(["web_caption_itc", "synthetic_itc", "image_embedding"])
        pq.write_table(table.rename_columns([v1.get(n, n) for n in table.column_names]), path.path)
    manifest = json.loads(layout.manifest.read_text())
    del manifest["shard_schema"]
    layout.manifest.write_text(json.dumps(manifest))
    output = JobOutput.open(old)
    assert output.shard_schema == 1
    names = output.read_shard("00000").column_names
    assert {"caption", "web_caption", "web_caption_itm"} <= set(names) and "selected_caption" not in names
    assert main(["inspect", str(old)]) == 0
    with pytest.raises(OutputError, match="shard schema 1, this capfilt writes schema 2"):
        retry_failed(output, log=lambda _: None)
    with pytest.raises(OutputError, match=r"--by itc: .* before capfilt stored ITC scores"):
        rethreshold(output, None, tmp_path / "by-itc", KeepSpec(by="itc"))
    rethreshold(output, 0.5, tmp_path / "v2")
    now = {r["key"]: r for r in read_records(OutputLayout(tmp_path / "v2"))}
    before = {r["key"]: r for r in read_records(curated_job.layout)}
    assert {k: (r["caption"], r["web_caption"]) for k, r in now.items()} == {
        k: (r["caption"], r["web_caption"]) for k, r in before.items()
    }
    assert all(r["synthetic_itc"] is None for r in now.values())  # the scores it never had
    assert JobOutput.open(tmp_path / "v2").shard_schema == 2
