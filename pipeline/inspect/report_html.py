"""`capfilt inspect OUT_DIR --html report.html`: one self-contained HTML file a person opens in a browser.

Everything is inside the file: plots are PNGs rendered with matplotlib and thumbnails are small
JPEGs, both as data: URIs, and the style sheet is inline; there is no script and no external URL, so
the report can be mailed, archived next to the shards, or opened on an offline machine. Every piece
of text from the data (captions, URLs, errors) is escaped: web alt-text is hostile input. The markup
is well-formed XML, so tools can parse it too.
"""

from __future__ import annotations

import base64
import html
import io
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline import __version__
from pipeline.core.tars import read_jpegs
from pipeline.curate.decide import SYNTHETIC, WEB, candidates
from pipeline.inspect.inspection import (
    BINS,
    DUPLICATE_REASON,
    FILTERED_REASON,
    WEB_REPLACED,
    Inspection,
    Row,
    ScoreHistogram,
)
from pipeline.output.job_output import JobOutput
from pipeline.output.summary import percent
from pipeline.spec.fates import Fate

THUMBNAIL_PX = 160
TOP_DOMAINS = 20
CURVE_TABLE = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_TEXT = ' class="text"'
_XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_WITH_IMAGES = {(Fate.FILTERED.value, FILTERED_REASON), (Fate.KEPT.value, WEB_REPLACED)}

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 2px 10px; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 12px; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 8px; background: #fafafa; }
.card.filtered { border-color: #c44; }
.card img { max-width: 160px; height: auto; display: block; image-rendering: pixelated; }
.meta { color: #666; font-size: 12px; margin: 4px 0; }
.captions { list-style: none; padding: 0; margin: 0; font-size: 13px; }
.captions li { margin: 3px 0; padding: 2px 4px; border-left: 3px solid #ccc; }
.captions li.kept { border-left-color: #2a2; }
.captions li.dropped { color: #888; text-decoration: line-through; }
.captions li.selected { background: #e6f6e6; }
.captions li.selected::after { content: " \\2190 selected"; color: #2a2; font-size: 11px; }
.src { font-size: 11px; padding: 0 4px; border-radius: 3px; margin-right: 4px; color: #fff; }
.src.web { background: #36c; } .src.synthetic { background: #a5a; }
.score { font-family: monospace; margin-right: 4px; }
.warn { color: #b00; font-weight: bold; }
"""


def write_report(found: Inspection, output: JobOutput, path: Path) -> None:
    thumbnails = _thumbnails(output, _rows_with_images(found))
    body = [
        _heading(found, output),
        _summary(found),
        _plots(found),
        _section(
            f"Sample of {len(found.samples.rows)} images that reached the filter",
            _grid(found.samples.rows, found.threshold, thumbnails),
        ),
        _dropped(found, thumbnails),
        _breakdowns(found),
        _shards(found),
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8" />'
        f"<title>capfilt report: {_e(output.layout.root.name)}</title><style>{_STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")


def _e(text: Any) -> str:
    """Text from the data as markup-free text; characters XML forbids (NUL, most C0 controls) become
    U+FFFD, so the page stays well-formed whatever the web's alt-text holds."""
    return _XML_FORBIDDEN.sub("\ufffd", html.escape(str(text), quote=True))


def _section(title: str, content: str) -> str:
    return f"<h2>{_e(title)}</h2>{content}"


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]], text_columns: int = 1) -> str:
    def cells(values: Iterable[Any], tag: str) -> str:
        return "".join(
            f"<{tag}{_TEXT if i < text_columns else ''}>{_e(v)}</{tag}>" for i, v in enumerate(values)
        )

    body = "".join("<tr>" + cells(r, "td") + "</tr>" for r in rows)
    return f"<table><tr>{cells(header, 'th')}</tr>{body}</table>"


def _heading(found: Inspection, output: JobOutput) -> str:
    state = "complete" if found.complete else f'<span class="warn">incomplete: {found.progress}</span>'
    models = output.manifest.get("models", {})
    return (
        f"<h1>capfilt report: {_e(output.layout.root)}</h1>"
        f"<p>Job {state}; ITM threshold {found.threshold:g}; captioner {_e(models.get('captioner'))}; "
        f"filter {_e(models.get('filter'))}. Made by capfilt {_e(__version__)} at "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.</p>"
    )


def _summary(found: Inspection) -> str:
    fates = [(fate, n, percent(n, found.input_rows)) for fate, n in found.fate_rows()]
    fates.append(("input rows", found.input_rows, ""))
    images = found.counts[Fate.KEPT]
    kept = sum(found.kept_by_source.values())
    captions = [
        (
            source,
            found.kept_by_source[source],
            found.selected_by_source[source],
            percent(found.selected_by_source[source], images),
        )
        for source in (WEB, SYNTHETIC)
    ]
    per_image = ", ".join(f"{k}: {n}" for k, n in sorted(found.kept_per_image.items())) or "-"

    def score_row(name: str, hist: ScoreHistogram) -> tuple[Any, ...]:
        stats = (
            [f"{hist.mean:.3f}", *(f"{hist.quantile(q):.3f}" for q in (0.1, 0.5, 0.9))]
            if hist.n
            else ["-"] * 4
        )
        return (name, hist.n, *stats, percent(found.kept_at(found.threshold)[name], hist.n))

    return _section("Rows per fate", _table(["fate", "rows", "%"], fates)) + _section(
        "Kept captions",
        f"<p>{kept} captions kept on {images} images ({kept / images if images else 0:.2f} per image). "
        f"Kept images by number of kept captions: {_e(per_image)}.</p>"
        + _table(["source", "kept captions", "selected as best", "% of kept images"], captions)
        + f"<p>ITM scores of the candidate captions of the {found.scored_images} images that reached the "
        "filter:</p>"
        + _table(
            ["source", "captions", "mean", "p10", "p50", "p90", f">= {found.threshold:g}"],
            [score_row(WEB, found.web), score_row(SYNTHETIC, found.synthetic)],
        ),
    )


def _plots(found: Inspection) -> str:
    grid = np.arange(BINS + 1) / BINS
    curves = {name: [found.retention(t)[name] for t in grid] for name in ("images", "web", "synthetic")}
    retention = _retention_png(found, grid, curves)
    at = [
        (
            f"{t:g}" + (" (this job)" if t == found.threshold else ""),
            *map(_share, found.retention(t).values()),
        )
        for t in sorted({*CURVE_TABLE, found.threshold})
    ]
    return _section(
        "ITM scores and retention",
        f'<img id="histogram" alt="ITM score histograms" src="{_histogram_png(found)}" />'
        f'<img id="retention" alt="retention against threshold" src="{retention}" />'
        + _table(
            ["threshold", "images with a kept caption", "web captions kept", "synthetic captions kept"], at
        )
        + "<p>Shares at each threshold are computed from the stored scores: "
        "<code>capfilt rethreshold</code> writes the output for another threshold without a GPU.</p>",
    )


def _histogram_png(found: Inspection) -> str:
    figure, axes = _figure()
    edges = np.linspace(0, 1, 51)
    for name, hist, colour in ((WEB, found.web, "#36c"), (SYNTHETIC, found.synthetic, "#a5a")):
        counts = hist.counts[:BINS].reshape(50, BINS // 50).sum(axis=1)
        counts[-1] += hist.counts[BINS]  # the scores of exactly 1.0
        axes.stairs(counts, edges, label=f"{name} ({hist.n})", color=colour, linewidth=1.5)
    # Scores pile up near 0 and 1: a log count axis (linear below 1, so empty bins show) keeps the
    # captions in between visible.
    axes.set_yscale("symlog", linthresh=1)
    labels = {"xlabel": "ITM match probability", "ylabel": "captions (log scale)"}
    return _finish(
        figure, axes, found.threshold, "upper center", title="ITM scores of candidate captions", **labels
    )


def _retention_png(found: Inspection, grid: np.ndarray, curves: dict[str, list[float]]) -> str:
    figure, axes = _figure()
    labels = {"images": "images with >= 1 kept caption", "web": "web captions kept",
              "synthetic": "synthetic captions kept"}  # fmt: skip
    for name, colour in (("images", "#2a2"), ("web", "#36c"), ("synthetic", "#a5a")):
        axes.plot(grid, curves[name], label=labels[name], color=colour)
    return _finish(figure, axes, found.threshold, "lower left", xlabel="ITM threshold", ylabel="share kept",
                   title="Retention against threshold", ylim=(0, 1.02))  # fmt: skip


def _figure() -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    figure = Figure(figsize=(6.0, 3.4), dpi=100, layout="constrained")
    return figure, figure.subplots()


def _finish(figure: Any, axes: Any, threshold: float, legend: str, **labels: Any) -> str:
    """Mark the threshold, label the axes and render the figure as a PNG data URI."""
    axes.axvline(threshold, color="#c00", linestyle="--", label=f"threshold {threshold:g}")
    axes.set(xlim=(0, 1), **labels)
    axes.legend(loc=legend)
    return _png(figure)


def _share(value: float) -> str:
    return "-" if np.isnan(value) else f"{100 * value:.1f}%"


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _grid(rows: list[Row], threshold: float, thumbnails: dict[tuple[str, str], str]) -> str:
    if not rows:
        return "<p>No images reached the filter.</p>"
    return '<div class="grid">' + "".join(_card(r, threshold, thumbnails) for r in rows) + "</div>"


def _card(row: Row, threshold: float, thumbnails: dict[tuple[str, str], str]) -> str:
    kept = {(c["text"], c["source"]) for c in row["kept_captions"] or []}
    found = candidates(
        row["web_caption"],
        row["web_caption_itm"],
        row["synthetic_captions"] or [],
        row["synthetic_itm"] or [],
    )
    items = []
    if not any(c.source == WEB for c in found):
        items.append(
            f'<li class="dropped"><span class="src web">web</span>{_e(repr(row["web_caption"] or ""))} '
            "(empty: not scored)</li>"
        )
    for c in found:
        state = "kept" if (c.text, c.source) in kept else "dropped"
        selected = " selected" if c.text == row["caption"] and state == "kept" else ""
        items.append(
            f'<li class="{state}{selected}"><span class="src {c.source}">{c.source}</span>'
            f'<span class="score" title="{c.itm!r}">{c.itm:.3f}</span>{_e(c.text)}</li>'
        )
    image = thumbnails.get((row["shard"], row["key"]))
    picture = (
        f'<img src="{image}" alt="{_e(row["key"])}" />'
        if image
        else '<p class="meta">(image not on disk)</p>'
    )
    size = f"{row['width']}×{row['height']}"
    original = (row.get("original_width"), row.get("original_height"))
    if original[0] and original != (row["width"], row["height"]):
        size += f" (downloaded {original[0]}×{original[1]})"
    return (
        f'<div class="card {row["status"]}">{picture}'
        f'<div class="meta">{_e(row["key"])} · {_e(row["status"])} · {size} · '
        f'threshold {threshold:g}</div><ul class="captions">{"".join(items)}</ul></div>'
    )


def _dropped(found: Inspection, thumbnails: dict[tuple[str, str], str]) -> str:
    order = {fate.value: i for i, fate in enumerate(Fate)}
    groups = sorted(
        found.dropped.items(), key=lambda item: (order[item[0][0]], -_group_size(found, item[0]), item[0][1])
    )
    parts = []
    for (fate, reason), sample in groups:
        size = _group_size(found, (fate, reason))
        title = f"{fate}: {reason} ({size} row{'s' if size != 1 else ''})"
        if (fate, reason) in _WITH_IMAGES:
            content = _grid(sample.rows, found.threshold, thumbnails)
        elif fate == Fate.DUPLICATE_IMAGE:
            content = _table(
                ["key", "url", "web caption", "duplicate of"],
                [(r["key"], r["url"], r["web_caption"], r["duplicate_of"]) for r in sample.rows],
                4,
            )
        else:
            content = _table(
                ["key", "url", "web caption", "error"],
                [(r["key"], r["url"], r["web_caption"], r["error"]) for r in sample.rows],
                4,
            )
        parts.append(f'<h3 class="reason">{_e(title)}</h3>{content}')
    return _section("Dropped, by fate and reason", "".join(parts) or "<p>Nothing was dropped.</p>")


def _group_size(found: Inspection, group: tuple[str, str]) -> int:
    if group == (Fate.FILTERED.value, FILTERED_REASON):
        return found.counts[Fate.FILTERED]
    if group == (Fate.DUPLICATE_IMAGE.value, DUPLICATE_REASON):
        return found.counts[Fate.DUPLICATE_IMAGE]
    if group == (Fate.KEPT.value, WEB_REPLACED):
        return found.web_replaced
    return found.errors[group]


def _breakdowns(found: Inspection) -> str:
    """Rows and kept images by web domain (the top 20), by size as downloaded, by web caption length."""
    b = found.breakdowns
    header = ["rows", "kept", "kept %"]

    def rows(entries: list[tuple[str, int, int]]) -> list[tuple[Any, ...]]:
        return [(key, n, kept, percent(kept, n)) for key, n, kept in entries]

    return _section(
        "Kept, by domain, image size and caption length",
        "<h3>Top web domains by rows</h3>"
        + _table(["domain", *header], rows(b.domains.top(TOP_DOMAINS)))
        + "<h3>By the shorter side of the image as downloaded</h3>"
        + _table(["shorter side", *header], rows(b.sizes.in_order(b.size_order)))
        + "<h3>By the web caption's length</h3>"
        + _table(["web caption", *header], rows(b.caption_words.in_order(b.word_order))),
    )


def _shards(found: Inspection) -> str:
    listed = found.listed_shards()
    rows = [
        (s.name, s.status, s.report["counts"]["kept"], s.report["counts"]["filtered"], s.report["rows"], "")
        if s.report
        else (s.name, s.status, "", "", "", s.error or "not written yet")
        for s in listed
    ]
    note = (
        f"<p>{len(found.shards) - len(listed)} done shards not listed.</p>"
        if len(listed) < len(found.shards)
        else ""
    )
    return _section(
        f"Shards ({len(found.shards)})",
        _table(["shard", "status", "kept", "filtered", "rows", "error"], rows, 2) + note,
    )


def _rows_with_images(found: Inspection) -> list[Row]:
    rows = list(found.samples.rows)
    for group in _WITH_IMAGES:
        if group in found.dropped:
            rows += found.dropped[group].rows
    return rows


def _thumbnails(output: JobOutput, rows: list[Row]) -> dict[tuple[str, str], str]:
    """Data URIs of the rows' images, from the raw shard (every downloaded image) or, when downloads/
    was deleted, from the output shard (kept images only)."""
    wanted: dict[str, set[str]] = {}
    for row in rows:
        wanted.setdefault(row["shard"], set()).add(row["key"])
    found = {}
    for shard, keys in wanted.items():
        images: dict[str, bytes] = {}
        for tar in (output.layout.raw_tar(shard), output.layout.shard_tar(shard)):
            if tar.exists() and keys - set(images):
                images |= read_jpegs(tar, keys - set(images))
        found.update({(shard, key): _thumbnail(data) for key, data in images.items()})
    return found


def _thumbnail(data: bytes) -> str:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
