"""Split-and-retry of a chunk the CapFilt stage raises on, with the real stage on tiny BLIP models.

A CUDA out-of-memory error cannot happen on this machine, so the stage below raises one the way
torch does when a batch is larger than what "fits"; everything else is the real model code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.core.resources import Resources
from pipeline.curate.capfilt_stage import CapFiltStage
from pipeline.curate.chunk_retry import join, score_with_retry, split
from pipeline.spec.config import CaptionerSpec, FilterSpec
from tests.test_capfilt_stage import _chunk


class OutOfMemoryAbove(CapFiltStage):
    """Raises like torch's allocator on more than `fits` images; on key `poison`, raises another
    error `poison_calls` times (forever by default)."""

    def __init__(self, fits: int, poison: str | None = None, poison_calls: int = 10**9, **specs) -> None:
        super().__init__(**specs)
        self.fits, self.poison, self.poison_calls, self.calls = fits, poison, poison_calls, []

    def __call__(self, chunk):
        self.calls.append(list(chunk["keys"]))
        if len(chunk["keys"]) > self.fits:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.poison in chunk["keys"] and self.poison_calls > 0:
            self.poison_calls -= 1
            raise ValueError(f"cannot score {self.poison}")
        return super().__call__(chunk)


@pytest.fixture(scope="module")
def specs(tiny_models):
    return {
        "captioner": CaptionerSpec(model=str(tiny_models.captioner), num_captions=2, max_length=10),
        "filter": FilterSpec(model=str(tiny_models.itm), batch_size=8),
        "resources": Resources(),
    }


def _stage(specs, **kwargs) -> OutOfMemoryAbove:
    stage = OutOfMemoryAbove(**kwargs, **specs)
    stage.setup()
    return stage


def test_a_chunk_too_large_is_split_until_it_fits_and_every_row_is_scored(tiny_models, specs):
    stage, lines = _stage(specs, fits=2), []
    chunk = _chunk(tiny_models, 7)
    result = score_with_retry(stage, chunk, lines.append)
    assert result["error"] == ""
    assert result["keys"] == chunk["keys"]
    assert result["shard"] == "00000" and result["chunk"] == 0 and "part" not in result
    # 7 -> 4 + 3 -> (2 + 2) + (2 + 1): every key scored exactly once, in order, in parts that fit.
    scored = [c for c in stage.calls if len(c) <= 2]
    assert [k for c in scored for k in c] == chunk["keys"]
    assert all(not math.isnan(s) for row in result["synthetic_itm"] for s in row)
    assert all(not math.isnan(s) for s in result["web_itm"][:-1])  # the last web caption is blank
    assert all(len(row) == 2 and all(row) for row in result["synthetic_captions"])
    assert len(lines) == 3 and all("ran out of memory; retrying it as two halves" in line for line in lines)
    assert lines[1].startswith("capfilt: shard 00000 chunk 0.0 (4 images)")


def test_the_halves_are_scored_as_the_same_images_on_their_own(tiny_models, specs):
    """Splitting changes which images share a batch, not what each is scored against: a web caption's
    ITM score does not depend on sampling, so it equals the unsplit run's."""
    chunk = _chunk(tiny_models, 5)
    whole = score_with_retry(_stage(specs, fits=99), chunk, print)
    halves = score_with_retry(_stage(specs, fits=2), chunk, print)
    assert np.allclose(whole["web_itm"][:-1], halves["web_itm"][:-1], atol=1e-5)
    again = score_with_retry(_stage(specs, fits=2), chunk, print)
    assert again["synthetic_captions"] == halves["synthetic_captions"]  # same split, same seeds


def test_another_error_is_tried_once_more_whole_then_fails_the_chunk(tiny_models, specs):
    stage, lines = _stage(specs, fits=99, poison="0003"), []
    chunk = _chunk(tiny_models, 6)
    result = score_with_retry(stage, chunk, lines.append)
    assert stage.calls == [chunk["keys"], chunk["keys"]]  # not split: splitting cannot help it
    assert (
        result["error"] == "shard 00000 chunk 0 (keys 0000..0005) failed twice: ValueError: cannot score 0003"
    )
    assert result["keys"] == chunk["keys"] and all(math.isnan(s) for s in result["web_itm"])
    assert [line.split("failed ")[1][:12] for line in lines] == ["(attempt 1 o", "(attempt 2 o"]


def test_a_transient_error_passes_on_the_second_try(tiny_models, specs):
    stage = _stage(specs, fits=99, poison="0001", poison_calls=1)
    result = score_with_retry(stage, _chunk(tiny_models, 4), print)
    assert result["error"] == "" and len(stage.calls) == 2
    assert not any(math.isnan(s) for s in result["web_itm"][:-1])


def test_one_image_that_still_runs_out_of_memory_fails_its_chunk(tiny_models, specs):
    stage = _stage(specs, fits=0)
    result = score_with_retry(stage, _chunk(tiny_models, 2), print)
    assert result["error"].startswith(
        "shard 00000 chunk 0.0 (keys 0000) failed twice: RuntimeError: CUDA out of memory"
    )
    assert len(result["keys"]) == 2 and len(stage.calls) == 1 + 2 + 2  # whole, then each half twice


def test_a_decode_failure_is_a_row_fate_not_a_stage_failure(tiny_models, specs):
    result = score_with_retry(_stage(specs, fits=99), _chunk(tiny_models, 4, broken=1), print)
    assert result["error"] == ""
    assert result["decode_errors"][1].startswith("decode:")


def test_split_and_join_keep_rows_and_shared_fields():
    chunk = {
        "shard": "00002",
        "chunk": 3,
        "keys": ["a", "b", "c"],
        "pixels": np.arange(3),
        "captions": ["x", "y", "z"],
    }
    first, second = split(chunk)
    assert first["keys"] == ["a", "b"] and second["keys"] == ["c"]
    assert first["part"] == "0" and second["part"] == "1"
    assert split(first)[1]["part"] == "01"
    assert first["shard"] == second["shard"] == "00002"
    back = join([{**first, "error": "", "caption_s": 1.5, "itm_s": 0.25, "preprocess_s": 2.0},
                 {**second, "error": "boom", "caption_s": 0.5, "itm_s": 0.25, "preprocess_s": 2.0}])  # fmt: skip
    assert back["keys"] == chunk["keys"] and back["captions"] == chunk["captions"]
    # The halves' scoring seconds add up; a shared figure (the whole chunk's decoding) stays one.
    assert (back["caption_s"], back["itm_s"], back["preprocess_s"]) == (2.0, 0.5, 2.0)
    assert list(back["pixels"]) == [0, 1, 2]
    assert back["error"] == "boom" and "part" not in back
