"""The output contract: the checked-in schema file equals the code, and the columns are DESIGN's."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.spec.fates import Fate
from pipeline.spec.records import COLUMN_DOCS, SHARD_SCHEMA, describe_schema, embedding_size_of, shard_schema

ROOT = Path(__file__).resolve().parent.parent
SHARD_SCHEMA_FILE = ROOT / "schemas" / "shard.schema.json"
COLUMNS = [
    "key", "url", "caption", "web_caption", "status", "error", "duplicate_of", "width", "height", "original_width",
    "original_height", "sha256",
    "pixel_hash", "synthetic_captions", "web_caption_itm", "synthetic_itm", "web_caption_itc", "synthetic_itc",
    "kept_captions", "image_embedding",
]  # fmt: skip


def test_checked_in_shard_schema_equals_the_code():
    assert json.loads(SHARD_SCHEMA_FILE.read_text()) == describe_schema()


def test_checked_in_shard_schema_is_what_python_m_pipeline_records_writes():
    assert SHARD_SCHEMA_FILE.read_text() == json.dumps(describe_schema(), indent=2) + "\n"


def test_columns_are_the_contract_in_order():
    assert SHARD_SCHEMA.names == COLUMNS
    assert [f["name"] for f in describe_schema()["fields"]] == COLUMNS
    assert list(COLUMN_DOCS) == COLUMNS


@pytest.mark.parametrize(
    ("column", "arrow_type", "nullable"),
    [
        ("key", pa.string(), False),
        ("status", pa.string(), False),
        ("url", pa.string(), True),
        ("caption", pa.string(), True),
        ("error", pa.string(), True),
        ("width", pa.int32(), True),
        ("height", pa.int32(), True),
        ("sha256", pa.string(), True),
        ("synthetic_captions", pa.list_(pa.string()), True),
        ("web_caption", pa.string(), True),
        ("web_caption_itm", pa.float32(), True),
        ("synthetic_itm", pa.list_(pa.float32()), True),
        ("kept_captions", pa.list_(pa.struct([("text", pa.string()), ("source", pa.string()), ("itm", pa.float32()), ("itc", pa.float32())])), True),
        ("web_caption_itc", pa.float32(), True),
        ("synthetic_itc", pa.list_(pa.float32()), True),
        ("image_embedding", pa.list_(pa.float16(), 256), True),
    ],
)  # fmt: skip
def test_column_types(column, arrow_type, nullable):
    field = SHARD_SCHEMA.field(column)
    assert field.type == arrow_type
    assert field.nullable is nullable


def test_the_status_column_documents_every_fate():
    assert all(f.value in COLUMN_DOCS["status"] for f in Fate)


def test_every_job_spec_key_is_documented():
    from pipeline.spec.config import job_schema

    doc = (ROOT / "docs" / "job-spec.md").read_text()
    for section, body in job_schema()["properties"].items():
        for key in body["properties"]:
            assert f"`{section}.{key}`" in doc, f"{section}.{key} is not in docs/job-spec.md"


def test_extra_columns_are_strings_after_the_fixed_columns():
    schema = shard_schema(["source", "licence"])
    assert schema.names == [*COLUMNS, "source", "licence"]
    assert schema.field("licence").type == pa.string() and schema.field("licence").nullable
    assert shard_schema() == SHARD_SCHEMA
    # the embedding's size is the ITM checkpoint's (tiny models have small ones)
    assert shard_schema([], 32).field("image_embedding").type == pa.list_(pa.float16(), 32)
    assert embedding_size_of(shard_schema([], 32)) == 32 and embedding_size_of(pa.schema([])) is None
    assert "extra_columns" in describe_schema()["extra_columns"]
