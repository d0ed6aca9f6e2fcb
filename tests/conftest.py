"""Shared fixtures: tiny BLIP checkpoints, a sample web served on 127.0.0.1, one local Ray.

Everything is real: models built with `save_pretrained` and loaded with `from_pretrained`,
images fetched over HTTP from a server the tests start, a real Ray started on this machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # botocore must never look for an instance role here
# A stream that stops moving fails its job's shards after 5 minutes with Ray Data's account of which
# operator stopped (no test's stream is still for more than a minute), not at pytest's timeout.
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "300")

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.curate.tiny_models import TinyModelPaths, write_tiny_models
from pipeline.job.runner import JobResult
from pipeline.spec.config import JobSpec, spec_from_dict
from pipeline.spec.layout import OutputLayout
from pipeline.synthetic.sample_web import SamplePair, StaticSite, sample_web


@pytest.fixture(autouse=True)
def _stacks_when_hung(pytestconfig: pytest.Config) -> Iterator[None]:
    """A test still running 10 s before pytest-timeout's limit ends the run with every thread's stack
    in faulthandler's form, one line a frame. pytest-timeout's own dump is several times longer, and
    CI keeps only the end of a run's output: once it cut off the thread that shows why a Ray Data
    stream stopped (the stream executor's), leaving only the main thread waiting for it."""
    import faulthandler

    limit = float(pytestconfig.getini("timeout"))
    faulthandler.dump_traceback_later(limit - 10, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModelPaths:
    return write_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def web() -> Iterator[tuple[StaticSite, list[SamplePair]]]:
    pairs = sample_web(n_good=40, seed=1)
    with StaticSite({p.path: p.route for p in pairs}) as site:
        yield site, pairs


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 on 127.0.0.1, in the environment (AWS_ENDPOINT_URL and dummy credentials)."""
    from tests.s3 import s3_server

    with s3_server() as endpoint:
        yield endpoint


def start_local_ray() -> None:
    """A local Ray of its own ("local": even while a test's `ray start` or multi-node cluster is the
    one a plain ray.init() would join), replacing any this process is connected to."""
    import ray

    from pipeline.job.runner import WORKER_ENV

    ray.shutdown()
    env = {"env_vars": WORKER_ENV}
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env=env, log_to_driver=False)


@pytest.fixture(scope="session")
def ray_local(s3_endpoint) -> Iterator[None]:
    """One local Ray; started after the S3 endpoint is in the environment, so its workers have it."""
    import ray

    start_local_ray()
    yield
    ray.shutdown()


def read_records(layout: OutputLayout) -> list[dict[str, Any]]:
    """Every output row of a job, read back with pyarrow."""
    return [r for p in layout.shard_parquets() for r in pq.read_table(p).to_pylist()]


def tar_keys(layout: OutputLayout) -> Counter[str]:
    """The sample keys in a job's output tars, read back with webdataset."""
    tars = [str(p) for p in sorted(layout.shards.glob("*.tar"))]  # none when no shard kept a row
    if not tars:
        return Counter()
    return Counter(s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False, empty_check=False))


def make_spec(
    tmp_path: Path,
    rows: list[tuple[Any, Any]],
    models: TinyModelPaths,
    out: str = "out",
    **sections: dict[str, Any],
) -> JobSpec:
    """A job over `rows` of (url, caption), written as a Parquet URL list, with the tiny models."""
    url_list = tmp_path / "urls.parquet"
    if not url_list.exists():
        urls, captions = zip(*rows, strict=True) if rows else ((), ())
        table = pa.table({"url": pa.array(urls, pa.string()), "caption": pa.array(captions, pa.string())})
        pq.write_table(table, url_list)
    raw: dict[str, Any] = {
        "input": {"url_list": str(url_list)},
        "download": {"image_size": 64, "timeout": 5, "thread_count": 8, "allow_private_networks": True},
        "captioner": {"model": str(models.captioner), "num_captions": 2, "batch_size": 8, "max_length": 12},
        "filter": {"model": str(models.itm), "batch_size": 32},
        "resources": {"actors": 1},
        "output": {"path": str(tmp_path / out), "shard_size": 16},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return spec_from_dict(raw)


@pytest.fixture(scope="session")
def curated_job(tmp_path_factory, ray_local) -> JobResult:
    """A finished job as users get one: a noisy web split of the synthetic world and the hostile cases,
    curated by the shipped trained models into 5 shards, with kept and filtered images, dropped web
    captions and every failure fate. Shared read-only by the tests of what users do with an output
    (inspect, report, rethreshold, loader); a test that changes an output runs its own job."""
    from pipeline.synthetic.sample_web import hostile_pairs
    from pipeline.synthetic.splits import web_split
    from pipeline.synthetic.trained import export_trained_models
    from pipeline.synthetic.web_job import run_web_job

    out = tmp_path_factory.mktemp("curated")
    models = export_trained_models(out / "models")
    result = run_web_job(out, web_split(80, seed=3), models, extra=hostile_pairs(3), log=lambda _: None)
    assert result.complete
    return result
