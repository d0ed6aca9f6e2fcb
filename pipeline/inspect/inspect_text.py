"""`capfilt inspect OUT_DIR` in the terminal: fates, kept captions, ITM scores, shards, top errors."""

from __future__ import annotations

from pipeline.core.storage import Location
from pipeline.curate.decide import SYNTHETIC, WEB
from pipeline.inspect.inspection import Inspection, ScoreHistogram
from pipeline.output.manifest import DONE, FAILED, PENDING
from pipeline.output.summary import duplicates_line, fate_table, percent
from pipeline.spec.fates import Fate

ERRORS_LISTED = 10


def format_inspection(found: Inspection, root: Location) -> str:
    return "\n\n".join(
        [
            _heading(found, root),
            _fates(found),
            _captions(found),
            _scores(found),
            _shards(found),
            _errors(found),
        ]
    ).rstrip()


def _heading(found: Inspection, root: Location) -> str:
    state = "complete" if found.complete else f"INCOMPLETE: {found.progress}"
    return f"capfilt output {root} ({state}); ITM threshold {found.threshold:g}"


def _fates(found: Inspection) -> str:
    lines = fate_table(found.fate_rows(), found.input_rows)
    if found.duplicate_urls:
        lines.append(duplicates_line(found.duplicate_urls))
    return "\n".join(lines)


def _captions(found: Inspection) -> str:
    images = found.counts["kept"]
    kept = sum(found.kept_by_source.values())
    if not images:
        return "kept captions: none (no image was kept)"
    per_image = ", ".join(f"{k}: {n}" for k, n in sorted(found.kept_per_image.items()))
    web, synthetic = found.selected_by_source[WEB], found.selected_by_source[SYNTHETIC]
    return "\n".join(
        [
            f"kept captions: {kept} on {images} kept images ({kept / images:.2f} per image): "
            f"web {found.kept_by_source[WEB]}, synthetic {found.kept_by_source[SYNTHETIC]}",
            f"  selected (best) caption: web {web} ({percent(web, images)}), "
            f"synthetic {synthetic} ({percent(synthetic, images)})",
            f"  kept images by number of kept captions: {per_image}",
        ]
    )


def _scores(found: Inspection) -> str:
    t = found.threshold
    lines = [
        f"ITM scores of the candidate captions of the {found.scored_images} images that reached the filter",
        f"  {'source':<11}{'captions':>9}{'mean':>7}{'p10':>7}{'p50':>7}{'p90':>7}{f'>= {t:g}':>10}",
    ]
    for name, hist in ((WEB, found.web), (SYNTHETIC, found.synthetic)):
        lines.append(
            f"  {name:<11}{hist.n:>9}" + _quantiles(hist) + f"{percent(found.kept_at(t)[name], hist.n):>10}"
        )
    return "\n".join(lines)


def _quantiles(hist: ScoreHistogram) -> str:
    if not hist.n:
        return f"{'-':>7}" * 4
    return f"{hist.mean:>7.3f}" + "".join(f"{hist.quantile(q):>7.3f}" for q in (0.1, 0.5, 0.9))


def _shards(found: Inspection) -> str:
    by_status = {s: sum(x.status == s for x in found.shards) for s in (DONE, FAILED, PENDING)}
    lines = ["shards: " + ", ".join(f"{n} {s}" for s, n in by_status.items())]
    listed = found.listed_shards()
    if listed:
        header = f"{'rows':>7}{'kept':>7}{'filtered':>9}{'copies':>7}{'failed':>8}"
        lines.append(f"  {'shard':<8}{'status':<9}{header}")
    for shard in listed:
        if shard.report is None:
            lines.append(f"  {shard.name:<8}{shard.status:<9}  {shard.error or 'not written yet'}")
            continue
        counts = shard.report["counts"]
        copies = counts.get(Fate.DUPLICATE_IMAGE, 0)  # a report written before dedup has none
        failed = shard.report["rows"] - counts["kept"] - counts["filtered"] - copies
        lines.append(
            f"  {shard.name:<8}{shard.status:<9}{shard.report['rows']:>7}{counts['kept']:>7}"
            f"{counts['filtered']:>9}{copies:>7}{failed:>8}"
        )
    if len(listed) < len(found.shards):
        lines.append(f"  ({len(found.shards) - len(listed)} done shards not listed)")
    return "\n".join(lines)


def _errors(found: Inspection) -> str:
    if not found.errors:
        return "failed rows: none"
    total = sum(found.errors.values())
    lines = [f"top reasons of the {total} rows that did not reach the filter"]
    for (fate, reason), n in found.errors.most_common(ERRORS_LISTED):
        lines.append(f"  {n:>8}  {fate:<16} {reason[:100]}")
    if len(found.errors) > ERRORS_LISTED:
        lines.append(f"  ({len(found.errors) - ERRORS_LISTED} more reasons)")
    return "\n".join(lines)
