"""Run the real pipeline over a synthetic web split served on 127.0.0.1: the demo's and the benchmark's job.

Each pair becomes `/web/NNNNN.jpg` on a local HTTP server; the URL list holds those URLs and the web
captions; `jobs/local-tiny.yaml` runs with the given models. `web_index` maps an output row's URL back to
its pair, which is how the benchmark compares what the pipeline kept with the truth.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.curate.tiny_models import TinyModelPaths
from pipeline.job.console import Console
from pipeline.job.runner import JobResult, run_job
from pipeline.spec.bundled import bundled_path
from pipeline.spec.config import load_spec
from pipeline.synthetic.pixels import scene_jpeg
from pipeline.synthetic.sample_web import Route, SamplePair, StaticSite
from pipeline.synthetic.splits import Pair

_PATH = re.compile(r"/web/(\d{5})\.jpg$")


def web_routes(pairs: Sequence[Pair]) -> dict[str, Route]:
    jpeg = (("Content-Type", "image/jpeg"),)
    return {f"/web/{i:05d}.jpg": Route(200, scene_jpeg(pair.scene), jpeg) for i, pair in enumerate(pairs)}


def web_index(url: str | None) -> int | None:
    """The index of the pair an output row's URL was made from; None for rows that are not web pairs."""
    match = _PATH.search(url or "")
    return int(match.group(1)) if match else None


def run_web_job(
    out: Path,
    pairs: Sequence[Pair],
    models: TinyModelPaths,
    extra: Sequence[SamplePair] = (),
    overrides: Sequence[str] = (),
    address: str | None = None,
    log: Callable[[str], None] = print,
    console: Console | None = None,
) -> JobResult:
    """Serve `pairs` (and `extra`, e.g. hostile cases) and run the local job over them into out/output.

    The server gets a new port each run, so a previous run's output (made from other URLs) is
    overwritten rather than refused; a run still writing it makes this one refuse (the output's lock)."""
    out.mkdir(parents=True, exist_ok=True)
    routes = {**web_routes(pairs), **{p.path: p.route for p in extra}}
    captions = [p.caption for p in pairs] + [p.caption for p in extra]
    with StaticSite(routes) as site:
        url_list = out / "urls.parquet"
        urls = [site.url(path) for path in routes]
        pq.write_table(pa.table({"url": urls, "caption": pa.array(captions, pa.string())}), url_list)
        spec = load_spec(
            bundled_path("jobs", "local-tiny.yaml"),
            overrides=[
                f"input.url_list={url_list}",
                f"captioner.model={models.captioner}",
                f"filter.model={models.itm}",
                f"output.path={out / 'output'}",
                *overrides,
            ],
        )
        return run_job(spec, address=address, log=log, overwrite=True, console=console)
