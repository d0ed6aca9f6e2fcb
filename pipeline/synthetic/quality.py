"""`capfilt bench quality`: does CapFilt do what BLIP says, on a world where the truth is known?

It generates a noisy web split, runs the real pipeline over it (img2dataset over HTTP on 127.0.0.1, the
shipped trained BLIP models, the configured threshold), reads the Parquet shards back and compares every
caption with the truth:

- filter: share of web captions kept, per corruption kind, at the job's threshold and over a sweep;
- captioner: share of synthetic captions that state all six attributes correctly (`parse_caption`);
- coverage: share of images with at least one correct caption, in the raw web and among the kept captions;
- bootstrap: the same small dual encoder pretrained on the raw web captions and on the CapFilt output,
  three seeds each, scored by retrieval on the held-out `eval` split.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.storage import read_parquet
from pipeline.synthetic.bootstrap import Budget, Recall, pretrain, retrieval
from pipeline.synthetic.pixels import stored_pixels
from pipeline.synthetic.splits import CORRECT, CORRUPTIONS, KINDS, Pair, eval_split, web_split
from pipeline.synthetic.trained import shipped_models
from pipeline.synthetic.web_job import run_web_job, web_index
from pipeline.synthetic.world import ATTRIBUTES, Scene, parse_caption

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
BOOTSTRAP_SEEDS = 3
Log = Callable[[str], None]


DEFAULT_BUDGET = Budget()


def run_quality(seed: int = 0, rows: int = 1000, eval_rows: int = 300, out: Path | None = None,
                address: str | None = None, log: Log = print,
                budget: Budget = DEFAULT_BUDGET) -> dict[str, Any]:  # fmt: skip
    """Run the benchmark and return its figures (see `format_report` for the table). `out` keeps the
    job's files (URL list, shards, manifest) for a look; by default they go to a temporary directory."""
    pairs = web_split(rows, seed)
    with tempfile.TemporaryDirectory(prefix="capfilt-quality-") as tmp:
        work = out or Path(tmp)
        models = shipped_models()
        started = time.monotonic()
        result = run_web_job(work, pairs, models, address=address, log=log)
        pipeline_s = time.monotonic() - started
        table = [row for path in result.layout.shard_parquets() for row in read_parquet(path).to_pylist()]
    threshold = float(result.manifest["spec"]["filter"]["threshold"])
    outcomes = _outcomes(pairs, table)
    log("pretraining the dual encoder on raw and on CapFilt captions ...")
    report: dict[str, Any] = {
        "seed": seed,
        "rows": rows,
        "threshold": threshold,
        "pipeline": {"seconds": round(pipeline_s, 1), "counts": result.manifest["counts"]},
        "filter": _filter_figures(outcomes, threshold),
        "captioner": _captioner_figures(outcomes),
        "coverage": _coverage(outcomes),
        "bootstrap": _bootstrap(pairs, outcomes, eval_split(eval_rows, seed), budget),
    }
    return report


class _Outcome:
    """One web pair and what the pipeline did with it."""

    def __init__(self, pair: Pair, row: dict[str, Any]) -> None:
        self.pair = pair
        self.status: str = row["status"]
        self.web_itm: float = math.nan if row["web_caption_itm"] is None else float(row["web_caption_itm"])
        self.synthetic: list[tuple[str, float]] = [
            (text, math.nan if score is None else float(score))
            for text, score in zip(row["synthetic_captions"] or [], row["synthetic_itm"] or [], strict=True)
        ]
        self.kept: list[str] = [c["text"] for c in row["kept_captions"] or []]

    @property
    def scene(self) -> Scene:
        return self.pair.scene


def _outcomes(pairs: list[Pair], table: list[dict[str, Any]]) -> list[_Outcome]:
    rows = {web_index(r["url"]): r for r in table}
    missing = [i for i in range(len(pairs)) if i not in rows]
    if missing:
        raise RuntimeError(f"{len(missing)} web rows are missing from the output, e.g. row {missing[0]}")
    return [_Outcome(pair, rows[i]) for i, pair in enumerate(pairs)]


def _kept(score: float, threshold: float) -> bool:
    return not math.isnan(score) and score >= threshold


def _filter_figures(outcomes: list[_Outcome], threshold: float) -> dict[str, Any]:
    def shares(t: float) -> dict[str, float]:
        by_kind = {k: [_kept(o.web_itm, t) for o in outcomes if o.pair.kind == k] for k in KINDS}
        corrupt = [kept for k in CORRUPTIONS for kept in by_kind[k]]
        return {
            "removed_corrupt": 1 - _mean(corrupt),
            "kept_correct": _mean(by_kind[CORRECT]),
            **{f"kept.{k}": _mean(v) for k, v in by_kind.items()},
        }

    at = shares(threshold)
    rows = Counter(o.pair.kind for o in outcomes)
    # Synthetic captions are filtered too: how well does the filter separate the right ones from the wrong?
    synthetic = [(parse_caption(text).matches(o.scene), s) for o in outcomes for text, s in o.synthetic]
    return {
        "removed_corrupt": at["removed_corrupt"],
        "kept_correct": at["kept_correct"],
        "per_kind": {k: {"rows": rows[k], "kept": at[f"kept.{k}"]} for k in KINDS},
        "synthetic_correct_kept": _mean([_kept(s, threshold) for ok, s in synthetic if ok]),
        "synthetic_wrong_removed": 1 - _mean([_kept(s, threshold) for ok, s in synthetic if not ok]),
        "curve": [
            {"threshold": t, **{k: v for k, v in shares(t).items() if "." not in k}} for t in THRESHOLDS
        ],
    }


