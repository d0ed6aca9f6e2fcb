"""The `capfilt` command as a user runs it: a fresh process, its exit code and its output."""

from __future__ import annotations

import json
import subprocess
import sys

from transformers import AutoProcessor, BlipForConditionalGeneration, BlipForImageTextRetrieval

CAPFILT = [sys.executable, "-m", "pipeline.cli"]


def test_tiny_models_command_writes_loadable_checkpoints(tmp_path):
    done = subprocess.run(
        [*CAPFILT, "tiny-models", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    BlipForConditionalGeneration.from_pretrained(tmp_path / "captioner")
    BlipForImageTextRetrieval.from_pretrained(tmp_path / "itm")
    assert AutoProcessor.from_pretrained(tmp_path / "itm").tokenizer.bos_token == "[DEC]"


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
