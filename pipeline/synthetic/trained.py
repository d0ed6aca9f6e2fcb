"""The tiny BLIP models trained on the synthetic world, shipped inside the package.

`python -m pipeline.synthetic.train --out pipeline/synthetic/checkpoints` wrote them; `capfilt
tiny-models DIR --trained` copies them out, and the demo and the quality benchmark run them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.curate.tiny_models import CAPTIONER_DIR, ITM_DIR, TinyModelPaths

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"


def shipped_models() -> TinyModelPaths:
    """The packaged checkpoints, loadable in place with `from_pretrained` (read-only: copy before editing)."""
    paths = TinyModelPaths(captioner=CHECKPOINTS / CAPTIONER_DIR, itm=CHECKPOINTS / ITM_DIR)
    for path in (paths.captioner, paths.itm):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"capfilt is installed without its trained models ({path} is missing)")
    return paths


def export_trained_models(out_dir: str | Path) -> TinyModelPaths:
    """Copy the shipped checkpoints to out_dir/captioner and out_dir/itm (replacing what is there)."""
    shipped = shipped_models()
    out = Path(out_dir)
    paths = TinyModelPaths(captioner=out / CAPTIONER_DIR, itm=out / ITM_DIR)
    for source, target in ((shipped.captioner, paths.captioner), (shipped.itm, paths.itm)):
        shutil.copytree(source, target, dirs_exist_ok=True)
    return paths
