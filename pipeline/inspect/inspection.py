"""What a job kept and dropped, and why: the figures behind `capfilt inspect` and its HTML report.

It reads the complete shards' Parquet one at a time and computes with vectorised pyarrow/numpy, so
its memory does not grow with the job, and it works on a job that is still running.
Scores go into fine histograms (a 0.001 grid), from which the retention-vs-threshold curve is exact
at every grid point, without keeping a score per caption in memory. Example rows are uniform random
samples (each row draws a priority; the lowest k are kept), fixed by a seed.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.curate.decide import WEB
from pipeline.inspect.breakdowns import Breakdowns
from pipeline.output.job_output import JobOutput, ShardState
from pipeline.output.manifest import DONE
from pipeline.spec.fates import Fate, add_counts, count_fates

BINS = 1000
SHARDS_LISTED = 20  # with more shards than this, reports list only the unfinished ones
NOT_WRITTEN = "(not written yet)"
FILTERED_REASON = "no caption reached the threshold"
WEB_REPLACED = "web caption dropped, image kept with a synthetic caption"
DUPLICATE_REASON = "an earlier kept row shows the same image (duplicate_of)"
Row = dict[str, Any]


@dataclass
class ScoreHistogram:
    """ITM probabilities on a 0.001 grid: `at_least(i / BINS)` is exact (1.0 has a bin of its own); a
    threshold between grid points is rounded up to the next one."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS + 1, dtype=np.int64))
    total: float = 0.0

    def add(self, scores: np.ndarray) -> None:
        bins = np.clip((scores * BINS).astype(np.int64), 0, BINS)
        self.counts += np.bincount(bins, minlength=BINS + 1)
        self.total += float(scores.sum())

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")

    def at_least(self, threshold: float) -> int:
        return int(self.counts[int(np.ceil(round(threshold * BINS, 6))) :].sum())

    def quantile(self, q: float) -> float:
        """The score below which a share q lies, to the grid's resolution (bin centre)."""
        if not self.n:
            return float("nan")
        index = int(np.searchsorted(np.cumsum(self.counts), q * self.n, side="left"))
        return min((index + 0.5) / BINS, 1.0)


