"""pipeline.inspect.loader read back against the job's own Parquet: what a pretraining run gets from the shards.

The truth is the per-shard Parquet (one row per input row, written by the same writer as the tars);
the loader only ever reads the tars. Ranks are simulated with explicit rank/world_size, the workers
are a real DataLoader's.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.inspect.loader import CapFiltDataset, CaptionPolicy, shard_list

EXAMPLE = Path(__file__).parents[1] / "docs" / "examples" / "pretrain_from_shards.py"


def kept_rows(job) -> dict[str, dict[str, Any]]:
    rows = (row for path in job.layout.shard_parquets() for row in pq.read_table(path).to_pylist())
    return {row["key"]: row for row in rows if row["status"] == "kept"}


def image_size(image: Image.Image) -> tuple[int, int]:
    return image.size  # a cheap transform: the tests about keys need no pixels in the worker queues


def captions_by_key(dataset: CapFiltDataset) -> dict[str, str]:
    found = {record["key"]: caption for _, caption, record in dataset}
    return found


def keys_from_all_ranks(root: Path, world_size: int, workers: int, epoch: int, **options: Any) -> list[tuple]:
    """(key, caption) of every sample every rank's DataLoader yields in `epoch`, in the order read."""
    seen = []
    for rank in range(world_size):
        dataset = CapFiltDataset(
            root, rank=rank, world_size=world_size, with_record=True, transform=image_size, **options
        )
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers)
        seen += [(record["key"], caption) for _, caption, record in loader]
    return seen


@pytest.mark.parametrize("shuffle", [0, 8], ids=["in-order", "shuffled"])
def test_two_ranks_of_two_workers_see_each_kept_sample_once_per_epoch(curated_job, shuffle):
    kept = kept_rows(curated_job)
    assert len(curated_job.layout.shard_parquets()) >= 4  # more shards than ranks x workers: none idle
    orders = []
    for epoch in (0, 1):
        seen = [
            key
            for key, _ in keys_from_all_ranks(curated_job.layout.root, 2, 2, epoch, shuffle=shuffle, seed=1)
        ]
        assert Counter(seen) == Counter(kept.keys()), f"epoch {epoch}: not a partition of the kept samples"
        orders.append(seen)
    if shuffle:
        assert orders[0] != orders[1], "shuffling gave the same order in two epochs"
        assert orders[0] != sorted(orders[0])
    else:
        assert orders[0] == orders[1]


def test_best_is_the_training_caption(curated_job):
    kept = kept_rows(curated_job)
    got = captions_by_key(CapFiltDataset(curated_job.layout.root, policy="best", with_record=True))
    assert got == {key: row["caption"] for key, row in kept.items()}


@pytest.mark.parametrize("policy, source", [("web_only", "web"), ("synthetic_only", "synthetic")])
def test_source_policies_yield_only_samples_with_that_source_kept(curated_job, policy, source):
    kept = kept_rows(curated_job)
    expected = {
        key: next(c["text"] for c in row["kept_captions"] if c["source"] == source)  # best of that source
        for key, row in kept.items()
        if any(c["source"] == source for c in row["kept_captions"])
    }
    assert expected, f"the fixture should have kept samples with a {source} caption"
    got = captions_by_key(CapFiltDataset(curated_job.layout.root, policy=policy, with_record=True))
    assert got == expected
    if source == "web":  # some kept samples lost their web caption to the filter: they are skipped
        assert len(got) < len(kept)
        assert all(got[key] == kept[key]["web_caption"] for key in got)


def test_the_policy_gives_no_caption_to_a_sample_without_one_of_its_source(tmp_path):
    tar = tmp_path / "a.tar"
    tar.touch()
    record = {
        "key": "k",
        "caption": "a web one",
        "kept_captions": [{"text": "a web one", "source": "web", "itm": 0.9}],
    }
    assert CapFiltDataset(tar, policy="synthetic_only").caption(record) is None
    assert CapFiltDataset(tar, policy="web_only").caption(record) == "a web one"


def test_rank_by_ranks_the_kept_captions_by_either_score(tmp_path):
    tar = tmp_path / "a.tar"
    tar.touch()
    record = {
        "key": "k",
        "caption": "a web one",
        "kept_captions": [
            {"text": "a web one", "source": "web", "itm": 0.9, "itc": 0.1},
            {"text": "a synthetic one", "source": "synthetic", "itm": 0.8, "itc": 0.4},
            {"text": "another", "source": "synthetic", "itm": 0.7, "itc": 0.5},
        ],
    }
    assert CapFiltDataset(tar).caption(record) == "a web one"  # the job's order
    assert CapFiltDataset(tar, rank_by="itm").caption(record) == "a web one"
    assert CapFiltDataset(tar, rank_by="itc").caption(record) == "another"
    assert CapFiltDataset(tar, policy="synthetic_only").caption(record) == "a synthetic one"
    assert CapFiltDataset(tar, policy="synthetic_only", rank_by="itc").caption(record) == "another"
    old = {**record, "kept_captions": [{"text": "a web one", "source": "web", "itm": 0.9}]}
    with pytest.raises(ValueError, match="sample k: its kept captions have no itc score"):
        CapFiltDataset(tar, rank_by="itc").caption(old)
    with pytest.raises(ValueError, match="rank_by must be"):
        CapFiltDataset(tar, rank_by="clip")


