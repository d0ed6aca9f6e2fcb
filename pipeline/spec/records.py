"""The output shard's Arrow schema: the column names and types are a contract with users, versioned
(`SCHEMA_VERSION`, in the schema file, each Parquet file's metadata and the manifest).

`schemas/shard.schema.json` is generated from `SHARD_SCHEMA` (`python -m pipeline.spec.records`) and a
test keeps the checked-in file equal to it. A job with `input.extra_columns` appends one string
column per extra column, named as in the input (`shard_schema`); the fixed columns come first, so a
reader that knows only them reads every job's shards alike.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

KEPT_CAPTION = pa.struct(
    [("text", pa.string()), ("source", pa.string()), ("itm", pa.float32()), ("itc", pa.float32())]
)
EMBEDDING_DTYPE = np.float16  # an image embedding as the actor sends it and the shard stores it
BLIP_EMBEDDING_SIZE = 256  # image_text_hidden_size of Salesforce's BLIP checkpoints


def embedding_type(size: int) -> pa.DataType:
    """An image embedding: a fixed-size list of float16, `size` = the ITM checkpoint's
    `image_text_hidden_size`."""
    return pa.list_(pa.float16(), size)


def _fields(embedding_size: int) -> list[pa.Field]:
    return [
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("web_caption", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("duplicate_of", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("sha256", pa.string()),
        pa.field("pixel_hash", pa.string()),
        pa.field("synthetic_captions", pa.list_(pa.string())),
        pa.field("web_caption_itm", pa.float32()),
        pa.field("synthetic_itm", pa.list_(pa.float32())),
        pa.field("web_caption_itc", pa.float32()),
        pa.field("synthetic_itc", pa.list_(pa.float32())),
        pa.field("kept_captions", pa.list_(KEPT_CAPTION)),
        pa.field("image_embedding", embedding_type(embedding_size)),
    ]


EXTRA_COLUMNS_DOC = (
    "Then one string column per input.extra_columns entry, named as in the input, carried as given "
    "(other types as their text); null where the input had none."
)

COLUMN_DOCS = {
    "key": "Sample key, unique in the job; the WebDataset key of the sample in the tar.",
    "url": "The image URL as given in the input list.",
    "caption": (
        "The training text, as img2dataset's readers take `caption`: the best kept caption (the tar's "
        "KEY.txt); null unless status is kept."
    ),
    "web_caption": (
        "The web caption (alt-text) as given, whole, never normalised; null when the input had none."
    ),
    "status": (
        "The row's fate: kept, filtered, duplicate_image, download_failed, decode_failed, wrong_size, "
        "invalid_input, blocked."
    ),
    "error": (
        "Why the row was not kept: the failure's message, or for filtered its best caption's ITM against "
        "the threshold; null for kept and duplicate_image."
    ),
    "duplicate_of": (
        "For status duplicate_image: the key of the earlier kept row whose image this one repeats (equal "
        "pixel_hash, or ITC embedding cosine >= filter.dedup.near_threshold); null otherwise."
    ),
    "width": "Width in pixels of the image as stored in the tar (after download resizing).",
    "height": "Height in pixels of the image as stored in the tar (after download resizing).",
    "original_width": "Width in pixels of the image as downloaded, before resizing; null unless decoded.",
    "original_height": "Height in pixels of the image as downloaded, before resizing; null unless decoded.",
    "sha256": "SHA-256 of the image bytes as downloaded (before resizing), hex.",
    "pixel_hash": (
        "BLAKE2b-128 of the image's decoded RGB pixels as stored in the tar (its size and every value), "
        "hex: equal for byte copies and for any lossless re-encoding of the same pixels; null unless "
        "decoded."
    ),
    "synthetic_captions": "Captions by the BLIP captioner (nucleus sampling), prompt cut off as a string.",
    "web_caption_itm": (
        "ITM match probability of the web caption, scored as filter.text_normalise and itm_first_token say "
        "(BLIP's pre_caption and [ENC] by default); null when it is empty or absent."
    ),
    "synthetic_itm": "ITM match probability of each synthetic caption, same order.",
    "web_caption_itc": (
        "ITC cosine similarity of the web caption with the image (the ITM checkpoint's vision_proj and "
        "text_proj, normalised), in [-1, 1]; null where web_caption_itm is."
    ),
    "synthetic_itc": "ITC cosine similarity of each synthetic caption, same order.",
    "kept_captions": (
        "Captions with ITM >= threshold that filter.keep keeps, best first by filter.keep.by: "
        "{text, source (web|synthetic), itm, itc}."
    ),
    "image_embedding": (
        "The image's ITC embedding (the ITM checkpoint's vision [CLS] through vision_proj, L2-normalised), "
        "float16, D = the checkpoint's image_text_hidden_size (256 for Salesforce's BLIP); null when not "
        "scored or output.image_embeddings is false."
    ),
}

# Version 1 (until 2026-12-07) named the web text `caption` and the training text `selected_caption`,
# the opposite of what readers of img2dataset's outputs expect of `caption`.
SCHEMA_VERSION = 2
_V1_NAMES = {
    "caption": "web_caption",
    "selected_caption": "caption",
    "caption_itm": "web_caption_itm",
}


def current_names(names: Sequence[str]) -> list[str]:
    """A shard's column names in this schema: a version 1 shard (it has `selected_caption`) renamed."""
    return [_V1_NAMES.get(n, n) for n in names] if "selected_caption" in names else list(names)


def current_record(record: dict) -> dict:
    """A record (a Parquet row or a tar's KEY.json) with this schema's names."""
    return dict(zip(current_names(list(record)), record.values(), strict=True))


def shard_schema(extra_columns: Sequence[str] = (), embedding_size: int = BLIP_EMBEDDING_SIZE) -> pa.Schema:
    """The output shard's schema for a job with these extra input columns and ITM checkpoint."""
    schema = pa.schema(_fields(embedding_size))
    for name in extra_columns:
        schema = schema.append(pa.field(name, pa.string()))
    return schema.with_metadata({"capfilt.shard_schema": str(SCHEMA_VERSION)})


SHARD_SCHEMA = shard_schema()


def describe_schema() -> dict:
    return {
        "title": "capfilt output shard (shards/NNNNN.parquet): one row per input row",
        "version": SCHEMA_VERSION,
        "fields": [
            {
                "name": f.name,
                "type": _type_shown(f),
                "nullable": f.nullable,
                "description": COLUMN_DOCS[f.name],
            }
            for f in SHARD_SCHEMA
        ],
        "extra_columns": EXTRA_COLUMNS_DOC,
    }


def embedding_size_of(schema: pa.Schema) -> int | None:
    """The image embedding's size in a stored shard's schema; None for a shard written before it."""
    if "image_embedding" not in schema.names:
        return None
    return schema.field("image_embedding").type.list_size


def _type_shown(field: pa.Field) -> str:
    return "fixed_size_list<item: halffloat>[D]" if field.name == "image_embedding" else str(field.type)


if __name__ == "__main__":
    json.dump(describe_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
