"""Real Ray clusters on this machine for the cluster tests; nothing leaves this machine.

`RayHead` is what an operator types: `ray start --head` in its own temp dir (so neither this test
session's Ray nor a later `ray.init()` mistakes it for "the local cluster"), with the dashboard and
its Jobs API. `multi_node_cluster` is Ray's own test harness, hosted by a process of its own: a head
and worker nodes, each a real raylet, that declare GPUs the machine does not have (Ray schedules on
declared resources; the actors find no CUDA and run on the CPU).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from pipeline.spec.layout import OutputLayout
from tests.conftest import make_spec

LOOPBACK = "127.0.0.1"
# Nodes are declared dead after ~2 s of missed health checks instead of Ray's default ~30 s.
FAST_NODE_DEATH = {
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 4,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def job_env() -> dict[str, str]:
    """The environment of a driver or node: this interpreter's scripts (`capfilt`) first on PATH, no
    hub traffic."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


class RayHead:
    """`ray start --head --block` with the dashboard (Jobs API) on 127.0.0.1, until `stop()`."""

    def __init__(self, num_cpus: int = 2) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="cfray-", dir="/tmp")  # short: Unix socket paths
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.jobs_api = f"http://{LOOPBACK}:{self.dashboard_port}"
        ports = {
            "--port": self.gcs_port,
            "--dashboard-port": self.dashboard_port,
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
            "--ray-client-server-port": free_port(),
        }
        command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address", LOOPBACK,
                   "--dashboard-host", LOOPBACK, "--include-dashboard", "true", "--num-cpus", str(num_cpus),
                   "--num-gpus", "0", "--temp-dir", self.temp_dir, "--disable-usage-stats",
                   *[str(x) for kv in ports.items() for x in kv]]  # fmt: skip
        # --block, in a session of its own: stopping is then a signal to this process group, never
        # `ray stop`, which kills every Ray process on the machine (the test session's own Ray too).
        self.log = Path(self.temp_dir) / "ray-start.log"
        self.process = subprocess.Popen([*command, "--block"], env=job_env(), start_new_session=True,
                                        stdout=self.log.open("w"), stderr=subprocess.STDOUT)  # fmt: skip
        self._wait_for_jobs_api()

    def _wait_for_jobs_api(self, timeout: float = 120) -> None:
        from pipeline.job.cluster_jobs import jobs_client

        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                with jobs_client(self.jobs_api) as client:
                    client.list_jobs()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def stop(self) -> None:
        """SIGTERM to the head's process group (GCS, raylet, dashboard, workers, job drivers), then
        SIGKILL to whatever is left of it."""
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while _group_alive(self.process.pid) and time.monotonic() < deadline:
                self.process.poll()
                time.sleep(0.2)
        self.process.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


class MultiNodeCluster:
    """A `ray.cluster_utils.Cluster` (a head and worker nodes, each a real raylet) hosted by a process
    of its own (`python -m tests.ray_clusters`), driven over its stdin and stdout.

    Not in pytest's process: Ray's harness changes that process's Ray state (its shutdown resets the
    internal KV client and the "latest cluster" record, its nodes install exit and SIGTERM hooks) while
    pytest's process is the driver of the session's own Ray. Every stall of the session's Ray seen so
    far (five, over three days) came after this harness had run in pytest's process."""

    def __init__(self, workers: list[dict[str, Any]], head: dict[str, Any]) -> None:
        self.log = Path(tempfile.mkstemp(prefix="cfcluster-", suffix=".log")[1])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.ray_clusters"],
            env=job_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            text=True,
            start_new_session=True,  # its nodes are its children: killed with it, never with pytest's
        )
        started = self._ask({"workers": workers, "head": head})
        self.address: str = started["address"]
        self.head_node_id: str = started["head"]
        self.worker_node_ids: list[str] = started["workers"]

    def _ask(self, request: dict[str, Any]) -> Any:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the cluster's host process ended: {self.log.read_text()[-3000:]}"
        return json.loads(line)

    def actor_table(self) -> dict[str, dict[str, Any]]:
        """Every actor the cluster has run, from its GCS's actor table."""
        return self._ask({"do": "actors"})

    def remove_worker(self, node_id: str) -> None:
        """Kill a worker node's processes at once (no graceful shutdown): a lost machine."""
        self._ask({"do": "remove", "node": node_id})

    def shutdown(self) -> None:
        try:
            self._ask({"do": "shutdown"})
            self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            self.log.unlink(missing_ok=True)


