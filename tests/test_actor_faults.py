"""An actor that raises, on a real local Ray: batches split and retried, a bad shard failed alone.

The stage below raises like CUDA's allocator on chunks of more than 3 images (every chunk here has
8), and raises another error on every part of shard 00001; the models are the real tiny ones.
"""

from __future__ import annotations

import os
import re
import sys

import pyarrow.parquet as pq
import pytest
from ray import cloudpickle

from pipeline.curate.capfilt_stage import CapFiltStage
from pipeline.job.runner import run_job
from pipeline.output.manifest import DONE, FAILED
from pipeline.output.summary import format_summary
from pipeline.spec.fates import Fate
from tests.conftest import make_spec

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]  # slow: whole jobs with failing actors

BAD_SHARD = "00001"


class FailingStage(CapFiltStage):
    def __call__(self, chunk):
        if len(chunk["keys"]) > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if chunk["shard"] == BAD_SHARD:
            raise ValueError("injected: this shard's images cannot be scored")
        return super().__call__(chunk)


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors unpickle it by value


def test_split_retry_and_a_failed_shard_leave_the_rest_of_the_job_complete(tmp_path, web, tiny_models):
    site, pairs = web
    rows = [(site.url(p.path), p.caption) for p in pairs]
    spec = make_spec(tmp_path, rows, tiny_models)  # 16 rows a shard, chunks of 8 images
    lines: list[str] = []
    first = run_job(spec, log=lines.append, stage_type=FailingStage)

    shards = {s["shard"]: s for s in first.manifest["shards"]}
    assert len(shards) >= 3
    assert shards[BAD_SHARD]["status"] == FAILED
    error = shards[BAD_SHARD]["error"]
    assert "injected: this shard's images cannot be scored" in error
    assert re.search(r"shard 00001 chunk \d+\.\d+ \(keys 00001\d+\.\.00001\d+\) failed twice", error), error
    assert not first.complete
    assert "1 failed" in format_summary(first.manifest, spec.output.path)
    assert not first.layout.shard_report(BAD_SHARD).exists()
    # Every other shard is done, and every downloaded row in it was scored although every chunk of 8
    # raised at first: the halves, and their halves, were retried until they fit.
    for name, shard in shards.items():
        if name == BAD_SHARD:
            continue
        assert shard["status"] == DONE, shard
        records = pq.read_table(first.layout.shard_parquet(name)).to_pylist()
        assert sum(shard["counts"].values()) == len(records) == shard["rows"]
        scored = [r for r in records if r["status"] in (Fate.KEPT, Fate.FILTERED)]
        assert scored and all(len(r["synthetic_itm"]) == 2 for r in scored)
    assert any(f"shard {BAD_SHARD} failed" in line for line in lines)

    before = {p.name: os.stat(p).st_mtime_ns for p in first.layout.shards.iterdir()}
    second = run_job(spec, log=lines.append)  # the fault is gone: the run resumes the failed shard only
    assert second.complete
    assert sum(second.manifest["counts"].values()) == second.manifest["input_rows"] == len(rows)
    after = {p.name: os.stat(p).st_mtime_ns for p in first.layout.shards.iterdir()}
    assert {n for n in after if before.get(n) != after[n]} == {
        f"{BAD_SHARD}.parquet",
        f"{BAD_SHARD}.tar",
        f"{BAD_SHARD}_stats.json",
        f"{BAD_SHARD}.done.json",
        "sizes.json",  # the failed shard's tar joins it
    }
    assert len(second.manifest["actors"]) == 1 and second.manifest["actors"][0]["device"] == "cpu"
