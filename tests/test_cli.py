"""The `capfilt` command as a user runs it: a fresh process, its exit code and its output."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml
from transformers import AutoProcessor, BlipForConditionalGeneration, BlipForImageTextRetrieval

from pipeline.spec.layout import OutputLayout
from pipeline.synthetic.sample_web import Route
from pipeline.synthetic.splits import JUNK, web_split
from pipeline.synthetic.trained import shipped_models
from pipeline.synthetic.web_job import web_index

CAPFILT = [sys.executable, "-m", "pipeline.cli"]


def test_tiny_models_command_writes_loadable_checkpoints(tmp_path):
    done = subprocess.run(
        [*CAPFILT, "tiny-models", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    BlipForConditionalGeneration.from_pretrained(tmp_path / "captioner")
    BlipForImageTextRetrieval.from_pretrained(tmp_path / "itm")
    assert AutoProcessor.from_pretrained(tmp_path / "itm").tokenizer.bos_token == "[DEC]"


@pytest.mark.slow
def test_tiny_models_trained_exports_the_shipped_checkpoints(tmp_path):
    done = subprocess.run(
        [*CAPFILT, "tiny-models", str(tmp_path), "--trained"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    shipped = shipped_models()
    for name in ("captioner", "itm"):
        exported = (tmp_path / name / "model.safetensors").read_bytes()
        assert exported == (getattr(shipped, name) / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_demo_runs_offline_on_its_own_local_ray(tmp_path):
    done = subprocess.run(
        [*CAPFILT, "demo", "--out", str(tmp_path), "--rows", "12"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    manifest = json.loads((tmp_path / "output" / "manifest.json").read_text())
    assert manifest["complete"] and sum(manifest["counts"].values()) == manifest["input_rows"]
    assert manifest["counts"]["kept"] > 0 and manifest["counts"]["blocked"] == 1
    assert "input rows" in done.stdout and "kept" in done.stdout
    # The trained filter drops the web captions the generator corrupted beyond doubt.
    rows = [
        r for p in OutputLayout(tmp_path / "output").shard_parquets() for r in pq.read_table(p).to_pylist()
    ]
    web = web_split(12, seed=0)
    junk = [r for r in rows if web_index(r["url"]) is not None and web[web_index(r["url"])].kind == JUNK]
    assert junk and all(c["source"] != "web" for r in junk for c in r["kept_captions"])
    assert "web captions the filter dropped" in done.stdout and "(itm 0." in done.stdout


@pytest.mark.slow
def test_a_second_demo_into_the_same_directory_starts_afresh(tmp_path):
    for _ in range(2):
        done = subprocess.run(
            [*CAPFILT, "demo", "--out", str(tmp_path), "--rows", "2"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-4000:]
    assert "//" not in done.stdout.replace("://", "")


@pytest.mark.slow
def test_ctrl_c_during_the_download_exits_130_and_says_so(tmp_path, web, tiny_models):
    site, _ = web
    site.add("/stall/forever.jpg", Route(body=b"never", stall_s=60))
    url_list = tmp_path / "urls.csv"
    url_list.write_text(f"url,caption\n{site.url('/stall/forever.jpg')},a slow picture\n")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "input": {"url_list": str(url_list), "input_format": "csv"},
        "download": {"allow_private_networks": True, "timeout": 60},
        "captioner": {"model": str(tiny_models.captioner)},  # checked, and its processor read, before any work
        "filter": {"model": str(tiny_models.itm)},
        "output": {"path": str(tmp_path / "out")},
    }))  # fmt: skip
    process = subprocess.Popen(
        [*CAPFILT, "run", str(job)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while site.hits("/stall/forever.jpg") == 0 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert site.hits("/stall/forever.jpg") == 1, "the download never started"
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()  # a run that did not stop must not starve the tests after this one
    assert process.returncode == 130, stderr[-3000:]
    assert "interrupted; finished shards are kept" in stderr

    # the manifest was written before the download, so the job that died can be inspected
    inspected = subprocess.run([*CAPFILT, "inspect", str(tmp_path / "out")], capture_output=True, text=True)
    assert inspected.returncode == 0, inspected.stderr
    assert "INCOMPLETE: 0 of 1 shards written" in inspected.stdout
    assert f"{'(not written yet)':<18}{1:>10}" in inspected.stdout


def test_every_command_s_help_says_what_it_does_and_its_defaults(capsys):
    """`capfilt CMD --help` begins with the line `capfilt --help` lists for CMD, and gives each option's
    default. In-process: argparse prints and exits, nothing else runs."""
    from pipeline.cli import _parser

    def subcommands(parser) -> dict[str, tuple[str, object]]:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        about = {choice.dest: choice.help for choice in action._choices_actions}
        return {name: (about[name], sub) for name, sub in action.choices.items()}

    commands = subcommands(_parser())
    commands |= {f"bench {name}": entry for name, entry in subcommands(commands["bench"][1]).items()}
    assert {"run", "submit", "inspect", "rethreshold", "retry-failed", "bench dedup"} <= set(commands)
    for name, (about, _) in commands.items():
        if name == "bench":
            continue
        with pytest.raises(SystemExit) as done:
            _parser().parse_args([*name.split(), "--help"])
        assert done.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert " ".join(about.split()) in text, name
    with pytest.raises(SystemExit):
        _parser().parse_args(["bench", "dedup", "--help"])
    assert "(default: 600)" in capsys.readouterr().out  # --distinct
