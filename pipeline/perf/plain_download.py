"""The download's baseline: plain `img2dataset.download`, as a user would run it, on the same list.

The same arguments capfilt gives img2dataset (`DownloadStage.arguments`), the same prepared URL
list and the same local site, written elsewhere; img2dataset's own default distributor
(multiprocessing) in place of Ray, with a process per core as Ray runs a download task per core.
Run in a child process so that its processes start as a user's do;
the time is taken around the `download()` call inside it, so the child's imports do not count.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pipeline.ingest.download import DownloadStage
from pipeline.perf.process_watch import cores
from pipeline.spec.config import JobSpec
from pipeline.spec.layout import OutputLayout

_CHILD = """
import json, sys, time
import img2dataset
arguments = json.loads(sys.argv[1])
start = time.perf_counter()
img2dataset.download(**arguments, distributor="multiprocessing")
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def plain_download_s(spec: JobSpec, out_dir: Path) -> float:
    """Seconds plain img2dataset takes to download the job's prepared URL list into `out_dir`."""
    arguments = {
        **DownloadStage(spec, OutputLayout(spec.output.path)).arguments(),
        "output_folder": str(out_dir),
        "processes_count": cores(),
    }
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(arguments)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"plain img2dataset failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])
