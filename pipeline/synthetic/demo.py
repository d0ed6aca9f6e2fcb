"""`capfilt demo`: the whole pipeline, offline, in a few minutes on a laptop.

It generates a noisy web split of the synthetic world (a known share of its captions corrupted),
adds the hostile cases a real crawl returns (404s, HTML served as JPEG, truncated files, ...), serves
them all on 127.0.0.1, and runs `jobs/local-tiny.yaml` on a local Ray with the trained tiny BLIP models
that ship with capfilt (copied to OUT/models, so they can be reused as `captioner.model`/`filter.model`).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.storage import read_parquet
from pipeline.job.console import Console
from pipeline.job.runner import JobResult
from pipeline.synthetic.sample_web import hostile_pairs
from pipeline.synthetic.splits import web_split
from pipeline.synthetic.trained import export_trained_models
from pipeline.synthetic.web_job import run_web_job


def run_demo(
    out: Path, rows: int, address: str | None = None, seed: int = 0, console: Console | None = None
) -> JobResult:
    """Run the demo into `out`: OUT/models, OUT/urls.parquet, OUT/output (shards and manifest)."""
    models = export_trained_models(out / "models")
    pairs, hostile = web_split(rows, seed), hostile_pairs(seed)
    return run_web_job(out, pairs, models, extra=hostile, address=address, console=console)


def examples(result: JobResult, n: int = 3) -> str:
    """A few rows whose web caption the filter dropped, with the caption kept instead: CapFilt at work."""
    threshold = result.manifest["spec"]["filter"]["threshold"]
    lines = ["web captions the filter dropped, and the caption kept instead:"]
    for path in result.layout.shard_parquets():
        for row in read_parquet(path, columns=["web_caption", "web_caption_itm", "caption"]).to_pylist():
            score = row["web_caption_itm"]
            if score is not None and score < threshold and row["caption"] is not None:
                lines.append(f"  {row['web_caption'][:60]!r} (itm {score:.2f}) -> {row['caption']!r}")
            if len(lines) > n:
                return "\n".join(lines)
    return "\n".join(lines)
