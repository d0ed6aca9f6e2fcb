"""Stage 3: write output shard i from raw shard i and its scores.

Here every input row gets its one fate (from the policy verdict, img2dataset's status, the decode
result, the keep rule, or the dedup decision it is given), so this is the one place rows can be lost,
and it refuses to be:
a downloaded row without scores is an error, not a silent drop. The tar (kept samples only) and
the Parquet (every row) are written whole (`Location.writing`: renamed into place on POSIX, one
object on an object store); the report, the completion marker, goes last.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from pipeline.core.resources import Resources
from pipeline.core.storage import read_parquet
from pipeline.core.tars import read_jpegs
from pipeline.curate.chunks import Chunk
from pipeline.curate.decide import Candidate, candidates, decide
from pipeline.curate.dedup import KeptImage
from pipeline.ingest.download import DOWNLOADED, OPT_OUT_ERROR, UNDECODABLE
from pipeline.ingest.fetch_guard import BLOCKED
from pipeline.ingest.image_guard import SIZE_RULES
from pipeline.ingest.url_list import CAPTION, ERROR, FATE, URL, extra_column, extra_names
from pipeline.spec.config import CAPFILT_KEEP, JobSpec, KeepSpec
from pipeline.spec.fates import Fate, count_fates
from pipeline.spec.layout import OutputLayout, write_json_atomically
from pipeline.spec.records import BLIP_EMBEDDING_SIZE, EMBEDDING_DTYPE, current_record, shard_schema

Record = dict[str, Any]

# A fixed member time: a shard is then a pure function of its raw shard, scores and spec, byte for byte.
_TAR_MTIME = 0.0


@dataclass(frozen=True)
class Scores:
    """What the CapFilt actor returned for one downloaded row."""

    decode_error: str
    synthetic_captions: list[str]
    web_itm: float | None
    synthetic_itm: list[float]
    web_itc: float | None = None
    synthetic_itc: list[float] | None = None  # None: not scored (a shard written before ITC)
    image_embedding: np.ndarray | None = None  # float16
    pixel_hash: str | None = None  # `dedup.pixel_hash` of the decoded image
    web_caption: str | None = None  # the web caption that was scored, for deciding before writing


def scores_by_key(chunks: Iterable[Chunk]) -> dict[str, Scores]:
    """The CapFilt actor's results, by sample key."""
    found = {}
    for c in chunks:
        for i, key in enumerate(c["keys"]):
            embedding = c["image_embedding"][i]
            found[key] = Scores(
                decode_error=str(c["decode_errors"][i]),
                synthetic_captions=[str(t) for t in c["synthetic_captions"][i]],
                web_itm=_scored(c["web_itm"][i]),
                synthetic_itm=[_as_stored(s) for s in c["synthetic_itm"][i]],
                web_itc=_scored(c["web_itc"][i]),
                synthetic_itc=[_as_stored(s) for s in c["synthetic_itc"][i]],
                image_embedding=np.frombuffer(embedding, EMBEDDING_DTYPE) if embedding else None,
                pixel_hash=c["pixel_hashes"][i] or None,
                web_caption=c["captions"][i],
            )
    return found


def scores_from_records(records: Iterable[Record]) -> dict[str, Scores]:
    """The scores an output shard stores, by key: what rethreshold and retry-failed write a shard from
    again, through the same `ShardWriter` as the job, instead of running the models again."""
    found = {}
    for r in map(current_record, records):  # a shard of schema 1 too
        if r["status"] in (Fate.KEPT, Fate.FILTERED, Fate.DUPLICATE_IMAGE):
            found[r["key"]] = Scores(
                decode_error="",
                synthetic_captions=r["synthetic_captions"],
                web_itm=r["web_caption_itm"],
                synthetic_itm=r["synthetic_itm"],
                web_itc=r.get("web_caption_itc"),
                synthetic_itc=r.get("synthetic_itc"),
                image_embedding=_embedding(r.get("image_embedding")),
                pixel_hash=r.get("pixel_hash"),
                web_caption=r["web_caption"],
            )
        elif r["status"] == Fate.DECODE_FAILED:  # the writer asks only for rows img2dataset downloaded
            found[r["key"]] = Scores(r["error"], [], None, [])
    return found


def stored_kept_images(parquet: Any) -> list[KeptImage]:
    """The kept rows of a written shard (its Parquet, a `Location`), as dedup's originals."""
    table = read_parquet(parquet, columns=["key", "status", "pixel_hash", "image_embedding"])
    return kept_images_of(table.to_pylist())


def kept_images_of(records: Iterable[Record]) -> list[KeptImage]:
    """The kept rows among a shard's records, as dedup's originals."""
    return [
        KeptImage(r["key"], r["pixel_hash"], _embedding(r["image_embedding"]))
        for r in records
        if r["status"] == Fate.KEPT
    ]


