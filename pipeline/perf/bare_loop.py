"""The Ray tax's baseline: the CapFilt stage in a plain loop, in this process, over the same batches.

The same models, batch size and chunks (seeded the same way, so the same captions are sampled) as
the job's actor, decoded beforehand: what is timed is the model work alone, which is what the
pipeline would deliver if Ray, reading, decoding and writing cost nothing. Torch gets as many
threads as the job's actor has CPUs (Ray gives an actor `OMP_NUM_THREADS` = its CPUs).
"""

from __future__ import annotations

import time

import torch

from pipeline.core.resources import Resources
from pipeline.curate.capfilt_stage import CapFiltStage
from pipeline.curate.chunks import Chunk, ChunkReader, on_disk
from pipeline.curate.preprocess import PreprocessStage
from pipeline.spec.config import JobSpec
from pipeline.spec.layout import OutputLayout


def decoded_chunks(spec: JobSpec, images: int) -> list[Chunk]:
    """The job's first chunks, up to `images` images, decoded and resized as the pipeline does it
    (held in memory, so the loop times the models alone)."""
    layout = OutputLayout(spec.output.path)
    read = ChunkReader(layout, spec.captioner.batch_size)
    preprocess = PreprocessStage.for_model(spec.captioner.model)
    chunks: list[Chunk] = []
    held = 0
    for shard in layout.downloaded_shards():
        for chunk in read(on_disk(shard)):
            if held >= images:
                return chunks
            chunks.append(preprocess(chunk))
            held += len(chunk["keys"])
    return chunks


def bare_images_per_s(spec: JobSpec, chunks: list[Chunk]) -> float:
    """Images per second of `CapFiltStage` called on the chunks one after another."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_actor)))
    try:
        stage = CapFiltStage(spec.captioner, spec.filter, Resources())
        stage.setup()
        stage(chunks[0])  # warm-up: the pipeline's rate is also taken once the models are loaded
        start = time.perf_counter()
        for chunk in chunks:
            stage(chunk)
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    images = sum(1 for chunk in chunks for err in chunk["decode_errors"] if not err)
    return images / elapsed
