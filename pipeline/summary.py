"""The end-of-run table: rows per fate, shards per status, where the output is."""

from __future__ import annotations

from typing import Any

from pipeline.manifest import DONE, FAILED, PENDING


def format_summary(manifest: dict[str, Any], output: str) -> str:
    total = manifest["input_rows"]
    lines = [f"{'fate':<16}{'rows':>10}{'%':>8}"]
    for fate, n in manifest["counts"].items():
        lines.append(f"{fate:<16}{n:>10}{100 * n / total if total else 0:>8.1f}")
    lines.append(f"{'input rows':<16}{total:>10}")
    by_status = {s: sum(1 for x in manifest["shards"] if x["status"] == s) for s in (DONE, FAILED, PENDING)}
    lines.append("shards: " + ", ".join(f"{n} {s}" for s, n in by_status.items()))
    for shard in manifest["shards"]:
        if shard["status"] != DONE:
            lines.append(f"  shard {shard['shard']}: {shard['status']}: {shard.get('error') or ''}")
    lines.append(f"output: {output}/shards (manifest: {output}/manifest.json)")
    if not manifest["complete"]:
        lines.append("the job is not complete: run it again to resume (finished shards are kept)")
    return "\n".join(lines)