def _embedding(stored: list[float] | None) -> np.ndarray | None:
    return None if stored is None else np.asarray(stored, EMBEDDING_DTYPE)


def _scored(score: float | None) -> float | None:
    return None if score is None or math.isnan(score) else _as_stored(score)


def _as_stored(score: float) -> float:
    """The score as the Parquet stores it (float32), so the keep rule decides on the stored value and
    deciding again from the Parquet gives the same answer."""
    return float(np.float32(score))


@dataclass(frozen=True)
class ShardWriter:
    layout: OutputLayout
    threshold: float
    fingerprint: str
    keep: KeepSpec = CAPFILT_KEEP
    embedding_size: int = BLIP_EMBEDDING_SIZE  # the ITM checkpoint's; fixes the column's type
    keep_embeddings: bool = True  # output.image_embeddings
    resources: ClassVar[Resources] = Resources(cpus=0.5)

    @classmethod
    def of(cls, spec: JobSpec, layout: OutputLayout, embedding_size: int) -> ShardWriter:
        """The writer of a job's shards into `layout`: its keep rule, fingerprint and embeddings."""
        f = spec.filter
        return cls(
            layout, f.threshold, spec.fingerprint(), f.keep, embedding_size, spec.output.image_embeddings
        )

    def kept_images(self, scores: Mapping[str, Scores]) -> list[KeptImage]:
        """The scored rows the keep rule keeps, in input (key) order: what dedup decides over."""
        return [
            KeptImage(key, s.pixel_hash, s.image_embedding)
            for key, s in sorted(scores.items())
            if not s.decode_error and decide(self._candidates(s.web_caption, s), self.threshold, self.keep)[0]
        ]

    def write(
        self, shard: str, scores: Mapping[str, Scores], duplicates: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Write the shard and return its report (also written as the completion marker).
        `duplicates` is dedup's decision: {key: the key whose image it repeats}."""
        duplicates = duplicates or {}
        # A rewrite in place (retry-failed) first takes the old marker away: interrupted, the shard
        # is unfinished, not "done" with the old counts over new files.
        self.layout.shard_report(shard).unlink(missing_ok=True)
        table = read_parquet(self.layout.raw_parquet(shard))
        raw = table.to_pylist()
        records = sorted(
            (self.record(row, scores.get(row["key"]), duplicates.get(row["key"])) for row in raw),
            key=lambda r: r["key"],
        )
        kept = {r["key"]: r for r in records if r["status"] == Fate.KEPT}
        self.layout.shards.mkdir()
        if kept:
            self._write_tar(shard, kept)
        else:  # no tar: an empty one trips readers that infer types from a first tar (`datasets`)
            self.layout.shard_tar(shard).unlink(missing_ok=True)
        with self.layout.shard_parquet(shard).writing() as stream:
            schema = shard_schema(extra_names(table.schema.names), self.embedding_size)
            pq.write_table(pa.Table.from_pylist(records, schema=schema), stream)
        report = {
            "shard": shard,
            "fingerprint": self.fingerprint,
            "rows": len(records),
            "counts": count_fates(r["status"] for r in records),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json_atomically(self.layout.shards / f"{shard}_stats.json", img2dataset_stats(report))
        write_json_atomically(self.layout.shard_report(shard), report)
        return report

    def record(self, row: dict[str, Any], scores: Scores | None, duplicate_of: str | None = None) -> Record:
        """The output row of one input row: its fate, error and, when downloaded, its scores."""
        record: Record = {
            "key": row["key"],
            "url": row[URL],
            "caption": None,
            "web_caption": row[CAPTION],
            "status": None,
            "error": None,
            "duplicate_of": None,
            "width": None,
            "height": None,
            "original_width": None,
            "original_height": None,
            "sha256": None,
            "pixel_hash": None,
            "synthetic_captions": None,
            "web_caption_itm": None,
            "synthetic_itm": None,
            "web_caption_itc": None,
            "synthetic_itc": None,
            "kept_captions": None,
            "image_embedding": None,
            # The input's extra columns, after the fixed ones, under their input names.
            **{name: row[extra_column(name)] for name in extra_names(row)},
        }
        status = row["status"]
        if row[FATE]:
            return {**record, "status": Fate(row[FATE]).value, "error": row[ERROR]}
        if status == UNDECODABLE:
            error = row["error_message"] or ""
            fate = Fate.WRONG_SIZE if error.startswith(SIZE_RULES) else Fate.DECODE_FAILED
            return {**record, "status": fate.value, "error": error}
        if status != DOWNLOADED:
            error = row["error_message"] or status
            if error == OPT_OUT_ERROR:
                return {**record, "status": Fate.BLOCKED.value, "error": f"opt-out: {error}"}
            fate = Fate.BLOCKED if error.startswith(BLOCKED) else Fate.DOWNLOAD_FAILED
            return {**record, "status": fate.value, "error": error}
        if scores is None:
            raise RuntimeError(f"row {row['key']} was downloaded but never scored")
        record.update(
            width=row["width"],
            height=row["height"],
            original_width=row["original_width"],
            original_height=row["original_height"],
            sha256=row["sha256"],
        )
        if scores.decode_error:
            return {**record, "status": Fate.DECODE_FAILED.value, "error": scores.decode_error}
        found = self._candidates(row[CAPTION], scores)
        kept, selected = decide(found, self.threshold, self.keep)
        fate = Fate.KEPT if kept else Fate.FILTERED
        if kept and duplicate_of:
            fate, selected = Fate.DUPLICATE_IMAGE, None  # scored and kept, then a copy: not trained on
        embedding = scores.image_embedding if self.keep_embeddings else None
        return {
            **record,
            "caption": selected,
            "status": fate.value,
            "error": self._why_filtered(found) if fate == Fate.FILTERED else None,
            "duplicate_of": duplicate_of if fate == Fate.DUPLICATE_IMAGE else None,
            "pixel_hash": scores.pixel_hash,
            "synthetic_captions": scores.synthetic_captions,
            "web_caption_itm": scores.web_itm,
            "synthetic_itm": scores.synthetic_itm,
            "web_caption_itc": scores.web_itc,
            "synthetic_itc": scores.synthetic_itc,
            "kept_captions": [{"text": c.text, "source": c.source, "itm": c.itm, "itc": c.itc} for c in kept],
            "image_embedding": embedding,
        }

    def _why_filtered(self, found: list[Candidate]) -> str:
        """A filtered row's reason: its best caption's ITM probability against the threshold."""
        if not found:
            return "no caption to score (no web caption, no synthetic caption)"
        best = max(found, key=lambda c: c.itm)
        return f"best caption ITM {best.itm:.3f} < filter.threshold {self.threshold:g} ({best.source})"

    def _candidates(self, web_caption: str | None, scores: Scores) -> list[Candidate]:
        """One scored row's candidate captions, the web one first."""
        return candidates(
            web_caption,
            scores.web_itm,
            scores.synthetic_captions,
            scores.synthetic_itm,
            scores.web_itc,
            scores.synthetic_itc,
        )

    def _write_tar(self, shard: str, kept: Mapping[str, Record]) -> None:
        """KEY.jpg (the downloaded bytes, untouched), KEY.json (`sample_record`), KEY.txt (the caption)."""
        images = read_jpegs(self.layout.raw_tar(shard), kept)
        target = self.layout.shard_tar(shard)
        with target.writing() as stream, wds.TarWriter(stream, mtime=_TAR_MTIME) as sink:
            for key, record in kept.items():
                sample = json.dumps(sample_record(record)).encode()
                sink.write(
                    {"__key__": key, "jpg": images[key], "json": sample, "txt": record["caption"].encode()}
                )


# Null in some kept rows and not in others: a reader that types the JSON from its first samples
# (`datasets`' webdataset builder reads 5) would type them null and fail on the first value.
_ONLY_IN_PARQUET = ("error", "duplicate_of", "web_caption_itm", "web_caption_itc", "image_embedding")


def sample_record(record: Record) -> Record:
    """What a kept row's KEY.json holds: its record with every field typed the same in every sample.
    Left out, as the Parquet holds them: `error` and `duplicate_of` (null for a kept row), the web
    caption's scores (null when it is blank; a kept web caption's are in `kept_captions`) and the
    embedding (its 512 bytes of float16 are about 4.8 KB as JSON numbers). A string the input did not
    have is "" (`web_caption`, extra columns)."""
    return {k: "" if v is None else v for k, v in record.items() if k not in _ONLY_IN_PARQUET}


def img2dataset_stats(report: dict[str, Any]) -> dict[str, Any]:
    """`shards/NNNNN_stats.json` in img2dataset's form (its `successes` are the samples in the tar),
    for the readers of img2dataset outputs that count samples from it, with capfilt's fates beside.
    No times (img2dataset's have them): the shard's files are a function of its data, byte for byte;
    the report holds when it was written."""
    counts = report["counts"]
    return {
        "count": report["rows"],
        "successes": counts[Fate.KEPT],
        "failed_to_download": counts[Fate.DOWNLOAD_FAILED]
        + counts[Fate.BLOCKED]
        + counts[Fate.INVALID_INPUT],
        "failed_to_resize": counts[Fate.DECODE_FAILED] + counts[Fate.WRONG_SIZE],
        "filtered": counts[Fate.FILTERED],
        "duplicates": counts[Fate.DUPLICATE_IMAGE],
        "status_dict": counts,
    }
