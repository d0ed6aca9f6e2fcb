"""Real Ray clusters on this machine for the cluster tests; nothing leaves this machine.

`RayHead` is what an operator types: `ray start --head` in its own temp dir (so neither this test
session's Ray nor a later `ray.init()` mistakes it for "the local cluster"), with the dashboard and
its Jobs API. `multi_node_cluster` is Ray's own test harness: a head and worker nodes, each a real
raylet, that declare GPUs the machine does not have (Ray schedules on declared resources; the
actors find no CUDA and run on the CPU).
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def multi_node_cluster(workers: list[dict[str, Any]], head: dict[str, Any]) -> Iterator[Any]:
    """A `ray.cluster_utils.Cluster`: the head, then one worker node per entry of `workers`.

    Ray's harness records its address as "the latest cluster" for a plain `ray.init()` on this
    machine; that record is put back as it was, so nothing later connects to a dead cluster."""
    from ray._private.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    record = Path(get_ray_address_file(None))
    saved = record.read_text() if record.exists() else None
    # Nodes take Ray's default address (this machine's own interface): the driver's `ray.init`
    # turns a 127.0.0.1 address into that one, which a GCS bound to loopback alone would refuse.
    node = {"include_dashboard": False}
    cluster = Cluster(
        initialize_head=True, head_node_args={**node, "_system_config": FAST_NODE_DEATH, **head}
    )
    try:
        for worker in workers:
            cluster.add_node(**node, **worker)
        yield cluster
    finally:
        cluster.shutdown()
        if saved is None:
            record.unlink(missing_ok=True)
        else:
            record.write_text(saved)


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
