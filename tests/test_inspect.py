"""`capfilt inspect` on a finished, a half-finished and an empty output: its numbers against a direct
pyarrow count of the shards, and the reasons it groups failures by."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.inspect.inspection import BINS, ScoreHistogram, error_reason, inspect_output
from pipeline.job.runner import run_job
from pipeline.output.job_output import JobOutput, OutputError
from pipeline.spec.fates import Fate
from tests.conftest import make_spec


def _direct_count(parquets: list) -> dict:
    """What inspect must report, counted straight from the Parquet files with pyarrow."""
    table = pa.concat_tables([pq.read_table(p) for p in parquets])
    scored = table.filter(pc.is_in(table["status"], pa.array(["kept", "filtered"])))
    kept = pc.list_flatten(scored["kept_captions"])
    web = scored.filter(
        pc.and_(pc.is_valid(scored["web_caption_itm"]), pc.not_equal(scored["web_caption"], ""))
    )
    synthetic_itm = pc.list_flatten(scored["synthetic_itm"]).to_numpy()
    return {
        "counts": {f.value: pc.sum(pc.equal(table["status"], f.value)).as_py() or 0 for f in Fate},
        "rows": table.num_rows,
        "scored": scored.num_rows,
        "kept_web": pc.sum(pc.equal(pc.struct_field(kept, "source"), "web")).as_py() or 0,
        "kept_synthetic": pc.sum(pc.equal(pc.struct_field(kept, "source"), "synthetic")).as_py() or 0,
        "web_scores": web["web_caption_itm"].to_numpy(),
        "synthetic_scores": synthetic_itm,
    }


def test_inspect_numbers_equal_a_direct_pyarrow_count(curated_job):
    found = inspect_output(JobOutput.open(curated_job.layout.root))
    want = _direct_count(curated_job.layout.shard_parquets())
    assert found.counts == want["counts"] == curated_job.manifest["counts"]
    assert found.rows_read == want["rows"] == found.input_rows and found.rows_missing == 0
    assert found.scored_images == want["scored"]
    assert found.kept_by_source == {"web": want["kept_web"], "synthetic": want["kept_synthetic"]}
    assert 0 < want["kept_web"] < want["kept_synthetic"]
    assert found.web.n == len(want["web_scores"]) and found.synthetic.n == len(want["synthetic_scores"])
    assert found.web.mean == pytest.approx(want["web_scores"].mean())
    for t in (0.0, 0.1, 0.5, 0.9, 0.99):  # the retention curve is exact on the grid
        assert found.web.at_least(t) == (want["web_scores"] >= t).sum()
        assert found.synthetic.at_least(t) == (want["synthetic_scores"] >= t).sum()
    assert found.retention(found.threshold)["images"] == pytest.approx(
        found.counts["kept"] / found.scored_images
    )
    assert sum(n for (fate, _), n in found.errors.items()) == want["rows"] - want["scored"]
    assert found.selected_by_source.total() == found.counts["kept"] == sum(found.kept_per_image.values())


def test_inspect_command_prints_fates_captions_scores_shards_and_errors(curated_job, capsys):
    assert main(["inspect", str(curated_job.layout.root)]) == 0
    out = capsys.readouterr().out
    counts = curated_job.manifest["counts"]
    assert "(complete)" in out
    assert f"kept{counts['kept']:>24}" in out and f"download_failed{counts['download_failed']:>13}" in out
    assert f"on {counts['kept']} kept images" in out
    assert "web " in out and "synthetic " in out and ">= 0.5" in out
    assert "shards: 5 done, 0 failed, 0 pending" in out
    assert "HTTP Error 404: Not Found" in out and "IncompleteRead(N bytes read, N more expected)" in out


def test_inspect_reads_what_is_complete_of_a_half_finished_job(curated_job, tmp_path, capsys):
    out = tmp_path / "half"
    shutil.copytree(curated_job.layout.root, out, symlinks=True)
    output = JobOutput.open(out)
    output.layout.shard_report("00002").unlink()  # as if the job died while writing shard 2
    output.layout.shard_report("00003").unlink()  # and shard 3 had failed
    manifest = json.loads(output.layout.manifest.read_text())
    manifest["shards"][3] = {
        "shard": "00003",
        "status": "failed",
        "error": "caption/filter stage failed: OOM",
    }
    output.layout.manifest.write_text(json.dumps(manifest))

    found = inspect_output(JobOutput.open(out))
    complete = [output.layout.shard_parquet(n) for n in ("00000", "00001", "00004")]
    want = _direct_count(complete)
    assert found.counts == want["counts"]
    assert found.rows_missing == found.input_rows - want["rows"] == 40
    assert [s.status for s in found.shards] == ["done", "done", "pending", "failed", "done"]

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "INCOMPLETE: 3 of 5 shards written" in text
    assert f"{'(not written yet)':<18}{40:>10}" in text
    assert "00002   pending    not written yet" in text and "caption/filter stage failed: OOM" in text


def test_inspect_an_empty_job_and_a_directory_that_is_not_an_output(tmp_path, tiny_models, ray_local, capsys):
    result = run_job(make_spec(tmp_path, [], tiny_models), log=lambda _: None)
    assert main(["inspect", str(result.layout.root), "--html", str(tmp_path / "r.html")]) == 0
    out = capsys.readouterr().out
    assert f"{'input rows':<18}{0:>10}" in out and "kept captions: none" in out
    assert "No images reached the filter." in (tmp_path / "r.html").read_text()

    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such directory" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no manifest.json: not a capfilt output" in capsys.readouterr().err
    with pytest.raises(OutputError, match="not a capfilt output"):
        JobOutput.open(tmp_path)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        ("HTTP Error 404: Not Found", "HTTP Error 404: Not Found"),
        (
            "IncompleteRead(500 bytes read, 483 more expected)",
            "IncompleteRead(N bytes read, N more expected)",
        ),
        ("<urlopen error [Errno 111] Connection refused>", "<urlopen error [Errno 111] Connection refused>"),
        (
            "<urlopen error [Errno -2] Name or service not known>",
            "<urlopen error [Errno -2] Name or service not known>",
        ),
        ("private address: 10.1.2.3", "private address: N"),
        ("", "(no message)"),
        (None, "(no message)"),
    ],
)
def test_error_reasons_group_rows_by_what_went_wrong(error, reason):
    assert error_reason(error) == reason


def test_score_histogram_counts_and_quantiles():
    scores = np.array([0.0, 0.0004, 0.25, 0.5, 0.5, 0.9999, 1.0])
    hist = ScoreHistogram()
    hist.add(scores)
    assert hist.n == 7 and hist.counts.size == BINS + 1
    assert [hist.at_least(t) for t in (0.0, 0.001, 0.5, 0.501, 0.999, 1.0)] == [7, 5, 4, 2, 2, 1]
    assert hist.quantile(0.5) == pytest.approx(0.5, abs=1 / BINS)
    assert hist.mean == pytest.approx(scores.mean())
    assert np.isnan(ScoreHistogram().quantile(0.5))


def test_shares_at_the_jobs_own_threshold_are_exact_off_the_grid(curated_job, tmp_path):
    out = tmp_path / "output"
    shutil.copytree(curated_job.layout.root, out, symlinks=True)
    manifest = json.loads((out / "manifest.json").read_text())
    web = _direct_count(JobOutput.open(out).layout.shard_parquets())["web_scores"]
    threshold = float(np.sort(web)[len(web) // 2]) - 1e-5  # between grid points, next to a score
    manifest["spec"]["filter"]["threshold"] = threshold
    (out / "manifest.json").write_text(json.dumps(manifest))
    found = inspect_output(JobOutput.open(out))
    assert found.kept_at(threshold)["web"] == (web >= threshold).sum()
    assert found.web.at_least(threshold) != (web >= threshold).sum() or threshold * BINS % 1 == 0