def test_random_kept_picks_among_kept_captions_anew_each_epoch(curated_job):
    kept = kept_rows(curated_job)
    several = {key for key, row in kept.items() if len(row["kept_captions"]) >= 2}
    assert len(several) >= 10
    dataset = CapFiltDataset(
        curated_job.layout.root, policy=CaptionPolicy.RANDOM_KEPT, seed=3, with_record=True
    )
    epochs = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        epochs.append(captions_by_key(dataset))
    for picks in epochs:
        assert picks.keys() == kept.keys()
        assert all(text in {c["text"] for c in kept[key]["kept_captions"]} for key, text in picks.items())
    varied = [key for key in several if len({picks[key] for picks in epochs}) >= 2]
    assert len(varied) >= 0.8 * len(several), f"only {len(varied)} of {len(several)} samples changed caption"
    not_best = [key for key in several if epochs[0][key] != kept[key]["caption"]]
    assert not_best, "random_kept never picked anything but the best caption"
    dataset.set_epoch(0)
    assert captions_by_key(dataset) == epochs[0], "the same (seed, epoch) must give the same picks"


def test_random_kept_does_not_depend_on_the_split(curated_job):
    root = curated_job.layout.root
    alone = CapFiltDataset(root, policy="random_kept", seed=3, with_record=True, transform=image_size)
    alone.set_epoch(1)
    split = keys_from_all_ranks(root, 2, 2, epoch=1, policy="random_kept", seed=3, shuffle=8)
    assert dict(split) == captions_by_key(alone)


def test_images_are_rgb_pil_and_the_transform_is_applied(curated_job):
    kept = kept_rows(curated_job)
    for image, _, record in CapFiltDataset(curated_job.layout.root, with_record=True):
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert image.size == (kept[record["key"]]["width"], kept[record["key"]]["height"])
    transformed = CapFiltDataset(curated_job.layout.root, transform=lambda im: ("seen", im.mode, im.size))
    assert {image[:2] for image, _ in transformed} == {("seen", "RGB")}


def test_shard_sources(curated_job):
    tars = [str(p) for p in sorted(curated_job.layout.shards.glob("*.tar"))]
    assert shard_list(curated_job.layout.root) == tars  # output dir -> its shards/, sorted
    assert shard_list(curated_job.layout.shards) == tars
    assert shard_list(tars[::-1]) == tars[::-1]  # an explicit list keeps its order
    # a URL is passed to webdataset as it is: expanded here, never fetched
    urls = shard_list("http://127.0.0.1:9/shards/{00000..00002}.tar")
    assert urls == [f"http://127.0.0.1:9/shards/0000{i}.tar" for i in range(3)]
    # a pipe: URL is read by webdataset itself
    piped = CapFiltDataset([f"pipe:cat {tar}" for tar in tars], transform=image_size)
    assert len(list(piped)) == len(kept_rows(curated_job))


def test_bad_input_says_what_is_wrong(tmp_path):
    (tmp_path / "out" / "shards").mkdir(parents=True)
    cases = [
        (tmp_path / "out", FileNotFoundError, str(tmp_path / "out" / "shards")),
        (tmp_path / "missing", FileNotFoundError, str(tmp_path / "missing")),
        ([], ValueError, "shard list is empty"),
    ]
    for shards, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            CapFiltDataset(shards)
    tar = tmp_path / "a.tar"
    tar.touch()
    with pytest.raises(ValueError, match="unknown caption policy 'longest'"):
        CapFiltDataset(tar, policy="longest")
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, world_size=2\)"):
        CapFiltDataset(tar, rank=2, world_size=2)


def test_rank_defaults_to_the_environment(tmp_path, monkeypatch):
    tar = tmp_path / "a.tar"
    tar.touch()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    dataset = CapFiltDataset(tar)
    assert (dataset.rank, dataset.world_size) == (1, 3)


@pytest.mark.slow
def test_docs_example_trains_on_the_shards(curated_job, capsys):
    spec = importlib.util.spec_from_file_location("pretrain_from_shards", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.main([str(curated_job.layout.root), "--steps", "4", "--batch-size", "16"])
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert capsys.readouterr().out.count("loss") == 4
