"""The end-of-run table: rows per fate, shards per status, where the output is."""

from __future__ import annotations

from typing import Any

from pipeline.output.manifest import DONE, FAILED, PENDING


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def fate_table(rows: list[tuple[str, int]], input_rows: int) -> list[str]:
    """Rows per fate (and any extra line, such as rows not written yet) with their share of the input.
    The one fate table: `capfilt run`, `rethreshold`, `retry-failed` and `inspect` print it."""
    lines = [f"{'fate':<18}{'rows':>10}{'%':>8}"]
    lines += [f"{fate:<18}{n:>10}{percent(n, input_rows):>8}" for fate, n in rows]
    lines.append(f"{'input rows':<18}{input_rows:>10}")
    return lines


def duplicates_line(duplicate_urls: int) -> str:
    """Every row is its own sample; this line says how many repeat a URL (the manifest's count)."""
    return f"duplicate URLs: {duplicate_urls} rows repeat an earlier row's URL (each downloaded and scored)"


def format_summary(manifest: dict[str, Any], output: str) -> str:
    lines = fate_table(list(manifest["counts"].items()), manifest["input_rows"])
    if manifest.get("duplicate_urls"):
        lines.append(duplicates_line(manifest["duplicate_urls"]))
    by_status = {s: sum(1 for x in manifest["shards"] if x["status"] == s) for s in (DONE, FAILED, PENDING)}
    lines.append("shards: " + ", ".join(f"{n} {s}" for s, n in by_status.items()))
    for shard in manifest["shards"]:
        if shard["status"] != DONE:
            lines.append(f"  shard {shard['shard']}: {shard['status']}: {shard.get('error') or ''}")
    lines.append(f"output: {output}/shards (manifest: {output}/manifest.json)")
    if not manifest["complete"]:
        lines.append("the job is not complete: run it again to resume (finished shards are kept)")
    return "\n".join(lines)