class Sample:
    """A uniform random sample of at most k rows over all shards, streamed: the k lowest priorities."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._kept: list[tuple[float, Row]] = []

    def offer(self, shard: str, table: pa.Table, mask: np.ndarray, priority: np.ndarray) -> None:
        index = np.flatnonzero(mask)
        if not index.size or not self.k:
            return
        take = index[np.argsort(priority[index], kind="stable")[: self.k]]
        rows = table.take(pa.array(take)).to_pylist()
        self._kept += [
            (float(priority[i]), {**row, "shard": shard}) for i, row in zip(take, rows, strict=True)
        ]
        self._kept = sorted(self._kept, key=lambda item: item[0])[: self.k]

    @property
    def rows(self) -> list[Row]:
        return [row for _, row in self._kept]


@dataclass
class Inspection:
    threshold: float
    input_rows: int
    shards: list[ShardState]
    counts: dict[str, int] = field(default_factory=lambda: count_fates([]))
    web: ScoreHistogram = field(default_factory=ScoreHistogram)
    synthetic: ScoreHistogram = field(default_factory=ScoreHistogram)
    best: ScoreHistogram = field(default_factory=ScoreHistogram)  # each scored image's best caption
    scored_images: int = 0  # kept + filtered: the images that reached the filter
    at_threshold: Counter[str] = field(default_factory=Counter)  # exact "images"/"web"/"synthetic" kept
    web_replaced: int = 0  # kept images whose web caption was dropped
    kept_by_source: Counter[str] = field(default_factory=Counter)
    selected_by_source: Counter[str] = field(default_factory=Counter)
    kept_per_image: Counter[int] = field(default_factory=Counter)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)  # (fate, reason) -> rows
    samples: Sample = field(default_factory=lambda: Sample(0))
    dropped: dict[tuple[str, str], Sample] = field(default_factory=dict)  # (fate, reason) -> examples
    examples_per_reason: int = 0
    duplicate_urls: int | None = None  # input rows whose URL an earlier row had (the manifest's count)
    breakdowns: Breakdowns = field(default_factory=Breakdowns)  # rows and kept by domain, size, caption

    @property
    def complete(self) -> bool:
        return all(s.status == DONE for s in self.shards)

    @property
    def progress(self) -> str:
        return f"{sum(s.status == DONE for s in self.shards)} of {len(self.shards)} shards written"

    @property
    def rows_read(self) -> int:
        return sum(self.counts.values())

    @property
    def rows_missing(self) -> int:
        """Input rows in shards not written yet."""
        return self.input_rows - self.rows_read

    def fate_rows(self) -> list[tuple[str, int]]:
        """Rows per fate, and the rows of shards not written yet when there are any."""
        return list(self.counts.items()) + ([(NOT_WRITTEN, self.rows_missing)] if self.rows_missing else [])

    def listed_shards(self) -> list[ShardState]:
        """The shards a report lists: all of them, or only the unfinished ones of a big job."""
        if len(self.shards) <= SHARDS_LISTED:
            return self.shards
        return [s for s in self.shards if s.status != DONE]

    def kept_at(self, threshold: float) -> dict[str, int]:
        """Images with at least one caption, web and synthetic captions kept at `threshold`: counted
        exactly at the job's threshold, from the histograms elsewhere."""
        if threshold == self.threshold:
            return {name: self.at_threshold[name] for name in ("images", "web", "synthetic")}
        return {name: hist.at_least(threshold) for name, hist in self._histograms().items()}

    def retention(self, threshold: float) -> dict[str, float]:
        """The shares of `kept_at`: of the images that reached the filter, and of each source's captions."""
        whole = {"images": self.scored_images, "web": self.web.n, "synthetic": self.synthetic.n}
        kept = self.kept_at(threshold)
        return {name: kept[name] / whole[name] if whole[name] else float("nan") for name in kept}

    def _histograms(self) -> dict[str, ScoreHistogram]:
        return {"images": self.best, "web": self.web, "synthetic": self.synthetic}


def inspect_output(
    output: JobOutput, samples: int = 24, examples_per_reason: int = 4, seed: int = 0
) -> Inspection:
    """Read every complete shard of `output` once and gather the figures and example rows."""
    found = Inspection(
        output.threshold,
        output.input_rows,
        output.shards(),
        samples=Sample(samples),
        examples_per_reason=examples_per_reason,
        duplicate_urls=output.manifest.get("duplicate_urls"),
    )
    rng = np.random.default_rng(seed)
    for shard in found.shards:
        if shard.report is not None:
            table = output.read_shard(shard.name)
            _add_shard(found, shard.name, table, rng.random(table.num_rows))
    return found