@contextlib.contextmanager
def multi_node_cluster(workers: list[dict[str, Any]], head: dict[str, Any]) -> Iterator[MultiNodeCluster]:
    """A head and one worker node per entry of `workers`, in a process of its own, until the block ends."""
    cluster = MultiNodeCluster(workers, head)
    try:
        yield cluster
    finally:
        cluster.shutdown()


def _host_cluster() -> None:
    """The host process of `MultiNodeCluster`: starts the cluster from the first request on stdin,
    then answers requests (one JSON line each) until told to shut down or stdin closes.

    Ray's harness records its address as "the latest cluster" for a plain `ray.init()` on this
    machine; that record is put back as it was, so nothing later connects to a dead cluster."""
    from ray._private.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    def answer(value: Any) -> None:
        sys.stdout.write(json.dumps(value, default=str) + "\n")
        sys.stdout.flush()

    record = Path(get_ray_address_file(None))
    saved = record.read_text() if record.exists() else None
    first = json.loads(sys.stdin.readline())

    # Nodes take Ray's default address (this machine's own interface): the driver's `ray.init`
    # turns a 127.0.0.1 address into that one, which a GCS bound to loopback alone would refuse.
    # Ports are free ones, never Ray's fixed defaults, which the session's own Ray may hold.
    def node() -> dict[str, Any]:
        return {"include_dashboard": False, "dashboard_agent_listen_port": free_port()}

    head = {**node(), "_system_config": FAST_NODE_DEATH, **first["head"]}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        workers = [cluster.add_node(**node(), **worker) for worker in first["workers"]]
        ids = [worker.node_id for worker in workers]
        answer({"address": cluster.address, "head": cluster.head_node.node_id, "workers": ids})
        for line in sys.stdin:
            request = json.loads(line)
            if request["do"] == "actors":
                answer(cluster.global_state.actor_table(None))
            elif request["do"] == "remove":
                lost = next(w for w in cluster.worker_nodes if w.node_id == request["node"])
                cluster.remove_node(lost, allow_graceful=False)
                answer("removed")
            else:
                break
    finally:
        cluster.shutdown()
        if saved is None:
            record.unlink(missing_ok=True)
        else:
            record.write_text(saved)
    answer("shut down")


def answering_rows(web) -> list[tuple[str, str]]:
    """The sample web's (url, caption) rows that answer at once: no job waits for a timeout."""
    site, pairs = web
    return [(site.url(p.path), p.caption) for p in pairs if p.expected == "ok"]


def write_job(tmp_path: Path, rows, tiny_models, out: str, **sections: Any) -> tuple[Path, OutputLayout]:
    """A cluster test's job as YAML, and its output layout: chunks of 2 images and shards of 8 rows,
    so that many chunks are in flight, shards finish one after another, and when the first shard is
    written at most one per actor is; one actor per GPU (one on a cluster without GPUs)."""
    resources = {"actors": None, **sections.pop("resources", {})}
    spec = make_spec(tmp_path, rows, tiny_models, out=out, captioner={"batch_size": 2},
                     output={"shard_size": 8}, resources=resources, **sections)  # fmt: skip
    job = tmp_path / f"{out}.yaml"
    job.write_text(yaml.safe_dump(spec.to_dict()))
    return job, OutputLayout(Path(spec.output.path))


if __name__ == "__main__":
    _host_cluster()
