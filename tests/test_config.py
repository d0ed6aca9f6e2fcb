"""The job spec: the schema and the dataclasses agree, jobs/ validates, errors name the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline import __version__
from pipeline.config import JobSpec, SpecError, job_schema, load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = [f.name for f in dataclasses.fields(JobSpec)]


@pytest.fixture
def url_list(tmp_path) -> str:
    path = tmp_path / "urls.parquet"
    path.write_bytes(b"")
    return str(path)


def minimal(url_list: str, **sections) -> dict:
    raw = {"input": {"url_list": url_list}, "output": {"path": "out"}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


@pytest.mark.parametrize("job", sorted(ROOT.glob("jobs/*.yaml")), ids=lambda p: p.name)
def test_every_example_job_validates_and_loads(job, url_list):
    raw = yaml.safe_load(job.read_text())
    jsonschema.validate(raw, job_schema())
    spec = spec_from_dict(raw, overrides=[f"input.url_list={url_list}"])
    assert spec.output.path == raw["output"]["path"]


def test_schema_and_dataclasses_do_not_drift():
    schema = job_schema()
    assert set(schema["properties"]) == set(SECTIONS)
    assert set(schema["required"]) == {"input", "output"}
    for section in dataclasses.fields(JobSpec):
        fields = {f.name: f for f in dataclasses.fields(_section_class(section.name))}
        props = schema["properties"][section.name]["properties"]
        assert set(fields) == set(props), section.name
        required = {n for n, f in fields.items() if f.default is dataclasses.MISSING}
        assert required == set(schema["properties"][section.name].get("required", [])), section.name
        for name, f in fields.items():
            if f.default is not dataclasses.MISSING:
                default = list(f.default) if isinstance(f.default, tuple) else f.default
                assert props[name]["default"] == default, f"{section.name}.{name}"


def _section_class(name: str) -> type:
    from pipeline import config

    return {"input": config.InputSpec, "download": config.DownloadSpec, "captioner": config.CaptionerSpec,
            "filter": config.FilterSpec, "resources": config.ResourcesSpec, "output": config.OutputSpec}[name]  # fmt: skip


@pytest.mark.parametrize(
    ("sections", "overrides", "message"),
    [
        ({"captioner": {"top_q": 0.9}}, [], "captioner.top_q: unknown key (did you mean 'top_p'?)"),
        ({"captionr": {}}, [], "captionr: unknown key (did you mean 'captioner'?)"),
        ({"filter": {"zzz": 1}}, [], "filter.zzz: unknown key (allowed: batch_size, model, threshold)"),
        ({"captioner": {"num_captions": "three"}}, [], "captioner.num_captions: expected integer, got 'three'"),
        ({"filter": {"threshold": 1.5}}, [], "filter.threshold: 1.5 is greater than the maximum of 1"),
        ({"filter": {"threshold": -0.1}}, [], "filter.threshold: -0.1 is less than the minimum of 0"),
        ({"captioner": {"top_p": 0}}, [], "captioner.top_p: 0 is less than or equal to the minimum of 0"),
        ({"captioner": {"batch_size": -4}}, [], "captioner.batch_size: -4 is less than the minimum of 1"),
        ({"input": {"input_format": "xml"}}, [], "input.input_format: 'xml' is not one of parquet, csv, tsv, jsonl"),
        ({"download": {"allow_private_networks": "yes"}}, [], "download.allow_private_networks: expected boolean"),
        ({}, ["output.shard_size=0"], "output.shard_size: 0 is less than the minimum of 1"),
        ({}, ["captioner.num_captions"], "--set 'captioner.num_captions': expected key.path=value"),
        ({}, ["input.url_list.deeper=1"], "--set input.url_list.deeper: input.url_list is not a section"),
        ({"input": {"url_list": "/nonexistent/urls.parquet"}}, [], "input.url_list: no such file"),
    ],
)  # fmt: skip
def test_spec_errors_are_one_line_and_name_the_key(url_list, sections, overrides, message):
    with pytest.raises(SpecError) as caught:
        spec_from_dict(minimal(url_list, **sections), overrides)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text


def test_missing_required_keys_are_named(url_list):
    with pytest.raises(SpecError, match=r"^output: required key is missing$"):
        spec_from_dict({"input": {"url_list": url_list}})
    with pytest.raises(SpecError, match=r"^output\.path: required key is missing$"):
        spec_from_dict({"input": {"url_list": url_list}, "output": {}})
    with pytest.raises(SpecError, match="mapping"):
        spec_from_dict(["not", "a", "mapping"])


def test_overrides_are_parsed_as_yaml(url_list):
    spec = spec_from_dict(
        minimal(url_list),
        ["captioner.num_captions=3", "download.allow_private_networks=true", "captioner.prompt=a photo of ",
         "resources.actors=2", "download.user_agent_token=null"],
    )  # fmt: skip
    assert spec.captioner.num_captions == 3
    assert spec.download.allow_private_networks is True
    assert spec.captioner.prompt == "a photo of "
    assert spec.resources.actors == 2 and spec.download.user_agent_token is None
    assert spec.filter.threshold == 0.5 and spec.captioner.top_p == 0.9  # defaults filled in


def test_load_spec_names_the_file(tmp_path, url_list):
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(SpecError, match=r"^.*bad\.yaml: not valid YAML: ") as caught:
        load_spec(bad)
    assert "\n" not in str(caught.value)
    with pytest.raises(SpecError, match=r"missing\.yaml: no such job spec file"):
        load_spec(tmp_path / "missing.yaml")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(minimal(url_list, filter={"threshold": 2})))
    with pytest.raises(SpecError, match=r"good\.yaml: filter\.threshold: 2 is greater than the maximum of 1"):
        load_spec(good)


def test_fingerprint_follows_what_decides_the_output(url_list):
    base = spec_from_dict(minimal(url_list))
    same = [
        spec_from_dict(minimal(url_list, resources={"actors": 4, "gpus_per_actor": 0.5})),
        spec_from_dict(minimal(url_list, output={"path": "elsewhere"})),
    ]
    different = [
        spec_from_dict(minimal(url_list, filter={"threshold": 0.6})),
        spec_from_dict(minimal(url_list, captioner={"model": "other/model"})),
        spec_from_dict(minimal(url_list, output={"shard_size": 7})),
    ]
    assert all(s.fingerprint() == base.fingerprint() for s in same)
    assert all(s.fingerprint() != base.fingerprint() for s in different)
    assert different[0].download_fingerprint() == base.download_fingerprint()  # threshold: no redownload
    assert different[2].download_fingerprint() != base.download_fingerprint()


def test_cli_rejects_a_bad_spec_with_exit_2_before_starting_ray(tmp_path, url_list):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(minimal(url_list, captioner={"top_q": 0.9})))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"capfilt: error: {job}: captioner.top_q: unknown key (did you mean 'top_p'?)"
    ]
    assert time.monotonic() - started < 15  # no Ray start, no model load


def test_cli_reports_a_missing_url_column_with_the_columns_found(tmp_path):
    csv = tmp_path / "urls.csv"
    csv.write_text("link,alt\nhttp://127.0.0.1/a.jpg,a cat\n")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"input": {"url_list": str(csv), "input_format": "csv"},
                                   "output": {"path": str(tmp_path / "out")}}))  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"capfilt: error: input.url_col: column 'url' not found in {csv} (columns: link, alt)"
    )


def test_version():
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "--version"], capture_output=True, text=True)
    assert done.stdout.strip() == f"capfilt {__version__}"
