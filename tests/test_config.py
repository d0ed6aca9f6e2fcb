"""The job spec: the schema and the dataclasses agree, jobs/ validates, errors name the key."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipeline import __version__
from pipeline.spec.config import (
    CaptionerSpec,
    DedupSpec,
    DownloadSpec,
    JobSpec,
    KeepSpec,
    SpecError,
    load_spec,
    spec_from_dict,
    typed_spec,
)
from tests.s3 import new_bucket

ROOT = Path(__file__).resolve().parent.parent
JOBS = sorted(ROOT.glob("jobs/*.yaml"))
SCHEMA = json.loads((ROOT / "schemas" / "job.schema.json").read_text())
SECTION_CLASSES: dict[str, type] = typing.get_type_hints(JobSpec)  # section name -> its dataclass
DROP = object()  # in a case's sections: remove this section or key from the minimal spec


@pytest.fixture
def url_list(tmp_path) -> str:
    path = tmp_path / "urls.parquet"
    path.write_bytes(b"")  # spec_from_dict only checks that the file exists
    return str(path)


def build(url_list: str, sections: dict[str, Any] | None = None) -> dict[str, Any]:
    """A minimal valid spec with `sections` merged in, key by key (DROP removes)."""
    raw: dict[str, Any] = {"input": {"url_list": url_list}, "output": {"path": "out"}}
    for name, body in (sections or {}).items():
        if body is DROP:
            raw.pop(name, None)
        elif isinstance(body, dict) and isinstance(raw.get(name), dict):
            raw[name] = {k: v for k, v in {**raw[name], **body}.items() if v is not DROP}
        else:
            raw[name] = body
    return raw


def has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


# --- jobs/ ---------------------------------------------------------------------------------------


def test_the_jobs_directory_has_examples():
    assert {p.name for p in JOBS} >= {"cc3m.yaml", "local-tiny.yaml"}


def test_the_job_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_every_example_job_validates_and_loads(job, tmp_path):
    raw = yaml.safe_load(job.read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(raw)
    exists = Path(raw["input"]["url_list"]).is_file()
    url_list = tmp_path / Path(raw["input"]["url_list"]).name  # a stand-in of the same name and format
    url_list.write_bytes(b"")
    url_list = str(url_list)
    spec = spec_from_dict(raw, overrides=[] if exists else [f"input.url_list={url_list}"])
    loaded = spec.to_dict()
    for section, body in raw.items():
        for key, value in body.items():
            if (section, key) != ("input", "url_list") or exists:
                assert loaded[section][key] == value, f"{job.name}: {section}.{key}"
    assert spec.input.url_list == (raw["input"]["url_list"] if exists else url_list)


# --- schema <-> dataclasses ------------------------------------------------------------------------


def test_sections_are_the_schema_properties_and_required_ones_have_no_default():
    fields = dataclasses.fields(JobSpec)
    assert {f.name for f in fields} == set(SCHEMA["properties"])
    assert {f.name for f in fields if not has_default(f)} == set(SCHEMA["required"])
    assert SCHEMA["additionalProperties"] is False


@pytest.mark.parametrize("section", sorted(SCHEMA["properties"]))
def test_section_fields_and_defaults_do_not_drift(section):
    body = SCHEMA["properties"][section]
    props = body["properties"]
    fields = {f.name: f for f in dataclasses.fields(SECTION_CLASSES[section])}
    assert set(fields) == set(props)
    assert {n for n, f in fields.items() if not has_default(f)} == set(body.get("required", []))
    assert {n for n, f in fields.items() if has_default(f)} == {n for n, p in props.items() if "default" in p}
    assert body["additionalProperties"] is False
    for name, f in fields.items():
        if dataclasses.is_dataclass(f.default):  # a nested section (filter.keep): its fields, the same way
            nested = {g.name: g.default for g in dataclasses.fields(f.default)}
            assert nested == props[name]["default"] and set(nested) == set(props[name]["properties"])
            assert all(props[name]["properties"][n]["default"] == d for n, d in nested.items())
            assert props[name]["additionalProperties"] is False
        elif f.default is not dataclasses.MISSING:
            default = list(f.default) if isinstance(f.default, tuple) else f.default
            assert props[name]["default"] == default, f"{section}.{name}"
            assert type(props[name]["default"]) is type(default), f"{section}.{name}"
            jsonschema.Draft202012Validator(props[name]).validate(props[name]["default"])


def test_a_minimal_spec_gets_every_default(url_list):
    spec = typed_spec(build(url_list))
    for section, cls in SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            if has_default(f):
                expected = SCHEMA["properties"][section]["properties"][f.name]["default"]
                assert spec.to_dict()[section][f.name] == expected, f"{section}.{f.name}"
    assert isinstance(spec.download.disallowed_header_directives, tuple)
    # To run, the format is settled from the list's name (urls.parquet), and the spec records it.
    assert spec.input.input_format is None and spec_from_dict(build(url_list)).input.input_format == "parquet"


# --- one-line errors that name the key -------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "overrides", "message"),
    [
        ({"captioner": {"top_q": 0.9}}, [], "captioner.top_q: unknown key (did you mean 'top_p'?)"),
        ({"captionr": {}}, [], "captionr: unknown key (did you mean 'captioner'?)"),
        ({"zzz": {}}, [], "zzz: unknown key (allowed: captioner, download, filter, input, output, resources)"),
        ({"filter": {"zzz": 1}}, [], "filter.zzz: unknown key (allowed: batch_size, dedup, itm_first_token, keep, max_words, model, text_normalise, threshold)"),
        ({}, ["download.thread_cont=4"], "--set download.thread_cont=4: unknown key (did you mean 'thread_count'?)"),
        ({"captioner": {"num_captions": "three"}}, [], "captioner.num_captions: expected integer, got 'three'"),
        ({"captioner": {"num_captions": True}}, [], "captioner.num_captions: expected integer, got True"),
        ({"download": {"allow_private_networks": "yes"}}, [], "download.allow_private_networks: expected boolean, got 'yes'"),
        ({"input": {"caption_col": 5}}, [], "input.caption_col: expected string or null, got 5"),
        ({"download": {"disallowed_header_directives": ["noai", 1]}}, [], "download.disallowed_header_directives.1: expected string, got 1"),
        ({"captioner": 3}, [], "captioner: expected object, got 3"),
        ({"download": None}, [], "download: expected object, got None"),
        ({}, ["filter.threshold=high"], "--set filter.threshold=high: expected number, got 'high'"),
        ({"filter": {"threshold": 1.5}}, [], "filter.threshold: 1.5 is greater than the maximum of 1"),
        ({"filter": {"threshold": -0.1}}, [], "filter.threshold: -0.1 is less than the minimum of 0"),
        ({"captioner": {"top_p": 0}}, [], "captioner.top_p: 0 is less than or equal to the minimum of 0"),
        ({"captioner": {"top_p": 1.01}}, [], "captioner.top_p: 1.01 is greater than the maximum of 1"),
        ({"captioner": {"batch_size": -4}}, [], "captioner.batch_size: -4 is less than the minimum of 1"),
        ({"filter": {"batch_size": 0}}, [], "filter.batch_size: 0 is less than the minimum of 1"),
        ({"download": {"thread_count": 0}}, [], "download.thread_count: 0 is less than the minimum of 1"),
        ({"download": {"timeout": 0}}, [], "download.timeout: 0 is less than or equal to the minimum of 0"),
        ({"download": {"image_size": 8}}, [], "download.image_size: 8 is less than the minimum of 16"),
        ({"resources": {"actors": 0}}, [], "resources.actors: 0 is less than the minimum of 1"),
        ({"resources": {"gpus_per_actor": 0}}, [], "resources.gpus_per_actor: 0 is less than or equal to the minimum of 0"),
        ({}, ["output.shard_size=0"], "--set output.shard_size=0: 0 is less than the minimum of 1"),
        ({"input": {"input_format": "xml"}}, [], "input.input_format: 'xml' is not one of parquet, csv, tsv, jsonl, null (the default)"),
        ({"download": {"resize_mode": "stretch"}}, [], "download.resize_mode: 'stretch' is not one of no, keep_ratio, keep_ratio_largest, center_crop, border"),
        ({"output": {"path": DROP}}, [], "output.path: required key is missing"),
        ({"output": DROP}, [], "output: required key is missing"),
        ({"input": {"url_list": DROP}}, [], "input.url_list: required key is missing"),
        ({"input": {"url_list": ""}}, [], "input.url_list: "),
        ({"input": {"url_list": "/nonexistent/urls.parquet"}}, [], "input.url_list: no such file: /nonexistent/urls.parquet"),
        ({}, ["input.url_list=/nonexistent/other.csv"], "input.url_list: no such file: /nonexistent/other.csv"),
        ({}, ["captioner.num_captions"], "--set 'captioner.num_captions': expected key.path=value"),
        ({}, ["=3"], "--set '=3': expected key.path=value"),
        ({}, ["input.url_list.deeper=1"], "--set input.url_list.deeper: input.url_list is not a section"),
    ],
)  # fmt: skip
def test_spec_errors_are_one_line_and_start_with_the_key(url_list, sections, overrides, message):
    with pytest.raises(SpecError) as caught:
        spec_from_dict(build(url_list, sections), overrides)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(message), text


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (["not", "a", "mapping"], "the spec must be a mapping of sections, not list"),
        ("input: x", "the spec must be a mapping of sections, not str"),
        (None, "the spec must be a mapping of sections, not NoneType"),
        (42, "the spec must be a mapping of sections, not int"),
    ],
)
def test_a_spec_that_is_not_a_mapping_is_refused(raw, message):
    with pytest.raises(SpecError) as caught:
        spec_from_dict(raw)
    assert str(caught.value) == message


# --- --set overrides -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "path", "expected"),
    [
        ("captioner.num_captions=3", "captioner.num_captions", 3),
        ("download.allow_private_networks=true", "download.allow_private_networks", True),
        ("download.allow_private_networks=false", "download.allow_private_networks", False),
        ("filter.threshold=0.25", "filter.threshold", 0.25),
        ("filter.model=org/my-itm", "filter.model", "org/my-itm"),
        ("output.path=out dir/run 1", "output.path", "out dir/run 1"),
        ("captioner.prompt=a photo of ", "captioner.prompt", "a photo of "),  # the trailing space is kept
        ("captioner.prompt='quoted '", "captioner.prompt", "quoted "),
        ("download.user_agent_token=capfilt", "download.user_agent_token", "capfilt"),
        ("download.user_agent_token=null", "download.user_agent_token", None),
        ("resources.actors=null", "resources.actors", None),
        ("resources.actors=2", "resources.actors", 2),
        ("download.disallowed_header_directives=[noai, noindex]", "download.disallowed_header_directives", ("noai", "noindex")),
        ("input.caption_col=null", "input.caption_col", None),
    ],
)  # fmt: skip
def test_overrides_are_parsed_as_yaml(url_list, override, path, expected):
    spec = spec_from_dict(build(url_list), [override])
    section, key = path.split(".")
    value = getattr(getattr(spec, section), key)
    assert value == expected
    assert type(value) is type(expected)


def test_an_override_creates_a_missing_section_with_defaults(url_list):
    raw = build(url_list)
    assert "captioner" not in raw
    spec = spec_from_dict(raw, ["captioner.seed=7"])
    assert spec.captioner == CaptionerSpec(seed=7)
    assert spec.download == DownloadSpec()
    assert "captioner" not in raw  # the caller's dict is not changed


def test_the_last_override_wins_over_the_file_and_earlier_overrides(url_list):
    raw = build(url_list, {"filter": {"threshold": 0.9}})
    spec = spec_from_dict(raw, ["filter.threshold=0.1", "filter.threshold=0.3"])
    assert spec.filter.threshold == 0.3
    assert raw["filter"]["threshold"] == 0.9


def test_an_override_that_looks_like_a_date_is_a_string(url_list):
    assert spec_from_dict(build(url_list), ["output.path=2024-01-01"]).output.path == "2024-01-01"


@pytest.mark.parametrize("override", ["filter.threshold=.nan", "captioner.top_p=.nan"])
def test_nan_is_not_a_valid_number(url_list, override):
    with pytest.raises(SpecError, match=override.split("=")[0]):
        spec_from_dict(build(url_list), [override])


@pytest.mark.parametrize("override", ["captioner.batch_size=64.0", "captioner.num_captions=3.0"])
def test_an_integer_key_gets_an_int(url_list, override):
    key, _, _ = override.partition("=")
    try:
        spec = spec_from_dict(build(url_list), [override])
    except SpecError as err:
        assert str(err).startswith(f"--set {override}: expected integer")
    else:
        section, name = key.split(".")
        assert type(getattr(getattr(spec, section), name)) is int


# --- load_spec on a file ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("input: [unclosed\n", "not valid YAML: "),
        ("input:\n  url_list: a\n bad: indent\n", "not valid YAML: "),
        ("", "input: required key is missing"),
        ("- a\n- b\n", "the spec must be a mapping of sections, not list"),
        ("input: {url_list: /nonexistent/u.parquet}\noutput: {path: o}\n", "input.url_list: no such file: /nonexistent/u.parquet"),
        ("input: {url_list: URLS}\noutput: {path: o}\nfilter: {threshold: 2}\n", "filter.threshold: 2 is greater than the maximum of 1"),
    ],
)  # fmt: skip
def test_load_spec_errors_name_the_file(tmp_path, url_list, text, message):
    spec = tmp_path / "job.yaml"
    spec.write_text(text.replace("URLS", url_list))
    with pytest.raises(SpecError) as caught:
        load_spec(spec)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"{spec}: {message}")


def test_load_spec_on_a_missing_file(tmp_path):
    with pytest.raises(SpecError) as caught:
        load_spec(tmp_path / "missing.yaml")
    assert str(caught.value) == f"{tmp_path / 'missing.yaml'}: no such job spec file"


def test_load_spec_reads_a_good_file_and_applies_overrides(tmp_path, url_list):
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(build(url_list, {"filter": {"threshold": 0.7}})))
    spec = load_spec(spec_file, ["captioner.num_captions=4"])
    assert (spec.filter.threshold, spec.captioner.num_captions, spec.input.url_list) == (0.7, 4, url_list)


def test_load_spec_on_a_binary_file(tmp_path):
    spec_file = tmp_path / "job.yaml"
    spec_file.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(SpecError, match=r"job\.yaml: "):
        load_spec(spec_file)


# --- the CLI, in fresh processes run side by side ----------------------------------------------------
# Each process costs ~1.5 s of CPU (the CLI imports the runner, hence Ray and torch), so the table is
# short; the messages themselves are covered in-process above.

CLI_CASES = {
    # id: (spec text, extra args, the one stderr line (prefix))
    "unknown-key": ("input: {url_list: URLS}\noutput: {path: OUT}\ncaptioner: {top_q: 0.9}\n", [],
                    "capfilt: error: JOB: captioner.top_q: unknown key (did you mean 'top_p'?)"),
    "set-without-equals": ("input: {url_list: URLS}\noutput: {path: OUT}\n", ["--set", "captioner.num_captions"],
                           "capfilt: error: --set 'captioner.num_captions': expected key.path=value"),
    "set-typo": ("input: {url_list: URLS}\noutput: {path: OUT}\n", ["--set", "filter.treshold=0.6"],
                 "capfilt: error: --set filter.treshold=0.6: unknown key (did you mean 'threshold'?)"),
    "missing-url-column": ("input: {url_list: CSV, input_format: csv}\noutput: {path: OUT}\n", [],
                           "capfilt: error: input.url_col: column 'url' not found in CSV (columns: link, alt)"),
}  # fmt: skip


def fill(template: str, paths: dict[str, Path]) -> str:
    return re.sub("|".join(paths), lambda m: str(paths[m.group()]), template)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, str, float]]:
    """Every CLI case at once, each in its own directory: (result, expected line, seconds)."""
    started, expected = {}, {}
    for case, (text, args, line) in CLI_CASES.items():
        where = tmp_path_factory.mktemp(case)
        (where / "urls.parquet").write_bytes(b"")
        (where / "urls.csv").write_text("link,alt\nhttp://127.0.0.1/a.jpg,a cat\n")
        job = where / "job.yaml"
        subs = {"URLS": where / "urls.parquet", "CSV": where / "urls.csv", "OUT": where / "out", "JOB": job}
        job.write_text(fill(text, subs))
        expected[case] = fill(line, subs)
        argv = [sys.executable, "-m", "pipeline.cli", "run", str(job), *args]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        started[case] = (proc, time.monotonic())
    runs = {}
    for case, (proc, t0) in started.items():
        out, err = proc.communicate(timeout=60)
        runs[case] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), expected[case],
                      time.monotonic() - t0)  # fmt: skip
    return runs


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_rejects_a_bad_job_with_exit_2_and_one_line_before_starting_ray(cli_runs, case):
    done, line, seconds = cli_runs[case]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(line), lines[0]
    assert seconds < 10  # no Ray started, no model loaded
    assert not (Path(done.args[4]).parent / "out").exists()


def test_cli_version_is_the_package_version():
    init = (ROOT / "pipeline" / "__init__.py").read_text()
    version = re.search(r'^__version__ = "([^"]+)"$', init, re.MULTILINE).group(1)
    assert version == __version__
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "--version"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0
    assert done.stdout == f"capfilt {version}\n"


# --- fingerprints ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "output_changes", "download_changes"),
    [
        ({"filter": {"threshold": 0.6}}, True, False),
        ({"filter": {"model": "other/itm"}}, True, False),
        ({"captioner": {"model": "other/captioner"}}, True, False),
        ({"captioner": {"num_captions": 2}}, True, False),
        ({"captioner": {"seed": 1}}, True, False),
        ({"download": {"image_size": 256}}, True, True),
        ({"input": {"caption_col": None}}, True, True),
        ({"output": {"shard_size": 7}}, True, True),
        ({"resources": {"actors": 4}}, False, False),
        ({"resources": {"gpus_per_actor": 0.5, "cpus_per_actor": 4}}, False, False),
        ({"output": {"path": "elsewhere"}}, False, False),
        ({"filter": {"threshold": 0.5}}, False, False),  # the default, written out
        ({"filter": {"keep": {"rule": "top_k", "k": 2}}}, True, False),
        ({"filter": {"keep": {"by": "itc"}}}, True, False),
        ({"filter": {"keep": {"rule": "threshold", "by": "itm"}}}, False, False),  # the default, written out
        ({"output": {"image_embeddings": False}}, True, False),
        ({"output": {"image_embeddings": True}}, False, False),
    ],
)
def test_fingerprint_follows_what_decides_the_output(url_list, sections, output_changes, download_changes):
    base = spec_from_dict(build(url_list))
    other = spec_from_dict(build(url_list, sections))
    assert re.fullmatch(r"[0-9a-f]{16}", base.fingerprint())
    assert spec_from_dict(build(url_list)).fingerprint() == base.fingerprint()  # deterministic
    assert (other.fingerprint() != base.fingerprint()) == output_changes
    assert (other.download_fingerprint() != base.download_fingerprint()) == download_changes


def test_the_keep_rule_is_a_nested_section_checked_like_the_others(url_list):
    spec = spec_from_dict(build(url_list, {"filter": {"keep": {"rule": "top_k", "k": 3, "by": "itc"}}}))
    assert spec.filter.keep == KeepSpec(rule="top_k", k=3, by="itc")
    assert typed_spec(spec.to_dict()) == spec  # read back from a manifest as it was written
    assert spec_from_dict(build(url_list)).filter.keep == KeepSpec()
    for keep, message in [
        ({"rule": "best"}, r"filter\.keep\.rule"),
        ({"k": 0}, r"filter\.keep\.k"),
        ({"by": "clip"}, r"filter\.keep\.by"),
        ({"top": 3}, r"filter\.keep.*top"),
    ]:
        with pytest.raises(SpecError, match=message):
            spec_from_dict(build(url_list, {"filter": {"keep": keep}}))


def test_dedup_is_a_nested_section_and_near_dedup_needs_stored_embeddings(url_list):
    spec = spec_from_dict(build(url_list, {"filter": {"dedup": {"near_threshold": 0.9}}}))
    assert spec.filter.dedup == DedupSpec(exact=True, near_threshold=0.9)
    assert typed_spec(spec.to_dict()) == spec
    assert spec_from_dict(build(url_list)).filter.dedup == DedupSpec(exact=True, near_threshold=None)
    for dedup, message in [
        (
            {"near_threshold": 0},
            r"^filter\.dedup\.near_threshold: 0 is less than or equal to the minimum of 0",
        ),
        ({"near_threshold": 1.5}, r"^filter\.dedup\.near_threshold: 1\.5 is greater than the maximum of 1"),
        ({"exact": "yes"}, r"^filter\.dedup\.exact: expected boolean"),
        ({"near": 0.9}, r"^filter\.dedup\.near: unknown key \(allowed: exact, near_threshold\)"),
    ]:
        with pytest.raises(SpecError, match=message):
            spec_from_dict(build(url_list, {"filter": {"dedup": dedup}}))
    no_embeddings = {"filter": {"dedup": {"near_threshold": 0.9}}, "output": {"image_embeddings": False}}
    with pytest.raises(
        SpecError, match=r"^filter\.dedup\.near_threshold needs output\.image_embeddings: true"
    ):
        spec_from_dict(build(url_list, no_embeddings))


def test_paths_become_absolute_for_workers_and_hub_names_stay_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "urls.parquet").write_bytes(b"")
    (tmp_path / "models" / "cap").mkdir(parents=True)
    spec = spec_from_dict({
        "input": {"url_list": "urls.parquet"},
        "captioner": {"model": "models/cap"},
        "output": {"path": "out"},
    }).with_absolute_paths()  # fmt: skip
    assert spec.input.url_list == str(tmp_path / "urls.parquet")
    assert spec.captioner.model == str(tmp_path / "models" / "cap")
    assert spec.filter.model == "Salesforce/blip-itm-large-coco"
    assert spec.output.path == str(tmp_path / "out")


def test_a_url_list_must_exist_on_disk_or_in_its_store(tmp_path, s3_endpoint):
    with pytest.raises(
        SpecError, match=r"^input\.url_list: no such file: .*nothing\.parquet \(a file, a directory or a glob"
    ):
        spec_from_dict({"input": {"url_list": str(tmp_path / "nothing.parquet")}, "output": {"path": "out"}})
    bucket = new_bucket()  # moto's S3 on 127.0.0.1
    with pytest.raises(SpecError, match=rf"^input\.url_list: no such file: s3://{bucket}/urls\.parquet"):
        spec_from_dict({"input": {"url_list": f"s3://{bucket}/urls.parquet"}, "output": {"path": "out"}})


@pytest.mark.parametrize(
    ("raw", "before", "fingerprint", "download_fingerprint"),
    [
        ({"input": {"url_list": "urls.parquet"}, "output": {"path": "out"}}, "b774acc3f143dc43", "2500118ab5ecf7d3", "5956a64ce322bed5"),
        ({"input": {"url_list": "urls.parquet", "url_col": "link"}, "output": {"path": "out", "shard_size": 16},
          "filter": {"threshold": 0.3}, "download": {"timeout": 3}}, "13f0166f9f436060", "defec0c739f184fc", "4a13e1b76271ba23"),
    ],
)  # fmt: skip
def test_settings_added_later_leave_earlier_downloads_theirs(raw, before, fingerprint, download_fingerprint):
    """The values capfilt wrote before the network lists, the body and pixel limits and extra columns
    existed (commit 3911d98): an output made then still finds its downloads its own. Its shards are
    rewritten once, on purpose: since the filter scores the BLIP way (`itm_first_token`,
    `text_normalise`, `max_words`, always in the fingerprint) and captions are decoded as BLIP
    decodes them, an old shard's scores would not be this code's; and since shard schema 2
    (`caption` is the training text, the fingerprint holds the schema's version), its columns, and
    since image dedup (`filter.dedup`, always in the fingerprint), its fates. Set away from its
    default, a download setting added later does change both. (A job run settles `input_format` from the list's
    name, as here.)"""
    spec = typed_spec({**raw, "input": {**raw["input"], "input_format": "parquet"}})
    assert spec.download_fingerprint() == download_fingerprint
    assert spec.fingerprint() == fingerprint != before
    changed = dataclasses.replace(spec, download=dataclasses.replace(spec.download, max_body_bytes=1000))
    assert changed.fingerprint() != fingerprint and changed.download_fingerprint() != download_fingerprint
