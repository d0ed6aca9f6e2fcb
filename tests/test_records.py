"""The output contract: the checked-in schema file equals the code, and the columns are DESIGN's."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.records import SHARD_SCHEMA, describe_schema

ROOT = Path(__file__).resolve().parent.parent


def test_checked_in_shard_schema_equals_the_code():
    assert json.loads((ROOT / "schemas" / "shard.schema.json").read_text()) == describe_schema()


def test_columns_are_the_contract():
    assert SHARD_SCHEMA.names == [
        "key", "url", "caption", "status", "error", "width", "height", "sha256",
        "synthetic_captions", "caption_itm", "synthetic_itm", "kept_captions", "selected_caption",
    ]  # fmt: skip


def test_every_job_spec_key_is_documented():
    from pipeline.config import job_schema

    doc = (ROOT / "docs" / "job-spec.md").read_text()
    for section, body in job_schema()["properties"].items():
        for key in body["properties"]:
            assert f"`{section}.{key}`" in doc, f"{section}.{key} is not in docs/job-spec.md"
