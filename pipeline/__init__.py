"""capfilt: BLIP's CapFilt (caption, then filter by image-text matching) as a batch pipeline on Ray.

The packages follow the data, and imports run one way: a package imports only those before it in
`LAYERS` (and this module, for the version); `cli` sits on top of them all.

    core       storage, messages, resources, timings, tar reading       (imports nothing of pipeline)
    spec       job spec, output layout, fates, shard schema
    ingest     URL list → input shards → img2dataset download          stage 1
    curate     chunks → decode/resize → CapFilt actor → keep rule      stage 2
    output     shard writer, manifest, summary, reading an output       stage 3
    job        runner (the only Ray code), resume, rethreshold, retry, cluster submit
    inspect    `capfilt inspect`, HTML report, training loader
    synthetic  the synthetic world, its web, trained tiny models, demo, quality bench
    perf       `capfilt bench perf`
"""

import os

__version__ = "0.1.0"

LAYERS = ("core", "spec", "ingest", "curate", "output", "job", "inspect", "synthetic", "perf")

# img2dataset imports albumentations, which asks PyPI for a newer version on import unless told not
# to. A data job must not make requests nobody asked for (and clusters are often offline).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
