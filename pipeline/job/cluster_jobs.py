"""`capfilt submit / status / logs / stop`: a job on a running Ray cluster, through Ray's Jobs API.

What travels with a submission is the job spec alone: validated here first, its local paths made
absolute, written as `job.yaml` into a fresh directory that Ray ships as the job's `working_dir`;
the entrypoint is `capfilt run job.yaml` on the head node, with `--overwrite` when submitted
with it (the output directory is checked, emptied and locked there, where it is written). The
capfilt package itself is not shipped: every node runs the cluster image (Dockerfile), which has it
installed, because the workers import the stages and must run the code the spec was validated
against. So the paths in the spec must name storage that the head and the workers see at the same
place.

The Jobs API address is `--address`, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS (as for Ray's own
CLI), else the cluster that `ray start` last started on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from pipeline import __version__
from pipeline.core.messages import one_line
from pipeline.spec.config import JobSpec

ENTRYPOINT = "capfilt run job.yaml"

SUCCEEDED = "SUCCEEDED"
ENDED = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterError(RuntimeError):
    """The Jobs API could not be reached or refused a request; the message says which and where."""


def submit(spec: JobSpec, address: str | None, overwrite: bool = False) -> str:
    """Submit `spec` (its paths as the cluster is to see them: absolute, or object-store URIs);
    returns the Ray job (submission) id. `overwrite`: the job empties its output first."""
    with jobs_client(address) as client, tempfile.TemporaryDirectory(prefix="capfilt-submit-") as staging:
        Path(staging, "job.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
        return client.submit_job(
            entrypoint=entrypoint(overwrite),
            # The driver's `ray.init` adds the workers' environment; naming it here too is a conflict.
            runtime_env={"working_dir": staging},
            metadata={"capfilt_version": __version__, "output": spec.output.path},
        )


def entrypoint(overwrite: bool) -> str:
    """The command the cluster runs: the output directory's rules apply there, where it is written."""
    return f"{ENTRYPOINT} --overwrite" if overwrite else ENTRYPOINT


def status(job_id: str, address: str | None) -> dict[str, Any]:
    """The job's status, message, times and entrypoint, as the Jobs API reports them."""
    with jobs_client(address) as client:
        info = client.get_job_info(job_id)
    return {
        "job_id": job_id,
        "status": str(info.status.value),
        "message": info.message or "",
        "start_time": info.start_time,
        "end_time": info.end_time,
        "entrypoint": info.entrypoint,
        "metadata": info.metadata or {},
    }


def logs(job_id: str, address: str | None, follow: bool, write: Callable[[str], None]) -> str:
    """Write the job's driver log, all of it so far; with `follow`, until the job ends, and then
    return the job's final status."""
    with jobs_client(address) as client:
        status = str(client.get_job_status(job_id).value)  # an unknown id fails here, in one line
        if not follow:
            write(client.get_job_logs(job_id))
            return status

        async def tail() -> None:
            async for lines in client.tail_job_logs(job_id):
                write(lines)

        asyncio.run(tail())
        return str(client.get_job_status(job_id).value)


def stop(job_id: str, address: str | None) -> bool:
    """Ask Ray to stop the job (SIGTERM to its driver, then SIGKILL); False if it had already ended.

    Finished shards stay; submitting the same spec again resumes it."""
    with jobs_client(address) as client:
        return bool(client.stop_job(job_id))


@contextlib.contextmanager
def jobs_client(address: str | None) -> Iterator[Any]:
    """A JobSubmissionClient for `address`; what goes wrong becomes one ClusterError line naming it.

    Ray's client sends the cluster's auth token only under RAY_AUTH_MODE=token, while `ray start`
    turns token auth on wherever a token file exists; so a cluster that refuses a request for want
    of a token is asked again with the local token (`_auth_headers`), and no other cluster gets it.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    refusals = _refusals()
    where = (address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
             or "the local Ray cluster")  # fmt: skip
    try:
        with _address_wins(address):
            try:
                client = JobSubmissionClient(address)
            except AuthenticationError:
                client = JobSubmissionClient(address, headers=_auth_headers())
    except refusals as err:
        raise ClusterError(f"cannot reach Ray's Jobs API at {where}: {one_line(err)}") from None
    try:
        yield client
    except refusals as err:  # an unknown job id, a lost connection, a refused token
        raise ClusterError(f"Ray's Jobs API at {where}: {one_line(err)}") from None


def _refusals() -> tuple[type[BaseException], ...]:
    """What a Jobs API call fails with: Ray's refusals (an unknown job id is a RuntimeError, a bad
    token a RayError) and the transports' errors (requests' for calls, aiohttp's for `--follow`)."""
    import aiohttp
    import requests
    from ray.exceptions import RayError

    return (RuntimeError, ValueError, OSError, RayError, requests.RequestException, aiohttp.ClientError)


@contextlib.contextmanager
def _address_wins(address: str | None) -> Iterator[None]:
    """Ray's client prefers RAY_ADDRESS over its argument; an explicit --address should win."""
    if address is None:
        yield
        return
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _auth_headers() -> dict[str, str]:
    """The token Ray's own tools would use: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or
    ~/.ray/auth_token; none under RAY_AUTH_MODE=disabled."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}
