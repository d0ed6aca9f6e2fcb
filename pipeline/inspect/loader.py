"""Read a job's WebDataset shards as (image, caption) pairs for pretraining: what a training run imports.

    dataset = CapFiltDataset("OUT", policy="random_kept", transform=to_tensor, shuffle=1000)
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=8)
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for images, captions in loader: ...

The shards are split between ranks and DataLoader workers at shard level, so each kept sample is
seen exactly once per epoch across all of them. That only holds if every rank lists the shards in
the same order, so the shard order depends on (seed, epoch) and never on the rank. Everything
random (shard order, sample buffer, the `random_kept` choice) is derived from (seed, epoch), so an
epoch can be replayed.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from enum import StrEnum
from itertools import islice
from pathlib import Path
from typing import Any

import fsspec
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.core.storage import Location
from pipeline.curate.decide import SYNTHETIC, WEB, Candidate, ranked
from pipeline.spec.records import current_record

Record = dict[str, Any]
Shards = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+:")  # http:, s3:, pipe:, file:; two letters at least (not C:)
# Opened through fsspec (the store capfilt writes to, with the same credentials), not webdataset's
# gopen, which has no S3 or Azure handler and reads gs: through the gsutil command.
FSSPEC_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "file"})


class CaptionPolicy(StrEnum):
    """Which kept caption a sample is trained with."""

    BEST = "best"  # the best kept caption, `caption` (the tar's KEY.txt), or by `rank_by`
    RANDOM_KEPT = "random_kept"  # a fresh pick among the kept captions each epoch, as BLIP's loader does
    WEB_ONLY = "web_only"  # the web caption; samples whose web caption was filtered out are skipped
    SYNTHETIC_ONLY = "synthetic_only"  # the best kept synthetic caption; samples without one skipped


class CapFiltDataset(IterableDataset):
    """The kept samples of capfilt shards as (image, caption), or (image, caption, record).

    `shards`: a job's output dir (reads OUT/shards/*.tar, sorted), a dir of tars, one tar, a list of
    paths or URLs, or a string webdataset reads ("https://host/shards/{00000..00099}.tar", "pipe:...").
    An object-store URI (`s3://bucket/job`, `gs://…`, `az://…`, `file://…`) is a job's output, a
    prefix of tars or one tar, listed and opened through fsspec (credentials as for `capfilt run`);
    other URLs are passed to webdataset as they are. `transform` is applied to the PIL RGB image.
    `shuffle` > 0 shuffles the shard order each epoch and the samples in a buffer of that size (a
    buffer alone would only mix neighbouring shards, and shuffling shards costs nothing); 0 reads in
    shard and key order. `rank`/`world_size` default to torch.distributed when it is initialised,
    else the RANK/WORLD_SIZE environment variables, else 0/1; build the dataset after
    `init_process_group`. `with_record` adds the sample's full record (its KEY.json) as a third item.
    `rank_by` ("itm" or "itc") ranks the kept captions by that score for `best` and `synthetic_only`;
    None keeps the job's order (`filter.keep.by`).

    Ranks get unequal sample counts when there are few shards or they hold different numbers of kept
    samples (a rank gets whole shards). Under DDP that makes the short rank stop early and the others
    wait in all-reduce; use many more shards than ranks x workers, and cap the steps per epoch (or
    use `model.join()`). Call `set_epoch` before each epoch; with `persistent_workers=True` the
    DataLoader's workers keep the epoch they started with, so leave it off.
    """

    def __init__(
        self,
        shards: Shards,
        policy: CaptionPolicy | str = CaptionPolicy.BEST,
        transform: Callable[[Image.Image], Any] | None = None,
        shuffle: int = 0,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        with_record: bool = False,
        rank_by: str | None = None,
    ) -> None:
        super().__init__()
        if rank_by not in (None, "itm", "itc"):
            raise ValueError(f"rank_by must be 'itm', 'itc' or None (the job's order), got {rank_by!r}")
        self.rank_by = rank_by
        try:
            self.policy = CaptionPolicy(policy)
        except ValueError:
            choices = ", ".join(p.value for p in CaptionPolicy)
            raise ValueError(f"unknown caption policy {policy!r}; choose one of: {choices}") from None
        if shuffle < 0:
            raise ValueError(f"shuffle must be a buffer size >= 0 (0: no shuffling), got {shuffle}")
        self.shards = shard_list(shards)
        self.transform = transform
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = _node(rank, world_size)
        self.with_record = with_record
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shard order, sample order and `random_kept` picks come next."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch_seed = f"{self.seed}/{self.epoch}"
        pipeline = wds.DataPipeline(
            # The same order on every rank and worker (seeded by seed and epoch only), then each takes
            # its slice of it: the slices partition the shards.
            wds.SimpleShardList(self.shards, seed=f"{epoch_seed}/shards" if self.shuffle else None),
            lambda src: islice(islice(src, self.rank, None, self.world_size), worker, None, workers),
            _tar_samples,
            # rng=, not seed=: webdataset 0.2.86 (what OpenCLIP pins) has no seed=; later ones seed alike
            wds.shuffle(self.shuffle, rng=random.Random(f"{epoch_seed}/{self.rank}/{worker}"))
            if self.shuffle
            else None,
            self._pairs,
        )
        return iter(pipeline)

    def _pairs(self, samples: Iterator[dict[str, Any]]) -> Iterator[tuple[Any, ...]]:
        for sample in samples:
            record = current_record(json.loads(sample["json"]))  # a schema 1 shard's too
            caption = self.caption(record)
            if caption is None:
                continue
            image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
            image = self.transform(image) if self.transform is not None else image
            yield (image, caption, record) if self.with_record else (image, caption)

    def caption(self, record: Record) -> str | None:
        """The caption the policy gives this record in the current epoch; None: skip the sample."""
        kept = record["kept_captions"]
        if self.rank_by is not None:
            kept = _ranked(kept, self.rank_by, record["key"])
        if self.policy == CaptionPolicy.BEST:
            return kept[0]["text"] if self.rank_by is not None else record["caption"]
        if self.policy == CaptionPolicy.RANDOM_KEPT:
            # Seeded per sample, not per worker, so the pick does not depend on who reads the shard.
            return random.Random(f"{self.seed}/{self.epoch}/{record['key']}").choice(kept)["text"]
        source = WEB if self.policy == CaptionPolicy.WEB_ONLY else SYNTHETIC
        return next((c["text"] for c in kept if c["source"] == source), None)  # best first


def _ranked(kept: list[Record], by: str, key: str) -> list[Record]:
    """The kept captions best first by `by`, as the job ranks them (`decide.ranked`)."""
    try:
        order = ranked([Candidate(c["text"], c["source"], c["itm"], c.get("itc")) for c in kept], by)
    except ValueError:
        raise ValueError(
            f"sample {key}: its kept captions have no {by} score (a shard written before ITC)"
        ) from None
    return [{"text": c.text, "source": c.source, "itm": c.itm, "itc": c.itc} for c in order]


def shard_list(shards: Shards) -> list[str]:
    """The shard paths and URLs, with directories listed and local paths checked now, not mid-epoch."""
    if isinstance(shards, str | os.PathLike):
        shards = wds.shardlists.expand_urls(os.fspath(shards))  # brace patterns, "a.tar::b.tar"
    found = [tar for item in shards for tar in _expand(os.fspath(item))]
    if not found:
        raise ValueError("no shards given: the shard list is empty")
    return found


def _expand(item: str) -> list[str]:
    if _fsspec_url(item):
        return _expand_store(item)
    if _URL.match(item):
        return [item]
    path = Path(item)
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise FileNotFoundError(f"no such shard file or directory: {path}")
    folder = path / "shards" if (path / "shards").is_dir() else path
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no shards (*.tar) in {folder}: expected a job's output dir or a shards dir")
    return [str(t) for t in tars]


def _fsspec_url(url: str) -> bool:
    return bool(_URL.match(url)) and url.partition(":")[0].lower() in FSSPEC_SCHEMES


def _expand_store(uri: str) -> list[str]:
    """An object-store tar as it is; a job's output prefix or a prefix of tars, listed now."""
    if uri.endswith(".tar"):
        return [uri]
    location = Location.of(uri)
    folder = location / "shards" if (location / "shards").is_dir() else location
    tars = folder.glob("*.tar")
    if not tars:
        raise FileNotFoundError(f"no shards (*.tar) in {folder}: expected a job's output or a shards prefix")
    return [t.uri for t in tars]


def _tar_samples(urls: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """webdataset's `tarfile_to_samples`, with object-store URLs opened through fsspec."""
    return wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(_open(urls)))


def _open(urls: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for sample in urls:
        url = sample["url"]
        stream = fsspec.open(url, "rb").open() if _fsspec_url(url) else wds.gopen(url)
        try:
            yield {**sample, "stream": stream}
        finally:
            stream.close()


def _node(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            default = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            default = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = default[0] if rank is None else rank
        world_size = default[1] if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size