def _captioner_figures(outcomes: list[_Outcome]) -> dict[str, Any]:
    parsed = [(parse_caption(text), o.scene) for o in outcomes for text, _ in o.synthetic]
    wrong = Counter(a for p, scene in parsed for a in p.wrong(scene))
    return {
        "correct": _mean([p.matches(scene) for p, scene in parsed]),
        "captions": len(parsed),
        "wrong_attribute": {a: wrong[a] / len(parsed) if parsed else 0.0 for a in ATTRIBUTES},
    }


def _coverage(outcomes: list[_Outcome]) -> dict[str, float]:
    kept = [text for o in outcomes for text in o.kept]
    return {
        "before": _mean([parse_caption(o.pair.caption).matches(o.scene) for o in outcomes]),
        "after": _mean([any(parse_caption(t).matches(o.scene) for t in o.kept) for o in outcomes]),
        "kept_precision": _mean([parse_caption(t).matches(o.scene) for o in outcomes for t in o.kept]),
        "kept_per_image": len(kept) / len(outcomes) if outcomes else 0.0,
    }


def _bootstrap(
    pairs: list[Pair], outcomes: list[_Outcome], held_out: list[Pair], budget: Budget
) -> dict[str, Any]:
    train_pixels = stored_pixels([p.scene for p in pairs])
    eval_pixels = stored_pixels([p.scene for p in held_out])
    eval_captions = [p.caption for p in held_out]
    datasets = {"raw": [[p.caption or ""] for p in pairs], "capfilt": [o.kept for o in outcomes]}
    figures: dict[str, Any] = {"budget": asdict(budget), "eval_pairs": len(held_out)}
    for name, captions in datasets.items():
        runs = [retrieval(pretrain(train_pixels, captions, budget, seed), eval_pixels, eval_captions)
                for seed in range(BOOTSTRAP_SEEDS)]  # fmt: skip
        r1 = [run.r1 for run in runs]
        figures[f"{name}_r1"] = _mean(r1)
        figures[name] = {
            **{field: _mean([getattr(run, field) for run in runs]) for field in Recall.__dataclass_fields__},
            "r1_by_seed": r1,
            "spread": max(r1) - min(r1),
            "training_images": sum(1 for c in captions if c),
        }
    figures["margin"] = figures["capfilt_r1"] - figures["raw_r1"]
    figures["holds"] = figures["margin"] > max(figures["raw"]["spread"], figures["capfilt"]["spread"])
    return figures


def _mean(values: list[Any]) -> float:
    return float(np.mean(values)) if values else 0.0


def format_report(report: dict[str, Any]) -> str:
    f, c, cov, b = report["filter"], report["captioner"], report["coverage"], report["bootstrap"]
    lines = [
        f"CapFilt quality on the synthetic web: seed {report['seed']}, {report['rows']} rows, "
        f"threshold {report['threshold']}, pipeline {report['pipeline']['seconds']:.0f} s",
        "",
        "filter: web captions kept, by kind",
        f"  {'kind':<20}{'rows':>6}{'kept':>9}  should be",
    ]
    for kind, figures in f["per_kind"].items():
        goal = "kept" if kind == CORRECT else "removed"
        lines.append(f"  {kind:<20}{figures['rows']:>6}{figures['kept']:>9.1%}  {goal}")
    lines += [
        f"  corrupted captions removed {f['removed_corrupt']:.1%}, "
        f"correct captions kept {f['kept_correct']:.1%}",
        f"  synthetic captions: correct ones kept {f['synthetic_correct_kept']:.1%}, "
        f"wrong ones removed {f['synthetic_wrong_removed']:.1%}",
        "",
        "threshold sweep: " + "  ".join(f"{p['threshold']:.1f}" for p in f["curve"]),
        "  removed corrupt " + "  ".join(f"{p['removed_corrupt']:.2f}" for p in f["curve"]),
        "  kept correct    " + "  ".join(f"{p['kept_correct']:.2f}" for p in f["curve"]),
        "",
        f"captioner: {c['correct']:.1%} of {c['captions']} synthetic captions state all six attributes "
        "correctly; wrong or missing: "
        + ", ".join(f"{a} {share:.1%}" for a, share in c["wrong_attribute"].items()),
        f"coverage: images with a correct caption: raw web {cov['before']:.1%}, "
        f"after CapFilt {cov['after']:.1%} "
        f"({cov['kept_per_image']:.2f} kept captions per image, {cov['kept_precision']:.1%} of them correct)",
        "",
        f"bootstrap: retrieval on {b['eval_pairs']} held-out pairs, "
        f"mean of {len(b['raw']['r1_by_seed'])} seeds, "
        f"{b['budget']['steps']} steps of {b['budget']['batch_size']}",
        f"  {'trained on':<12}{'images':>7}{'i2t R@1':>9}{'i2t R@5':>9}{'t2i R@1':>9}{'t2i R@5':>9}"
        f"{'R@1':>7}{'spread':>8}",
    ]
    for name, label in (("raw", "raw web"), ("capfilt", "CapFilt")):
        r = b[name]
        lines.append(
            f"  {label:<12}{r['training_images']:>7}{r['i2t_r1']:>9.3f}{r['i2t_r5']:>9.3f}{r['t2i_r1']:>9.3f}"
            f"{r['t2i_r5']:>9.3f}{b[name + '_r1']:>7.3f}{r['spread']:>8.3f}"
        )
    verdict = "holds" if b["holds"] else "does NOT hold"
    lines.append(
        f"  CapFilt - raw = {b['margin']:+.3f} R@1; larger than the seed spread: the claim {verdict}"
    )
    return "\n".join(lines)