def _add_shard(found: Inspection, shard: str, table: pa.Table, priority: np.ndarray) -> None:
    status = np.asarray(table["status"].to_pylist(), dtype=object)
    found.counts = add_counts(found.counts, count_fates(status))
    kept, filtered = status == Fate.KEPT, status == Fate.FILTERED
    copies = status == Fate.DUPLICATE_IMAGE
    scored = kept | filtered | copies
    found.breakdowns.add(table, kept)
    found.scored_images += int(scored.sum())
    found.samples.offer(shard, table, scored, priority)

    web_scores, web_present = _web_candidates(table)
    synthetic_scores, parents = _synthetic_candidates(table)
    best = np.where(web_present, web_scores, -1.0)
    if parents.size:
        np.maximum.at(best, parents, synthetic_scores)
    candidates = {
        "images": best[scored & (best >= 0)],
        "web": web_scores[web_present & scored],
        "synthetic": synthetic_scores[scored[parents]],
    }
    for name, hist in found._histograms().items():
        hist.add(candidates[name])
        found.at_threshold[name] += int((candidates[name] >= found.threshold).sum())

    kept_captions = table["kept_captions"]
    found.kept_by_source.update(pc.struct_field(pc.list_flatten(kept_captions), "source").to_pylist())
    counts_per_image = pc.fill_null(pc.list_value_length(kept_captions), 0).to_numpy(zero_copy_only=False)
    found.kept_per_image.update(int(n) for n in counts_per_image[kept])
    first = pc.list_element(pc.filter(kept_captions, pa.array(kept)), 0) if kept.any() else None
    if first is not None:
        found.selected_by_source.update(pc.struct_field(first, "source").to_pylist())

    web_kept = _web_kept(kept_captions)
    _offer(found, (Fate.FILTERED.value, FILTERED_REASON), shard, table, filtered, priority)
    _offer(found, (Fate.DUPLICATE_IMAGE.value, DUPLICATE_REASON), shard, table, copies, priority)
    replaced = kept & web_present & ~web_kept
    found.web_replaced += int(replaced.sum())
    _offer(found, (Fate.KEPT.value, WEB_REPLACED), shard, table, replaced, priority)
    failed = np.flatnonzero(~scored)
    errors = table["error"].take(pa.array(failed, pa.int64())).to_pylist()
    by_reason: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, fate, error in zip(failed, status[failed], errors, strict=True):
        by_reason[(str(fate), error_reason(error))].append(int(i))
    for group, rows in by_reason.items():
        found.errors[group] += len(rows)
        mask = np.zeros(table.num_rows, dtype=bool)
        mask[rows] = True
        _offer(found, group, shard, table, mask, priority)


def _offer(
    found: Inspection,
    group: tuple[str, str],
    shard: str,
    table: pa.Table,
    mask: np.ndarray,
    priority: np.ndarray,
) -> None:
    if mask.any():
        found.dropped.setdefault(group, Sample(found.examples_per_reason)).offer(shard, table, mask, priority)


def _web_candidates(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Each row's web caption score, and whether the web caption was a candidate (non-empty, scored)."""
    scores = table["web_caption_itm"]
    text = pc.fill_null(pc.utf8_trim_whitespace(table["web_caption"]), "")
    present = pc.and_(pc.is_valid(scores), pc.not_equal(text, "")).to_numpy(zero_copy_only=False)
    return pc.fill_null(scores, -1.0).to_numpy(zero_copy_only=False).astype(np.float64), present


def _synthetic_candidates(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The scores of non-empty synthetic captions, and the row each belongs to."""
    texts = pc.list_flatten(table["synthetic_captions"])
    scores = pc.list_flatten(table["synthetic_itm"]).to_numpy(zero_copy_only=False).astype(np.float64)
    parents = pc.list_parent_indices(table["synthetic_captions"]).to_numpy(zero_copy_only=False)
    nonempty = pc.not_equal(pc.fill_null(pc.utf8_trim_whitespace(texts), ""), "").to_numpy(
        zero_copy_only=False
    )
    return scores[nonempty], parents[nonempty].astype(np.int64)


def _web_kept(kept_captions: pa.ChunkedArray) -> np.ndarray:
    sources = pc.struct_field(pc.list_flatten(kept_captions), "source").to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(kept_captions).to_numpy(zero_copy_only=False)
    web_kept = np.zeros(len(kept_captions), dtype=bool)
    web_kept[parents[sources == WEB]] = True
    return web_kept


_NUMBER = re.compile(r"\d+(?:\.\d+)*")
_MEANINGFUL_NUMBER_AFTER = ("Error ", "Errno ", "Errno -", "HTTP ")


def error_reason(error: str | None) -> str:
    """An error message with its per-row numbers masked, so that rows fail for the same reason group:
    'IncompleteRead(500 bytes read, 483 more expected)' -> 'IncompleteRead(N bytes read, N more expected)'.
    HTTP status codes and errno values are kept: they are the reason."""
    if not error:
        return "(no message)"

    def mask(match: re.Match[str]) -> str:
        return match.group() if match.string[: match.start()].endswith(_MEANINGFUL_NUMBER_AFTER) else "N"

    return _NUMBER.sub(mask, " ".join(error.split()))[:200]
