"""Placement and faults on a real multi-node Ray: a CPU-only head and two worker nodes that declare
one GPU each, every node a real raylet on this machine; drivers are real `capfilt run` processes.

- one CapFilt actor per declared GPU, on distinct worker nodes, none on the head;
- the driver killed (SIGKILL) mid-job, then run again: the output equals an uninterrupted run's;
- a worker node killed while shards are in flight: the job finishes on the remaining node with
  every input row accounted once, and again equals the uninterrupted run; in that job
  `gpus_per_actor: 0.5` packs two actors on each GPU.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.spec.layout import OutputLayout
from tests.ray_clusters import answering_rows, job_env, multi_node_cluster, write_job

pytestmark = pytest.mark.slow  # a head and two worker nodes

GPU_WORKER = {"num_cpus": 2, "num_gpus": 1}


@pytest.fixture(scope="module")
def cluster():
    with multi_node_cluster([GPU_WORKER, GPU_WORKER], head={"num_cpus": 1, "num_gpus": 0}) as started:
        yield started


@pytest.fixture(scope="module")
def job_rows(web) -> list[tuple[str, str]]:
    return answering_rows(web)


def _driver(job: Path, cluster, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline.cli", "run", str(job), "--address", cluster.address]
    return subprocess.Popen(command, env=job_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def _run(job: Path, cluster, log: Path) -> dict[str, Any]:
    assert _driver(job, cluster, log).wait(timeout=600) == 0, log.read_text()[-3000:]
    return json.loads(
        OutputLayout(Path(yaml.safe_load(job.read_text())["output"]["path"])).manifest.read_text()
    )


def _wait_for_first_shard(layout: OutputLayout, driver: subprocess.Popen, log: Path) -> int:
    """Block until one shard is written; the number of shards done by then."""
    deadline = time.monotonic() + 600
    while not (layout.shards.exists() and any(layout.shards.glob("*.done.json"))):
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return len(list(layout.shards.glob("*.done.json")))


def _by_key(layout: OutputLayout) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for p in layout.shard_parquets() for r in pq.read_table(p).to_pylist()}


def _capfilt_actors(cluster) -> dict[str, dict[str, Any]]:
    """Every CapFilt actor this cluster has run, from the GCS's actor table: where Ray placed it."""
    table = cluster.actor_table()
    return {a: info for a, info in table.items() if "_StageActor" in info["ActorClassName"]}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, cluster, job_rows, tiny_models):
    tmp = tmp_path_factory.mktemp("clean")
    job, layout = write_job(tmp, job_rows, tiny_models, "clean")
    return _run(job, cluster, tmp / "clean.log"), layout, _capfilt_actors(cluster)


def test_one_actor_per_declared_gpu_on_distinct_worker_nodes(cluster, clean_run, job_rows):
    manifest, _, placed = clean_run
    assert manifest["complete"] and sum(manifest["counts"].values()) == len(job_rows)
    workers = set(cluster.worker_node_ids)
    assert len(placed) == 2
    assert {
        a["Address"]["NodeID"] for a in placed.values()
    } == workers  # one on each GPU node, none on the head
    # The actors that scored chunks say what they had: a declared GPU each, no CUDA, so the CPU.
    assert manifest["actors"] and {a["node"] for a in manifest["actors"]} <= workers
    assert all(len(a["gpu_ids"]) == 1 and a["device"] == "cpu" for a in manifest["actors"])
    # The bound on shards in flight lives with the driver, on the head: a lost worker never takes it.
    table = cluster.actor_table().values()
    slots = [a["Address"]["NodeID"] for a in table if a["ActorClassName"].endswith("_Slots")]
    assert slots and set(slots) == {cluster.head_node_id}


def test_a_killed_driver_resumes_to_the_uninterrupted_output(
    tmp_path, cluster, clean_run, job_rows, tiny_models
):
    _, clean, _ = clean_run
    job, layout = write_job(tmp_path, job_rows, tiny_models, "killed")
    log = tmp_path / "killed.log"
    driver = _driver(job, cluster, log)
    done_when_killed = _wait_for_first_shard(layout, driver, log)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    manifest = json.loads(layout.manifest.read_text())  # the one written when the run started
    assert not manifest["complete"] and done_when_killed < len(manifest["shards"])

    resumed = _run(job, cluster, tmp_path / "resumed.log")
    skipped = int(re.search(r"(\d+) already done", (tmp_path / "resumed.log").read_text()).group(1))
    assert done_when_killed <= skipped < len(resumed["shards"])  # finished shards were not redone
    assert resumed["complete"] and sum(resumed["counts"].values()) == len(job_rows)
    assert _by_key(layout) == _by_key(clean)
    assert not list(layout.shards.glob(".*.tmp"))  # no half-written file is left behind


def test_a_lost_worker_node_mid_job_costs_no_row(tmp_path, cluster, clean_run, job_rows, tiny_models):
    """Last in this module: it takes a node away."""
    _, clean, _ = clean_run
    before = set(_capfilt_actors(cluster))
    job, layout = write_job(tmp_path, job_rows, tiny_models, "node-lost", resources={"gpus_per_actor": 0.5})
    log = tmp_path / "node-lost.log"
    driver = _driver(job, cluster, log)
    done_when_lost = _wait_for_first_shard(layout, driver, log)
    placed = sorted(a["Address"]["NodeID"] for k, a in _capfilt_actors(cluster).items() if k not in before)
    lost = cluster.worker_node_ids[0]
    cluster.remove_worker(lost)

    assert driver.wait(timeout=600) == 0, log.read_text()[-3000:]
    manifest = json.loads(layout.manifest.read_text())
    assert done_when_lost < len(manifest["shards"])  # shards were still in flight when the node died
    assert manifest["complete"] and sum(manifest["counts"].values()) == len(job_rows)
    records = _by_key(layout)
    assert len(records) == len(job_rows)  # every input row once: no duplicate, none lost
    assert records == _by_key(clean)
    # Half a GPU each: two actors on each GPU, so two and two on the two nodes (before one was lost).
    assert len(placed) == 4 and placed.count(lost) == 2 and len(set(placed)) == 2
