"""When the CapFilt stage raises on a chunk: split the chunk in halves and try each half again.

The usual failure on a GPU is running out of memory on one batch (a chunk of large images times
`num_captions` sampled sequences); half the batch fits, and a quarter surely does. So a failed
chunk is split and retried, down to single images. A failure that survives down to one image is
not about batch size: that part comes back unscored with its `error` set, the runner marks the
shard failed (the rest of the job goes on), and a later run of the job tries the shard again.

Captions of a split chunk are sampled with seeds of its halves (`part` "0", "1", "10", ...), so a
run that had to split gives the same output again if it splits the same way.

Plain Python, no Ray: the runner calls `score_with_retry` inside its actor.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from pipeline.chunks import Chunk

Log = Callable[[str], None]


class ChunkStage(Protocol):
    def __call__(self, chunk: Chunk) -> Chunk: ...

    def unscored(self, chunk: Chunk) -> Chunk: ...


def score_with_retry(stage: ChunkStage, chunk: Chunk, log: Log) -> Chunk:
    """`stage(chunk)`, with `error` "" on success; on failure, the halves scored the same way."""
    try:
        return {**stage(chunk), "error": ""}
    except Exception as err:
        reason = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    _release_accelerator_memory()
    where = f"shard {chunk['shard']} chunk {chunk['chunk']}{'.' + chunk['part'] if chunk.get('part') else ''}"
    size = len(chunk["keys"])
    if size == 1:
        log(f"capfilt: {where} (key {chunk['keys'][0]}) failed on its own: {reason}")
        return {**stage.unscored(chunk), "error": f"scoring key {chunk['keys'][0]} failed: {reason}"}
    log(f"capfilt: {where} ({size} images) failed: {reason}; retrying it as two halves")
    first, second = split(chunk)
    return join([score_with_retry(stage, first, log), score_with_retry(stage, second, log)])


def split(chunk: Chunk) -> tuple[Chunk, Chunk]:
    """Two halves of a chunk. A chunk's per-row fields are its lists and arrays (one item per key);
    everything else (shard, chunk number) is shared."""
    half = (len(chunk["keys"]) + 1) // 2
    part = chunk.get("part", "")
    first = {k: v[:half] if _per_row(v) else v for k, v in chunk.items()}
    second = {k: v[half:] if _per_row(v) else v for k, v in chunk.items()}
    return {**first, "part": part + "0"}, {**second, "part": part + "1"}


def join(parts: list[Chunk]) -> Chunk:
    """Scored halves back into one result, in key order; the first error (if any) is the chunk's."""
    joined: Chunk = {}
    for k, v in parts[0].items():
        if k == "error":
            joined[k] = next((p["error"] for p in parts if p["error"]), "")
        elif isinstance(v, np.ndarray):
            joined[k] = np.concatenate([p[k] for p in parts])
        elif isinstance(v, list):
            joined[k] = [item for p in parts for item in p[k]]
        else:
            joined[k] = v
    joined.pop("part", None)
    return joined


def _per_row(value: Any) -> bool:
    return isinstance(value, list | np.ndarray)


def _release_accelerator_memory() -> None:
    """After a CUDA out-of-memory error the caching allocator still holds the failed batch's blocks."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
