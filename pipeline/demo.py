"""`capfilt demo`: the whole pipeline, offline, in a few minutes on a laptop.

It writes tiny BLIP models, generates a small web of image-text pairs (hostile cases included),
serves it on 127.0.0.1, and runs `jobs/local-tiny.yaml` against it on a local Ray.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.bundled import bundled_path
from pipeline.config import load_spec
from pipeline.runner import JobResult, run_job
from pipeline.sample_web import StaticSite, sample_web
from pipeline.tiny_models import write_tiny_models


def run_demo(out: Path, good_rows: int = 48, address: str | None = None) -> JobResult:
    """Run the demo into `out`. Its server gets a new port each time, so a previous demo's output
    (made from other URLs) is removed first rather than refused."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "output", ignore_errors=True)
    models = write_tiny_models(out / "models")
    pairs = sample_web(n_good=good_rows, seed=0)
    with StaticSite({p.path: p.route for p in pairs}) as site:
        url_list = out / "urls.parquet"
        urls = [site.url(p.path) for p in pairs]
        pq.write_table(pa.table({"url": urls, "caption": [p.caption for p in pairs]}), url_list)
        spec = load_spec(
            bundled_path("jobs", "local-tiny.yaml"),
            overrides=[
                f"input.url_list={url_list}",
                f"captioner.model={models.captioner}",
                f"filter.model={models.itm}",
                f"output.path={out / 'output'}",
            ],
        )
        return run_job(spec, address=address)
