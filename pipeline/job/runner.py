"""Runs a job: wires the stages onto Ray. The only module that knows Ray.

    prepare (driver) -> download (img2dataset, Ray tasks) -> read chunks -> preprocess (CPU tasks)
    -> CapFilt actors (one per GPU) -> results stream back to the driver, grouped by shard
    -> as soon as a shard's last chunk arrives, a Ray task writes it.

Results carry captions and scores only; the writer takes the image bytes from the raw shard, so
images never pass through the driver. Shards already written by the same spec are skipped, so a
re-run resumes; a shard that fails is reported in the manifest and the others still finish.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.messages import one_line
from pipeline.core.resources import Resources
from pipeline.core.timings import RunTimings, stopwatch
from pipeline.curate.capfilt_stage import CapFiltStage
from pipeline.curate.chunk_retry import score_with_retry
from pipeline.curate.chunks import Chunk, ChunkReader, chunk_count
from pipeline.curate.model_check import check_itm_tokenizer, check_models
from pipeline.curate.preprocess import PreprocessStage
from pipeline.ingest.download import DownloadStage
from pipeline.ingest.url_list import check_columns, prepare
from pipeline.ingest.urlpolicy import NetworkPolicy
from pipeline.job.output_guard import claim_output
from pipeline.output.manifest import build_manifest, check_accounting
from pipeline.output.shard_writer import ShardWriter, scores_by_key
from pipeline.spec.config import JobSpec
from pipeline.spec.layout import OutputLayout, write_json_atomically

Log = Callable[[str], None]
WORKER_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class JobResult:
    manifest: dict[str, Any]
    layout: OutputLayout

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])


def run_job(
    spec: JobSpec,
    address: str | None = None,
    log: Log = print,
    stage_type: type[CapFiltStage] = CapFiltStage,
    overwrite: bool = False,
) -> JobResult:
    """Run (or resume) a job to the end and write its manifest. (`stage_type` is the seam where the
    fault tests put a stage that fails on purpose.)

    Before anything is written: the URL list's columns and the model directories are checked, and
    the output is claimed (`output_guard`): refused when it holds what is not capfilt's, emptied
    first under `overwrite`, and locked against another run until the manifest is written."""
    spec = spec.with_absolute_paths()
    layout = OutputLayout(spec.output.path)
    check_columns(spec.input)
    check_models(spec)
    preprocess = PreprocessStage.for_model(spec.captioner.model)  # a hub name resolves, or fails now
    check_itm_tokenizer(spec)  # [ENC] present, when the filter reads it
    reads = [("input.url_list", spec.input.url_list), ("captioner.model", spec.captioner.model),
             ("filter.model", spec.filter.model)]  # fmt: skip
    with claim_output(layout.root, overwrite, log=log, reads=reads):
        return _run_claimed(spec, layout, address, log, stage_type, preprocess)


def _run_claimed(spec: JobSpec, layout: OutputLayout, address: str | None, log: Log,
                 stage_type: type[CapFiltStage], preprocess: PreprocessStage) -> JobResult:  # fmt: skip
    layout.root.mkdir()
    fingerprint = spec.fingerprint()
    with ray_session(address):
        rows = prepare(spec.input, NetworkPolicy.of(spec.download), layout.prepared_input,
                       spec.download_fingerprint(), downloaded=bool(layout.downloaded_shards()))  # fmt: skip
        names = [f"{i:05d}" for i in range(math.ceil(rows / spec.output.shard_size))]
        # Written now, so that `capfilt inspect` can follow a job that is running or died half way.
        reports = layout.finished_reports(names, fingerprint)
        write_json_atomically(layout.manifest, build_manifest(spec, rows, names, reports, {}))
        download_start = time.perf_counter()
        if rows:
            DownloadStage(spec, layout).run(distributor="ray")
        download_s = time.perf_counter() - download_start
        downloaded = set(layout.downloaded_shards())
        unfinished = "download did not finish; run the job again to retry"
        errors = {n: unfinished for n in names if n not in downloaded}
        pending = [n for n in names if n in downloaded and n not in reports]
        log(f"capfilt: {rows} input rows in {len(names)} shards: {len(reports)} already done, "
            f"{len(pending)} to caption and filter, {len(errors)} not downloaded")  # fmt: skip
        outcome = _Outcome()
        if pending:
            outcome = _capfilt(spec, layout, pending, fingerprint, log, stage_type, preprocess)
            reports.update(outcome.reports)
            errors.update(outcome.errors)
        outcome.timings.download_s = download_s
        log(outcome.timings.summary())
    manifest = build_manifest(spec, rows, names, reports, errors, actors=list(outcome.actors.values()),
                              timings=outcome.timings.as_dict())  # fmt: skip
    write_json_atomically(layout.manifest, manifest)
    check_accounting(manifest)
    return JobResult(manifest, layout)


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Use the Ray already connected, else connect to `address` / RAY_ADDRESS, else start a local one."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address=address, runtime_env={"env_vars": WORKER_ENV}, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


@dataclass
class _Outcome:
    """What a caption/filter pass did: shard reports, shard errors, the actors that did it, and
    where its time went."""

    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    actors: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: RunTimings = field(default_factory=RunTimings)

    def count(self, chunk: Chunk) -> None:
        placement = {k: chunk[k] for k in ("node", "node_ip", "device", "gpu_ids")}
        self.actors.setdefault(chunk["actor"], {**placement, "chunks": 0})["chunks"] += 1


def _capfilt(spec: JobSpec, layout: OutputLayout, shards: list[str], fingerprint: str, log: Log,
             stage_type: type[CapFiltStage], preprocess: PreprocessStage) -> _Outcome:  # fmt: skip
    import ray

    start, started_at = time.perf_counter(), time.time()
    batch_size = spec.captioner.batch_size
    expected = {name: chunk_count(layout, name, batch_size) for name in shards}
    writer = ShardWriter(layout, spec.filter.threshold, fingerprint)
    write = ray.remote(num_cpus=writer.resources.cpus)(_write_shard)
    writes = {name: write.remote(writer, name, []) for name in shards if expected[name] == 0}
    outcome = _Outcome()
    to_score = [name for name in shards if expected[name] > 0]
    if to_score:
        stage = stage_type(spec.captioner, spec.filter, _actor_resources(spec, log))
        actors = spec.resources.actors or _actors_for(stage.resources)
        per_actor = f"{stage.resources.gpus} GPU and {stage.resources.cpus} CPU each"
        log(f"capfilt: {actors} CapFilt actor(s), {per_actor}")
        # Ray Data fuses preprocessing into the actor only when their resources are equal (a CPU-only
        # run, where that costs nothing); with GPUs it stays in CPU tasks and the GPU never decodes.
        ds = (
            ray.data.from_items([{"shard": name} for name in to_score])
            .flat_map(ChunkReader(layout, batch_size), num_cpus=0.25)
            .map(preprocess, num_cpus=preprocess.resources.cpus)
            .map(
                _StageActor,
                fn_constructor_args=(stage,),
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=stage.resources.cpus,
                num_gpus=stage.resources.gpus,
            )  # Ray Data places the actors with SPREAD: one lost node costs few of them (tested)
        )
        # By chunk number: should Ray ever deliver a retried chunk twice, it counts once.
        arrived: dict[str, dict[int, Chunk]] = defaultdict(dict)
        try:
            for row in ds.iter_rows():
                chunk, name = dict(row), row["shard"]
                if name in outcome.errors or name in writes or chunk["chunk"] in arrived[name]:
                    continue
                outcome.count(chunk)
                if chunk["error"]:
                    outcome.errors[name] = f"caption/filter failed: {chunk['error']}"
                    log(f"capfilt: shard {name} failed: {outcome.errors[name]}")
                    arrived.pop(name, None)
                    continue
                outcome.timings.add_chunk(chunk, chunk["ready_at"] - started_at)
                arrived[name][chunk["chunk"]] = chunk
                if len(arrived[name]) == expected[name]:
                    writes[name] = write.remote(writer, name, list(arrived.pop(name).values()))
        except Exception as err:  # the stage failed: finished shards stay, the rest are reported
            reason = f"caption/filter stage failed: {one_line(err)}"
            log(f"capfilt: {reason}")
            unfinished = [name for name in to_score if name not in writes and name not in outcome.errors]
            outcome.errors.update(dict.fromkeys(unfinished, reason))
    for name, ref in writes.items():
        try:
            outcome.reports[name], seconds = ray.get(ref)
            outcome.timings.busy_s["write"] += seconds
        except Exception as err:
            outcome.errors[name] = f"writing the shard failed: {one_line(err)}"
    outcome.timings.caption_filter_s = time.perf_counter() - start
    return outcome


def _write_shard(writer: ShardWriter, shard: str, chunks: list[Chunk]) -> tuple[dict[str, Any], float]:
    """The shard's report, and the seconds writing it took."""
    seconds: dict[str, float] = {}
    with stopwatch(seconds, "write"):
        report = writer.write(shard, scores_by_key(chunks))
    return report, seconds["write"]


