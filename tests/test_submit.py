"""`capfilt submit / status / logs / stop` against a real `ray start --head` through Ray's Jobs API.

The job's driver runs on the head as Ray runs any submitted job: `capfilt run job.yaml` in the
shipped working dir. Stopping it half way and submitting the same spec again must resume it to the
output an uninterrupted run writes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from tests.conftest import read_records
from tests.ray_clusters import RayHead, answering_rows, write_job

pytestmark = pytest.mark.slow  # a real `ray start --head` and the Jobs API


@pytest.fixture(scope="module")
def head() -> RayHead:
    started = RayHead(num_cpus=2)
    yield started
    started.stop()


def _submit(capsys, job: Path, *args: str) -> str:
    capsys.readouterr()
    assert main(["submit", str(job), *args]) == 0
    return capsys.readouterr().out.strip()


def _status(capsys, job_id: str, address: str) -> str:
    capsys.readouterr()
    main(["status", job_id, "--address", address])
    return capsys.readouterr().out.split(": ", 1)[1].split()[0]


@pytest.fixture(scope="module")
def job_rows(web) -> list[tuple[str, str]]:
    return answering_rows(web)


@pytest.fixture(scope="module")
def clean_submission(tmp_path_factory, head, job_rows, tiny_models):
    """The job submitted and followed to its end as a user does: (job id, exit code of `logs
    --follow`, what the two commands printed, the output layout)."""
    job, layout = write_job(tmp_path_factory.mktemp("submitted"), job_rows, tiny_models, "clean")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["submit", str(job), "--address", head.jobs_api]) == 0
        job_id = printed.getvalue().strip()
        code = main(["logs", job_id, "--follow", "--address", head.jobs_api])  # returns when it ends
    return job_id, code, printed.getvalue(), layout


def test_submit_follow_status_and_the_output_it_wrote(capsys, head, clean_submission, job_rows):
    job_id, code, log, layout = clean_submission
    assert job_id.startswith("raysubmit_")
    assert code == 0
    assert "no GPUs in the Ray cluster: CapFilt actors run on the CPU" in log  # the CPU-only cluster says so
    manifest = json.loads(layout.manifest.read_text())
    shards = len(manifest["shards"])
    assert f"shards: {shards} done, 0 failed, 0 pending" in log
    # The driver's console: its progress, not Ray's log stream (that is in the output's log file)
    assert f"capfilt: shards {shards}/{shards} committed | " in log and "streaming_executor" not in log
    assert "streaming_executor" in (layout.root / "logs" / "capfilt.log").read_text()
    assert _status(capsys, job_id, head.jobs_api) == "SUCCEEDED"
    main(["status", job_id, "--address", head.jobs_api])  # and how far it got, from the manifest
    assert f"\nshards {shards}/{shards} committed | " in capsys.readouterr().out
    assert manifest["complete"] and sum(manifest["counts"].values()) == len(job_rows)
    assert len(read_records(layout)) == len(job_rows)
    assert [a["device"] for a in manifest["actors"]] == ["cpu"]

    assert main(["logs", job_id, "--address", head.jobs_api]) == 0  # the whole log, once more
    assert f"shards: {len(manifest['shards'])} done" in capsys.readouterr().out


def test_ray_address_works_and_a_stopped_job_resumes_to_the_clean_output(
    tmp_path, capsys, monkeypatch, head, clean_submission, job_rows, tiny_models
):
    job, layout = write_job(tmp_path, job_rows, tiny_models, "stopped")
    monkeypatch.setenv("RAY_ADDRESS", head.jobs_api)

    first = _submit(capsys, job)
    _wait_for(lambda: len(list(layout.shards.glob("*.done.json"))) >= 1 if layout.shards.exists() else False)
    assert main(["stop", first]) == 0
    _wait_for(lambda: _status(capsys, first, head.jobs_api) == "STOPPED")
    assert main(["status", first]) == 1  # a stopped job is not a success
    stopped = json.loads(layout.manifest.read_text())
    assert not stopped["complete"]

    second = _submit(capsys, job)
    assert main(["logs", second, "--follow"]) == 0
    resumed_log = capsys.readouterr().out
    assert "already done" in resumed_log and " 0 already done" not in resumed_log
    manifest = json.loads(layout.manifest.read_text())
    assert manifest["complete"] and sum(manifest["counts"].values()) == len(job_rows)

    clean = clean_submission[3]
    for path in clean.shard_parquets():
        assert pq.read_table(layout.shards / path.name).equals(pq.read_table(path)), path.name


def test_unknown_job_and_unreachable_cluster_are_one_line_errors(capsys, monkeypatch, head):
    for command in (["status"], ["logs"], ["logs", "--follow"], ["stop"]):
        assert main([*command[:1], "raysubmit_nope", *command[1:], "--address", head.jobs_api]) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith(f"capfilt: error: Ray's Jobs API at {head.jobs_api}: ") and "raysubmit_nope" in err
        )
        assert err.count("\n") == 1, err
    assert main(["logs", "x", "--address", "http://127.0.0.1:9"]) == 2
    assert "cannot reach Ray's Jobs API at http://127.0.0.1:9" in capsys.readouterr().err
    # --address wins over RAY_ADDRESS (which Ray's client would prefer), and RAY_ADDRESS is left as it was.
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
    assert main(["status", "raysubmit_nope", "--address", head.jobs_api]) == 2
    assert f"Ray's Jobs API at {head.jobs_api}: " in capsys.readouterr().err
    assert os.environ["RAY_ADDRESS"] == "http://127.0.0.1:9"


def test_a_bad_spec_is_refused_before_anything_is_submitted(tmp_path, capsys, head):
    job = tmp_path / "job.yaml"
    job.write_text(
        "input: {url_list: /nowhere.parquet}\noutput: {path: /tmp/x}\ncaptioner: {batch_sise: 4}\n"
    )
    assert main(["submit", str(job), "--address", head.jobs_api]) == 2
    assert "captioner.batch_sise: unknown key (did you mean 'batch_size'?)" in capsys.readouterr().err


def _wait_for(condition, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
