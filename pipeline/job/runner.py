"""Runs a job: wires the stages onto Ray. The only module that knows Ray.

    prepare the list (a driver thread, shard by shard) beside one Ray Data stream, shard by shard:
    wait for the input shard's prepared rows -> download it (img2dataset's per-shard downloader,
    a Ray task with a deadline) -> read its chunks -> preprocess (CPU tasks)
    -> CapFilt actors (one per GPU) -> results back to the driver, grouped by shard
    -> dedup, decided on the driver in input order (`dedup.InInputOrder`)
    -> a Ray task writes (commits) each shard as soon as it is decided.

Shard N+1 downloads while shard N is scored and shard N-1 is written. At most
`resources.shards_in_flight` shards are between "download started" and "committed" at any moment
(`_Slots`): a slow model holds the downloads back, so neither the disk nor the object store grows
with the list. Slots are taken in input order: a shard waiting for the shards before it to be decided
holds one, and every shard before it then holds one too or is done, so the wait always ends. A
download attempt that fails or outlives its deadline is killed and tried again, up to
`resources.download_attempts` times; then its shard is reported failed and the rest go on.

Results carry captions and scores only; the writer takes the image bytes from the raw shard, so
images never pass through the driver. Shards already written by the same spec are skipped and raw
shards already downloaded are not fetched again, so a re-run resumes wherever the last one stopped.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
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
from pipeline.curate.chunks import PASSED_ON, Chunk, ChunkReader
from pipeline.curate.dedup import DuplicateIndex, InInputOrder
from pipeline.curate.model_check import check_itm_tokenizer, check_models, embedding_size
from pipeline.curate.preprocess import PreprocessStage
from pipeline.ingest.download import ShardDownload
from pipeline.ingest.prepared_list import PreparedList, PrepareFailed
from pipeline.ingest.url_list import ListPreparation, check_columns, refuse_other_downloads
from pipeline.ingest.urlpolicy import NetworkPolicy
from pipeline.job.console import Console, captured
from pipeline.job.output_guard import claim_output
from pipeline.job.progress import JobProgress
from pipeline.output.manifest import build_manifest, check_accounting, write_manifest
from pipeline.output.shard_writer import ShardWriter, scores_by_key, stored_kept_images
from pipeline.spec.config import JobSpec
from pipeline.spec.layout import OutputLayout, shard_name

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
    console: Console | None = None,
) -> JobResult:
    """Run (or resume) a job to the end and write its manifest. (`stage_type` is the seam where the
    fault tests put a stage that fails on purpose.) With a `console` (the CLI's), capfilt's lines
    and a live progress display go to it, and the rest of what the run prints to a log file under
    the output; without one, every line goes to `log`.

    Before anything is written: the URL list's columns and the model directories are checked, and
    the output is claimed (`output_guard`): refused when it holds what is not capfilt's, emptied
    first under `overwrite`, and locked against another run until the manifest is written."""
    spec = spec.with_absolute_paths()
    layout = OutputLayout(spec.output.path)
    check_columns(spec.input)
    check_models(spec)
    if not overwrite:  # (under `overwrite` they are deleted instead, once the output is claimed)
        _refuse_other_downloads(spec, layout)
    preprocess = PreprocessStage.for_model(spec.captioner.model)  # a hub name resolves, or fails now
    check_itm_tokenizer(spec)  # [ENC] present, when the filter reads it
    reads = [("input.url_list", spec.input.url_list), ("captioner.model", spec.captioner.model),
             ("filter.model", spec.filter.model)]  # fmt: skip
    say = console.say if console else log
    with claim_output(layout.root, overwrite, log=say, reads=reads):
        voice = _Voice(say, print if console else log, console)
        return _run_claimed(spec, layout, address, voice, stage_type, preprocess)


def _refuse_other_downloads(spec: JobSpec, layout: OutputLayout) -> None:
    """Downloads made with other settings, refused before the models' processors load (seconds)
    rather than after; `ListPreparation` checks again under the output's lock."""
    downloaded = bool(layout.downloaded_shards())
    fingerprint, settings = spec.download_fingerprint(), spec.download_settings()
    refuse_other_downloads(spec.input, PreparedList(layout.prepared_input), fingerprint, downloaded, settings)


@dataclass(frozen=True)
class _Voice:
    """Where the runner's lines go: `say` what a person watching needs (the console), `detail` what
    explains a run afterwards (with a console, the log file; `--verbose` shows both)."""

    say: Log
    detail: Log
    console: Console | None

    def show(self, progress: JobProgress) -> None:
        if self.console is not None:
            self.console.show(progress)

    def finish(self, progress: JobProgress) -> None:
        if self.console is not None:
            self.console.finish(progress)


def _run_claimed(spec: JobSpec, layout: OutputLayout, address: str | None, voice: _Voice,
                 stage_type: type[CapFiltStage], preprocess: PreprocessStage) -> JobResult:  # fmt: skip
    layout.root.mkdir()
    fingerprint = spec.fingerprint()
    downloaded = set(layout.downloaded_shards())  # one listing of downloads/ (on S3: requests)
    preparation = ListPreparation(  # under the output's lock: it may clear an earlier run's half list
        spec.input,
        NetworkPolicy.of(spec.download),
        PreparedList(layout.prepared_input),
        spec.output.shard_size,
        spec.download_fingerprint(),
        downloaded=bool(downloaded),
        settings=spec.download_settings(),
    )
    with captured(voice.console, layout, fingerprint), ray_session(address):
        rows = preparation.rows
        names = [shard_name(i) for i in range(math.ceil(rows / spec.output.shard_size))]
        reports = layout.finished_reports(names, fingerprint)
        outcome = _Outcome()
        progress = JobProgress(len(names), len(reports), rows)

        def manifest(running: bool = True) -> dict[str, Any]:
            done = {**reports, **outcome.reports.copy()}  # copies: the ticker thread reads them too
            actors = list(outcome.actors.values())
            timings, figures = outcome.timings.as_dict(), progress.figures(running)
            errors = outcome.errors.copy()
            return build_manifest(
                spec, rows, names, done, errors, actors=actors, timings=timings, progress=figures
            )

        # Written now, so that `capfilt inspect` can follow a job that is running or died half way.
        write_manifest(layout, manifest())
        pending = [n for n in names if n not in reports]
        on_disk = sum(n in downloaded for n in pending)
        voice.say(
            f"capfilt: {rows} input rows in {len(names)} shards: {len(reports)} already done, "
            f"{len(pending)} to caption and filter ({on_disk} of them downloaded already)"
        )
        watch = _Watch(progress, voice, lambda: write_manifest(layout, manifest()))
        with _preparing(preparation, outcome) as prepare_failed:
            if pending:
                _stream(spec, layout, pending, sorted(reports), voice, stage_type, preprocess, outcome, watch)
        voice.finish(progress)
        voice.detail(outcome.timings.summary())
    final = manifest(running=False)
    write_manifest(layout, final)
    if prepare_failed:
        raise prepare_failed[0]  # the shards it held back are failed in the manifest
    check_accounting(final)
    return JobResult(final, layout)


@contextlib.contextmanager
def _preparing(preparation: ListPreparation, outcome: _Outcome) -> Iterator[list[Exception]]:
    """Prepare the list on a driver thread while the block streams it: the first shards download
    while later ones are still being prepared. Yields the list that gets preparing's error, if any.

    A stream that ended with failed shards stops preparing (a stage that fails every chunk must not
    wait out the rest of a billion-row list); one that finished waits for the list's record."""
    failed: list[Exception] = []

    def write() -> None:
        try:
            preparation.write()
        except Exception as err:
            failed.append(err)

    thread = threading.Thread(target=write, name="capfilt-prepare", daemon=True)
    thread.start()
    try:
        yield failed
    except BaseException:
        preparation.stop()
        raise
    finally:
        if outcome.errors:
            preparation.stop()
        thread.join()


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


def _stream(
    spec: JobSpec,
    layout: OutputLayout,
    shards: list[str],
    done: list[str],
    voice: _Voice,
    stage_type: type[CapFiltStage],
    preprocess: PreprocessStage,
    outcome: _Outcome,
    watch: _Watch,
) -> None:
    """Download, caption/filter and write `shards` as one stream (see the module's docstring), into
    `outcome`, told to `watch` as it goes. The kept images of the shards `done` before are the
    originals dedup starts from."""
    import ray

    # One clock for the whole phase: the moments in it come from other processes (`time.time()` of
    # the tasks), and a monotonic clock beside them disagrees by as much as the wall clock is stepped
    # (5 s once, in CI: the first commit came "after" the phase's end).
    started_at = time.time()
    stage = stage_type(spec.captioner, spec.filter, _actor_resources(spec, voice.say))
    actors = spec.resources.actors or _actors_for(stage.resources)
    plan = _StreamPlan.of(spec, actors, stage.resources)
    each = f"{stage.resources.gpus} GPU and {stage.resources.cpus} CPU each"
    voice.detail(f"capfilt: {actors} CapFilt actor(s), {each}; {plan.describe()}")
    slots = _Slots.on_this_node(plan.in_flight, shards)
    writer = ShardWriter.of(spec, layout, embedding_size(spec))
    write = ray.remote(num_cpus=writer.resources.cpus)(_write_shard)
    writes = _Writes(outcome, watch.progress, started_at)
    index = DuplicateIndex(spec.filter.dedup, writer.embedding_size)
    if index.active:
        for name in done:
            index.add_originals(stored_kept_images(layout.shard_parquet(name)))
    in_order = InInputOrder(shards, index)
    complete: set[str] = set()  # every chunk arrived; written once decided
    keep = spec.output.keep_downloads
    download = _DownloadWithDeadline(ShardDownload(spec, layout), slots, plan)
    ds = (
        ray.data.from_items([{"shard": name} for name in shards], override_num_blocks=len(shards))
        .map(download, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=plan.download_tasks))
        .flat_map(ChunkReader(layout, spec.captioner.batch_size), num_cpus=0.25)
        # Ray Data fuses preprocessing into the actor only when their resources are equal (a CPU-only
        # run, where that costs nothing); with GPUs it stays in CPU tasks and the GPU never decodes.
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

    def commit(decided: list[tuple[str, list[Chunk], dict[str, str]]]) -> None:
        for name, chunks, duplicates in decided:
            writes.add(name, write.remote(writer, name, chunks, duplicates, slots, keep))

    def fail(name: str, reason: str) -> None:
        outcome.errors[name] = reason
        watch.progress.failed()
        voice.say(f"capfilt: shard {name} failed: {reason}")
        arrived.pop(name, None)
        slots.release.remote(name)
        commit(in_order.failed(name))

    def finish(name: str, chunks: list[Chunk]) -> None:
        complete.add(name)
        commit(in_order.arrived(name, writer.kept_images(scores_by_key(chunks)), chunks))

    def shard_rows(name: str) -> int:
        size = spec.output.shard_size
        return min(size, watch.progress.input_rows - int(name) * size)

    with watch.ticking(writes.collect):
        stream_error = ""
        try:
            for row in ds.iter_rows():
                chunk, name = dict(row), row["shard"]
                if name in outcome.errors or name in complete or chunk["chunk"] in arrived[name]:
                    continue
                outcome.timings.add_download(chunk, chunk["downloaded_at"] - started_at)
                if chunk["download_error"]:
                    fail(name, chunk["download_error"])
                    continue
                if chunk["chunk"] == 0:
                    watch.progress.downloaded(shard_rows(name))
                if chunk["chunks"] == 0:  # nothing downloaded to score: the shard is all other fates
                    finish(name, [])
                    continue
                outcome.count(chunk)
                if chunk["error"]:
                    fail(name, f"caption/filter failed: {chunk['error']}")
                    continue
                watch.progress.scored(outcome.timings.add_chunk(chunk, chunk["ready_at"] - started_at))
                arrived[name][chunk["chunk"]] = chunk
                if len(arrived[name]) == chunk["chunks"]:
                    finish(name, list(arrived.pop(name).values()))
        except Exception as err:  # the stream failed: committed shards stay, the rest are reported
            stream_error = f"caption/filter stage failed: {one_line(err)}"
            voice.say(f"capfilt: {stream_error}")
        unfinished = [name for name in shards if name not in complete and name not in outcome.errors]
        reason = stream_error or "the stream ended before all of the shard's chunks arrived"
        if unfinished and not stream_error:
            voice.say(f"capfilt: {len(unfinished)} shard(s) failed: {reason}")
        for name in unfinished:  # in input order: a complete shard waiting for one of them is then written
            outcome.errors[name] = reason
            watch.progress.failed()
            commit(in_order.failed(name))
        writes.collect_all()
    outcome.timings.shards_in_flight = {"limit": plan.in_flight, "peak": ray.get(slots.peak.remote())}
    (layout.downloads / "_tmp").rmtree()  # the downloads' staged inputs, as img2dataset leaves it
    outcome.timings.caption_filter_s = time.time() - started_at


class _Writes:
    """The shards' write tasks, collected as they finish, into the outcome and the progress. Both the
    stream's loop and the ticker collect (hence the lock): a commit shows while the loop waits."""

    def __init__(self, outcome: _Outcome, progress: JobProgress, started_at: float) -> None:
        self._outcome, self._progress, self._started_at = outcome, progress, started_at
        self._pending: dict[str, Any] = {}
        self._lock = threading.Lock()

    def add(self, shard: str, ref: Any) -> None:
        with self._lock:
            self._pending[shard] = ref

    def collect(self, timeout: float = 0.0) -> None:
        """The writes finished by now (or within `timeout` seconds)."""
        import ray

        with self._lock:
            if not self._pending:
                return
            refs = list(self._pending.values())
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
            for shard, ref in list(self._pending.items()):
                if ref in ready:
                    del self._pending[shard]
                    self._collected(shard, ref)

    def collect_all(self) -> None:
        while self._pending:
            self.collect(timeout=1.0)

    def _collected(self, shard: str, ref: Any) -> None:
        import ray

        try:
            report, seconds, committed_at = ray.get(ref)
        except Exception as err:
            self._outcome.errors[shard] = f"writing the shard failed: {one_line(err)}"
            self._progress.failed()
            return
        self._outcome.reports[shard] = report
        self._outcome.timings.add_commit(seconds, committed_at - self._started_at)
        self._progress.committed(report)


class _Watch:
    """The running job as seen from outside: the console's progress display, redrawn each second,
    and the manifest with its `progress`, rewritten every `MANIFEST_EVERY_S` (what `capfilt status`
    and `capfilt inspect` read while the job runs)."""

    MANIFEST_EVERY_S = 10.0

    def __init__(self, progress: JobProgress, voice: _Voice, write_manifest: Callable[[], None]) -> None:
        self.progress, self._voice, self._write_manifest = progress, voice, write_manifest
        self._written = time.monotonic()

    @contextlib.contextmanager
    def ticking(self, *also: Callable[[], None]) -> Iterator[None]:
        """For the block, a driver thread ticks each second: `also`, then the display and manifest."""
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(1.0):
                try:
                    for action in also:
                        action()
                    self._voice.show(self.progress)
                    if time.monotonic() - self._written >= self.MANIFEST_EVERY_S:
                        self._written = time.monotonic()
                        self._write_manifest()
                except Exception as err:  # a full disk, a lost object store: the stream says why
                    self._voice.detail(f"capfilt: progress not updated: {one_line(err)}")

        thread = threading.Thread(target=tick, name="capfilt-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


@dataclass(frozen=True)
class _StreamPlan:
    """How many shards download at once, how many may be in flight, and the download deadline."""

    download_tasks: int
    in_flight: int
    deadline_s: float
    attempts: int

    @classmethod
    def of(cls, spec: JobSpec, actors: int, actor: Resources) -> _StreamPlan:
        """Unset values follow the cluster: downloads use the CPUs the actors leave (at least one),
        and two shards per actor wait for the models beside the ones downloading."""
        import ray

        r = spec.resources
        spare = int(ray.cluster_resources().get("CPU", 1) - actors * actor.cpus)
        tasks = r.download_tasks or max(1, spare)
        return cls(
            download_tasks=tasks,
            in_flight=r.shards_in_flight or tasks + 2 * actors,
            deadline_s=r.download_deadline_s or default_download_deadline(spec),
            attempts=r.download_attempts,
        )

    def describe(self) -> str:
        return (
            f"{self.download_tasks} shard(s) downloading at once, at most {self.in_flight} in flight, "
            f"each download given {self.deadline_s:g} s and {self.attempts} attempt(s)"
        )


def default_download_deadline(spec: JobSpec) -> float:
    """Twice the time a shard takes when every request of it times out, plus a minute: a download
    past it is hung, not slow."""
    d = spec.download
    rounds = math.ceil(spec.output.shard_size / d.thread_count) * (d.retries + 1)
    return 2 * rounds * d.timeout + 60


class _DownloadWithDeadline:
    """Ray Data's callable around `ShardDownload`: takes a slot (`_Slots`), then runs each attempt as
    its own Ray task, killed (`ray.cancel(force=True)`) when it outlives the deadline. Returns the
    shard with `download_error` "" once it is on disk, or the last attempt's reason."""

    def __init__(self, download: ShardDownload, slots: Any, plan: _StreamPlan) -> None:
        self.download, self.slots, self.plan = download, slots, plan

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        import ray

        shard = row["shard"]
        result = {"shard": shard, "download_error": "", "download_s": 0.0, "downloaded_at": 0.0}
        on_disk = self.download.done(shard)  # nothing else downloads this shard: the answer holds
        if not on_disk:
            try:  # before taking a slot: a shard not yet prepared holds no place in flight
                self.download.wait_for_input(shard)
            except PrepareFailed as err:
                ray.get(self.slots.pass_turn.remote(shard))  # it never takes one: the next may
                return {**result, "download_error": str(err), "downloaded_at": time.time()}
        ray.get(self.slots.acquire.remote(shard))
        begun = time.perf_counter()
        if not on_disk:
            attempt_task = _attempt_task(self.download.resources.cpus)
            reason = ""
            for attempt in range(1, self.plan.attempts + 1):
                ref = attempt_task.remote(self.download, shard)
                ready, _ = ray.wait([ref], timeout=self.plan.deadline_s)
                if ready:
                    try:
                        ray.get(ref)
                        break
                    except Exception as err:
                        reason = one_line(getattr(err, "cause", None) or err, 300)
                else:
                    ray.cancel(ref, force=True)
                    reason = f"not done after its {self.plan.deadline_s:g} s deadline"
                tried = f"download attempt {attempt} of {self.plan.attempts}"
                _print_flushed(f"capfilt: shard {shard}: {tried} failed: {reason}")
            else:
                result["download_error"] = f"download failed {self.plan.attempts} times; the last: {reason}"
        result["download_s"] = time.perf_counter() - begun
        result["downloaded_at"] = time.time()
        return result


@functools.cache
def _attempt_task(cpus: float) -> Any:
    """The Ray task of one download attempt, made once per worker (not once per shard); never retried
    by Ray, since the deadline loop decides."""
    import ray

    return ray.remote(num_cpus=cpus, max_retries=0)(_download_attempt)


def _download_attempt(download: ShardDownload, shard: str) -> None:
    download(shard)


class _Slots:
    """The bound on shards in flight: a shard takes a slot before its download starts and gives it
    back once it is committed or failed. Taking and giving back are idempotent per shard, so a
    download task that Ray runs again, or a failure reported twice, counts once.

    Shards take their first slot in input order (`order`), so the shards holding slots are always
    the earliest ones not yet committed: a shard that waits for those before it to be decided
    (dedup) never waits for one that cannot get a slot."""

    @classmethod
    def on_this_node(cls, limit: int, order: list[str]) -> Any:
        """The actor, pinned to the driver's node: placed anywhere, it may land on a worker node,
        and a lost worker node would then take the whole job with it (it did, in the node-loss
        test), where losing the driver's node ends the job anyway."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        return ray.remote(num_cpus=0, scheduling_strategy=here)(cls).remote(limit, order)

    def __init__(self, limit: int, order: list[str]) -> None:
        import asyncio

        self._limit = limit
        self._order = order
        self._next = 0  # the first shard in `order` that has not had its turn
        self._turned: set[str] = set()
        self._held: set[str] = set()
        self._peak = 0
        self._changed = asyncio.Condition()

    async def acquire(self, shard: str) -> None:
        async with self._changed:
            if shard in self._held:
                return
            again = shard in self._turned  # a task Ray ran again: its turn has passed, no wait for it
            await self._changed.wait_for(lambda: self._room() and (again or self._turn(shard)))
            self._held.add(shard)
            self._peak = max(self._peak, len(self._held))
            self._turn_taken(shard)

    async def pass_turn(self, shard: str) -> None:
        """A shard that will not take a slot (its input failed) lets the next take theirs."""
        async with self._changed:
            self._turn_taken(shard)

    async def release(self, shard: str) -> None:
        async with self._changed:
            if shard in self._held:
                self._held.remove(shard)
                self._changed.notify_all()

    def _room(self) -> bool:
        return len(self._held) < self._limit

    def _turn(self, shard: str) -> bool:
        return self._next < len(self._order) and self._order[self._next] == shard

    def _turn_taken(self, shard: str) -> None:
        self._turned.add(shard)
        while self._next < len(self._order) and self._order[self._next] in self._turned:
            self._next += 1
        self._changed.notify_all()

    async def peak(self) -> int:
        return self._peak


def _write_shard(
    writer: ShardWriter,
    shard: str,
    chunks: list[Chunk],
    duplicates: dict[str, str],
    slots: Any,
    keep_downloads: bool,
) -> tuple[dict[str, Any], float, float]:
    """Commit the shard with dedup's decision (deleting its raw download after, unless kept) and give
    its slot back: its report, the seconds writing took, and when it was committed."""
    import ray

    seconds: dict[str, float] = {}
    try:
        with stopwatch(seconds, "write"):
            report = writer.write(shard, scores_by_key(chunks), duplicates)
            if not keep_downloads:
                for raw in writer.layout.raw_images_and_rows(shard):
                    raw.unlink(missing_ok=True)
    finally:
        ray.get(slots.release.remote(shard))
    return report, seconds["write"], time.time()


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
        return {**scored, **self.placement, **{k: row[k] for k in PASSED_ON}}


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