class _StageActor:
    """Ray Data's callable-class protocol around a plain stage: models load once per actor.

    A chunk the stage raises on is split or retried (`chunk_retry`); each result says which actor,
    node and device scored it, for the manifest's record of where the work ran.
    """

    def __init__(self, stage: CapFiltStage) -> None:
        import ray

        stage.setup()
        self.stage = stage
        context = ray.get_runtime_context()
        self.placement = {
            "actor": context.get_actor_id() or "",
            "node": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "device": stage.device,
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "ready_at": time.time(),  # models loaded: the job's one-time start cost ends here
        }

    def __call__(self, row: Chunk) -> Chunk:
        scored = score_with_retry(self.stage, row, log=_print_flushed)
        return {**scored, **self.placement, "preprocess_s": row["preprocess_s"]}


def _print_flushed(line: str) -> None:
    print(line, flush=True)  # an actor's stdout reaches the driver's log (and `capfilt logs`)


def _actor_resources(spec: JobSpec, log: Log) -> Resources:
    import ray

    if ray.cluster_resources().get("GPU", 0) == 0:
        log("capfilt: no GPUs in the Ray cluster: CapFilt actors run on the CPU (float32)")
        return Resources(cpus=spec.resources.cpus_per_actor, gpus=0)
    return Resources(cpus=spec.resources.cpus_per_actor, gpus=spec.resources.gpus_per_actor)


def _actors_for(resources: Resources) -> int:
    """One actor per `gpus_per_actor` GPUs in the cluster; one when it has none."""
    import ray

    if resources.gpus == 0:
        return 1
    return max(1, int(ray.cluster_resources().get("GPU", 0) // resources.gpus))
