"""When the CapFilt stage raises on a chunk: split it if it ran out of memory, else try it once more.

The usual failure on a GPU is running out of memory on one batch (a chunk of large images times
`num_captions` sampled sequences); half the batch fits, and a quarter surely does. So a chunk that
runs out of memory is split in halves and each half tried again, down to single images. Any other
error is not about batch size: splitting would only repeat it 2n-1 times, so the chunk is tried
once more whole (a transient fault passes) and then given up. A chunk given up comes back
unscored with its `error` set; the runner marks its shard failed, the rest of the job goes on,
and a later run of the job tries the shard again.

Captions of a split chunk are sampled with seeds of its halves (`part` "0", "1", "10", ...), so a
run that had to split writes the same output again if it splits the same way.

Plain Python, no Ray: the runner calls `score_with_retry` inside its actor.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from pipeline.core.messages import one_line
from pipeline.core.timings import SCORING_SECONDS
from pipeline.curate.chunks import Chunk

Log = Callable[[str], None]


class ChunkStage(Protocol):
    def __call__(self, chunk: Chunk) -> Chunk: ...

    def unscored(self, chunk: Chunk) -> Chunk: ...


def score_with_retry(stage: ChunkStage, chunk: Chunk, log: Log) -> Chunk:
    """`stage(chunk)` with `error` "" on success; else split (out of memory) or retried once."""
    where = f"shard {chunk['shard']} chunk {chunk['chunk']}" + (
        f".{chunk['part']}" if chunk.get("part") else ""
    )
    size = len(chunk["keys"])
    for attempt in (1, 2):
        try:
            return {**stage(chunk), "error": ""}
        except Exception as err:
            reason = f"{type(err).__name__}: {one_line(err, 300)}"
            if _out_of_memory(err):
                _release_accelerator_memory()
                if size > 1:
                    log(f"capfilt: {where} ({size} images) ran out of memory; retrying it as two halves")
                    first, second = split(chunk)
                    return join([score_with_retry(stage, first, log), score_with_retry(stage, second, log)])
            log(f"capfilt: {where} ({size} images) failed (attempt {attempt} of 2): {reason}")
    keys = chunk["keys"][0] if size == 1 else f"{chunk['keys'][0]}..{chunk['keys'][-1]}"
    return {**stage.unscored(chunk), "error": f"{where} (keys {keys}) failed twice: {reason}"}


def _out_of_memory(err: Exception) -> bool:
    """torch.cuda.OutOfMemoryError, or another allocator's "out of memory" RuntimeError."""
    return type(err).__name__ == "OutOfMemoryError" or "out of memory" in str(err).lower()


def split(chunk: Chunk) -> tuple[Chunk, Chunk]:
    """Two halves of a chunk. A chunk's per-row fields are its lists and arrays of one item per key;
    everything else (shard, chunk number) is shared."""
    n = len(chunk["keys"])
    half = (n + 1) // 2
    part = chunk.get("part", "")
    first = {k: v[:half] if _per_row(v, n) else v for k, v in chunk.items()}
    second = {k: v[half:] if _per_row(v, n) else v for k, v in chunk.items()}
    return {**first, "part": part + "0"}, {**second, "part": part + "1"}


def join(parts: list[Chunk]) -> Chunk:
    """Scored halves back into one result, in key order; the first error (if any) is the chunk's."""
    joined: Chunk = {}
    for k, v in parts[0].items():
        if k == "error":
            joined[k] = next((p["error"] for p in parts if p["error"]), "")
        elif k in SCORING_SECONDS:  # seconds spent: the halves' add up
            joined[k] = sum(p[k] for p in parts)
        elif isinstance(v, np.ndarray):
            joined[k] = np.concatenate([p[k] for p in parts])
        elif isinstance(v, list):
            joined[k] = [item for p in parts for item in p[k]]
        else:
            joined[k] = v
    joined.pop("part", None)
    return joined


def _per_row(value: Any, rows: int) -> bool:
    return isinstance(value, list | np.ndarray) and len(value) == rows


def _release_accelerator_memory() -> None:
    """After a CUDA out-of-memory error the caching allocator still holds the failed batch's blocks."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
