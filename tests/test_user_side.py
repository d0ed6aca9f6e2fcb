"""The user side of the hostile-input catalogue: a job spec, an output directory or a model that capfilt
must refuse with one line before any work starts, and the few that must run.

Every case goes through the real command (`pipeline.cli.main`) as a user types it, over an empty URL
list, so a case that runs finishes without downloading anything. A refusal must come before Ray
starts (`User.refused` makes starting it fail the test) and leave the output directory as it was.
`CATALOGUE` is this module's part of the robustness page (tests/catalogue.py); each section's test
runs every case of its section, and `test_every_catalogue_case_is_run` keeps it so. The fuzz tests
at the end feed the spec loader random text and random specs made of the schema's own names.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline.cli import _parser, main
from pipeline.core.storage import Location
from pipeline.curate.model_check import check_model
from pipeline.job.cluster_jobs import entrypoint
from pipeline.job.output_guard import LOCK_NAME, capfilt_names, claim_output, lock_output
from pipeline.spec.config import CaptionerSpec, JobSpec, SpecError, job_schema, load_spec
from pipeline.spec.layout import RETRY_DIR
from tests.catalogue import ERROR, RUNS, Case, Section

ROOT = Path(__file__).resolve().parent.parent
DROP = object()  # in a case's changes: remove this key from the base spec

# --- job spec ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecCase:
    case: Case
    changes: dict[str, Any]  # merged into the base spec, section by section; "<name>" values are paths


SPEC = [
    SpecCase(Case("unknown-key", "`captioner: {top_k: 50}`", ERROR, "captioner.top_k: unknown key (did you mean 'top_p'?)"),
             {"captioner": {"top_k": 50}}),
    SpecCase(Case("misspelt-key", "`filter: {treshold: 0.6}`", ERROR, "filter.treshold: unknown key (did you mean 'threshold'?)"),
             {"filter": {"treshold": 0.6}}),
    SpecCase(Case("unknown-section", "`captioning: {num_captions: 3}`", ERROR, "captioning: unknown key (did you mean 'captioner'?)"),
             {"captioning": {"num_captions": 3}}),
    SpecCase(Case("wrong-type", "`captioner: {num_captions: three}`", ERROR, "captioner.num_captions: expected integer, got 'three'"),
             {"captioner": {"num_captions": "three"}}),
    SpecCase(Case("float-for-integer", "`captioner: {batch_size: 64.0}`", ERROR, "captioner.batch_size: expected integer, got 64.0"),
             {"captioner": {"batch_size": 64.0}}),
    SpecCase(Case("section-not-a-mapping", "`filter: 0.5`", ERROR, "filter: expected object, got 0.5"), {"filter": 0.5}),
    SpecCase(Case("threshold-negative", "`filter: {threshold: -0.1}`", ERROR, "filter.threshold: -0.1 is less than the minimum of 0"),
             {"filter": {"threshold": -0.1}}),
    SpecCase(Case("threshold-above-1", "`filter: {threshold: 1.5}`", ERROR, "filter.threshold: 1.5 is greater than the maximum of 1"),
             {"filter": {"threshold": 1.5}}),
    SpecCase(Case("threshold-nan", "`filter: {threshold: .nan}`", ERROR, "filter.threshold: expected number, got nan"),
             {"filter": {"threshold": float("nan")}}),
    SpecCase(Case("top-p-zero", "`captioner: {top_p: 0}`", ERROR, "captioner.top_p: 0 is less than or equal to the minimum of 0"),
             {"captioner": {"top_p": 0}}),
    SpecCase(Case("top-p-above-1", "`captioner: {top_p: 1.01}`", ERROR, "captioner.top_p: 1.01 is greater than the maximum of 1"),
             {"captioner": {"top_p": 1.01}}),
    SpecCase(Case("batch-size-zero", "`captioner: {batch_size: 0}`", ERROR, "captioner.batch_size: 0 is less than the minimum of 1"),
             {"captioner": {"batch_size": 0}}),
    SpecCase(Case("batch-size-negative", "`filter: {batch_size: -8}`", ERROR, "filter.batch_size: -8 is less than the minimum of 1"),
             {"filter": {"batch_size": -8}}),
    SpecCase(Case("network-not-cidr", "`download: {denied_networks: [intranet]}`", ERROR,
                  "download.denied_networks.0: 'intranet' is not a network (CIDR, e.g. 10.0.0.0/8 or fd00::/8)"),
             {"download": {"denied_networks": ["intranet"]}}),
    SpecCase(Case("url-list-missing", "`input.url_list` names no file", ERROR, "input.url_list: no such file: "),
             {"input": {"url_list": "<missing>"}}),
    SpecCase(Case("url-list-not-given", "no `input.url_list`", ERROR, "input.url_list: required key is missing"),
             {"input": {"url_list": DROP}}),
    SpecCase(Case("model-path-missing", "`captioner.model: ./models/cap`, which does not exist", ERROR,
                  "captioner.model: no such model directory: ./models/cap (a local directory, or a hub name such as "
                  "Salesforce/blip-image-captioning-large)"),
             {"captioner": {"model": "./models/cap"}}),
    SpecCase(Case("model-path-with-tilde", "`filter.model: ~/itm` (the directory exists under $HOME)", ERROR,
                  "filter.model: ~/itm: '~' is not expanded in a job spec; write "),
             {"filter": {"model": "~/itm"}}),
    SpecCase(Case("model-uri", "`captioner.model: s3://bucket/captioner`", ERROR,
                  "captioner.model: s3://bucket/captioner: models load from a local directory or a hub name, not a URI"),
             {"captioner": {"model": "s3://bucket/captioner"}}),
    SpecCase(Case("model-wrong-head", "`captioner.model` names the ITM checkpoint (the two swapped)", ERROR,
                  "holds a BlipForImageTextRetrieval (its config.json); captioner.model needs a "
                  "BlipForConditionalGeneration and filter.model a BlipForImageTextRetrieval"),
             {"captioner": {"model": "<itm>"}}),
    SpecCase(Case("model-dir-not-a-model", "`filter.model` is an empty directory", ERROR,
                  "has no config.json; not a transformers model directory"), {"filter": {"model": "<empty>"}}),
    SpecCase(Case("hub-name-not-found", "`captioner.model: Salesforce/no-such-captioner` (a hub name that does not "
                  "resolve; the tests run with HF_HUB_OFFLINE=1)", ERROR,
                  "captioner.model: cannot read the image processor of Salesforce/no-such-captioner: "),
             {"captioner": {"model": "Salesforce/no-such-captioner"}}),
]  # fmt: skip

# --- output directory ------------------------------------------------------------------------------------

UserAction = Callable[["User", Case], None]


@dataclass(frozen=True)
class UserCase:
    case: Case
    act: UserAction  # sets the case up, runs the command and checks the outcome


def _empty_directory(user: User, case: Case) -> None:
    user.out.mkdir()
    user.runs("run", user.job())


def _earlier_output(user: User, case: Case) -> None:
    user.runs("run", user.job())
    first = user.out / "manifest.json"
    assert first.is_file() and set(os.listdir(user.out)) <= capfilt_names(Location.of(user.out))
    user.runs("run", user.job())


def _overwrite_holding_the_url_list(user: User, case: Case) -> None:
    user.out.mkdir()
    inside = user.out / "urls.parquet"
    inside.write_bytes(user.url_list.read_bytes())
    user.refused(case, "run", user.job({"input": {"url_list": str(inside)}}), "--overwrite")
    assert inside.is_file()


def _foreign_files(user: User, case: Case) -> None:
    user.out.mkdir()
    (user.out / "notes.txt").write_text("mine")
    user.refused(case, "run", user.job())


def _foreign_files_overwritten(user: User, case: Case) -> None:
    user.out.mkdir()
    (user.out / "notes.txt").write_text("mine")
    (user.out / "old" / "deeper").mkdir(parents=True)
    (user.out / "manifest.json").write_text("{not a manifest")
    user.runs("run", user.job(), "--overwrite")
    assert not (user.out / "notes.txt").exists() and not (user.out / "old").exists()
    assert json.loads((user.out / "manifest.json").read_text())["complete"]


def _overwrite_removes_links_not_targets(user: User, case: Case) -> None:
    precious = user.where / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("keep me")
    user.out.mkdir()
    (user.out / "link").symlink_to(precious, target_is_directory=True)
    user.runs("run", user.job(), "--overwrite")
    assert not (user.out / "link").exists() and (precious / "data.txt").read_text() == "keep me"


def _is_a_file(user: User, case: Case) -> None:
    user.out.write_text("a file")
    user.refused(case, "run", user.job())
    user.refused(case, "run", user.job(), "--overwrite")


def _another_run_writing(user: User, case: Case) -> None:
    user.out.mkdir()
    with lock_held_elsewhere(user.out) as holder:
        line = user.refused(case, "run", user.job())
    assert f"(pid {holder.pid} on host {socket.gethostname()} since 20" in line


def _writer_died(user: User, case: Case) -> None:
    user.out.mkdir()
    with lock_held_elsewhere(user.out) as holder:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock with the process
        holder.wait()
        user.runs("run", user.job())


def _retry_while_writing(user: User, case: Case) -> None:
    user.runs("run", user.job())
    with lock_held_elsewhere(user.out):
        user.refused(case, "retry-failed", str(user.out))


def _rethreshold_into_busy(user: User, case: Case) -> None:
    user.runs("run", user.job())
    partial = user.where / ".new.partial"  # where rethreshold builds NEW before renaming it into place
    partial.mkdir()
    new = str(user.where / "new")
    with lock_held_elsewhere(partial):
        line = user.refused(case, "rethreshold", str(user.out), "--threshold", "0.6", "--out", new)
    assert line.startswith("capfilt: error: --out: ") and not (user.where / "new").exists()


def _overwrite_home(user: User, case: Case) -> None:
    (user.home / "notes.txt").write_text("mine")
    user.refused(case, "run", user.job(out=user.home), "--overwrite", unchanged=user.home)


def _overwrite_root(user: User, case: Case) -> None:
    user.refused(case, "run", user.job(out=Path("/")), "--overwrite", unchanged=Path("/"))


def _overwrite_working_directory(user: User, case: Case) -> None:
    user.out.mkdir()
    (user.out / "notes.txt").write_text("mine")
    user.monkeypatch.chdir(user.out)
    user.refused(case, "run", user.job(out=Path(".")), "--overwrite")


def _overwrite_above_working_directory(user: User, case: Case) -> None:
    (user.out / "project").mkdir(parents=True)
    user.monkeypatch.chdir(user.out / "project")
    user.refused(case, "run", user.job(out=Path("..")), "--overwrite")


def _planted_lock_link(user: User, case: Case) -> None:
    victim = user.where / "victim.txt"
    victim.write_text("not to be truncated")
    user.out.mkdir()
    (user.out / LOCK_NAME).symlink_to(victim)
    user.refused(case, "run", user.job())
    assert victim.read_text() == "not to be truncated"


OUTPUT = [
    UserCase(Case("empty-directory", "`output.path` is an existing empty directory", RUNS), _empty_directory),
    UserCase(Case("earlier-output", "`output.path` holds an earlier run's output (only capfilt's names)", "runs, resuming it"),
            _earlier_output),
    UserCase(Case("foreign-files", "`output.path` holds `notes.txt`", ERROR,
                 "holds files that are not a capfilt output (e.g. notes.txt); use an empty or new directory, or pass "
                 "--overwrite to delete its contents and start afresh"), _foreign_files),
    UserCase(Case("foreign-files-overwrite", "the same, with `--overwrite`", "runs, contents replaced"),
            _foreign_files_overwritten),
    UserCase(Case("overwrite-symlink", "`--overwrite` of a directory holding a link to a directory elsewhere",
                 "runs, the link removed, its target kept"), _overwrite_removes_links_not_targets),
    UserCase(Case("is-a-file", "`output.path` is a file (with or without `--overwrite`)", ERROR,
                 "is a file; name a directory (new or empty) for the output"), _is_a_file),
    UserCase(Case("another-run-writing", "another process holds the output's lock (a run in progress)", ERROR,
                 "is being written by another capfilt run (pid "), _another_run_writing),
    UserCase(Case("writer-died", "the process that held the lock was killed (SIGKILL)", RUNS), _writer_died),
    UserCase(Case("retry-while-writing", "`capfilt retry-failed OUT` while a run writes OUT", ERROR,
                 "is being written by another capfilt run"), _retry_while_writing),
    UserCase(Case("rethreshold-into-busy", "`capfilt rethreshold --out NEW` while another rethreshold builds NEW", ERROR,
                 "is being written by another capfilt run"), _rethreshold_into_busy),
    UserCase(Case("overwrite-home", "`--overwrite` with `output.path` the home directory", ERROR,
                 "--overwrite will not delete the contents of"), _overwrite_home),
    UserCase(Case("overwrite-root", "`--overwrite` with `output.path: /`", ERROR,
                 "output.path: --overwrite will not delete the contents of / (the filesystem root)"), _overwrite_root),
    UserCase(Case("overwrite-working-directory", "`--overwrite` with `output.path: .`", ERROR, "(the working directory)"),
            _overwrite_working_directory),
    UserCase(Case("overwrite-above-working-directory", "`--overwrite` with `output.path: ..`", ERROR,
                 "(it holds the working directory"), _overwrite_above_working_directory),
    UserCase(Case("overwrite-holding-the-url-list", "`--overwrite` of a directory that holds the job's own URL list",
                  ERROR, "--overwrite will not delete the contents of"), _overwrite_holding_the_url_list),
    UserCase(Case("planted-lock-link", f"`{LOCK_NAME}` is a symbolic link to a file elsewhere", ERROR,
                 "cannot create the lock file"), _planted_lock_link),
]  # fmt: skip

# --- security --------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs code: it creates `marker`. What a hostile `pytorch_model.bin` does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _hostile_checkpoint(user: User, name: str) -> tuple[Path, Path]:
    """A copy of the tiny captioner in which capfilt must run nothing: (its directory, the marker file
    that running anything of it would create)."""
    model = user.where / name
    shutil.copytree(user.models["captioner"], model)
    return model, user.where / f"{name}-ran"


def _pickle_checkpoint(user: User, case: Case) -> None:
    user.refused(case, "run", user.job({"captioner": {"model": "<pickled>"}}))
    from pipeline.curate.capfilt_stage import _Models

    # The actor's loader refuses it too, as it would a hub model without safetensors weights.
    with pytest.raises(OSError, match=r"no file named model\.safetensors"):
        _Models.load(CaptionerSpec(model=str(user.models["pickled"])), user.models["itm"])


def _pickle_beside_safetensors(user: User, case: Case) -> None:
    from pipeline.curate.capfilt_stage import _Models

    model, marker = _hostile_checkpoint(user, "both-formats")
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    user.runs("run", user.job({"captioner": {"model": str(model)}}))  # the checks let it through
    assert _Models.load(CaptionerSpec(model=str(model)), user.models["itm"]).captioner is not None
    assert not marker.exists()


def _custom_code_checkpoint(user: User, case: Case) -> None:
    from pipeline.curate.capfilt_stage import _Models

    model, marker = _hostile_checkpoint(user, "custom-code")
    config = json.loads((model / "config.json").read_text())
    config.update(architectures=["EvilBlipForCaptioning"],
                  auto_map={"AutoModelForVision2Seq": "modeling_evil.EvilBlipForCaptioning"})  # fmt: skip
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    user.refused(case, "run", user.job({"captioner": {"model": str(model)}}))
    _Models.load(
        CaptionerSpec(model=str(model)), user.models["itm"]
    )  # were the check bypassed, the actor still runs none of it
    assert not marker.exists()


MODEL_LOADING = [
    UserCase(Case("pickle-checkpoint", "`captioner.model`: a directory whose weights are `pytorch_model.bin` only",
                  ERROR, "has no .safetensors weights; capfilt does not load pickle checkpoints (convert it with "
                  "save_pretrained(safe_serialization=True))"), _pickle_checkpoint),
    UserCase(Case("pickle-beside-safetensors", "a model directory with `model.safetensors` and a `pytorch_model.bin` "
                  "whose unpickling runs code", "runs; the pickle is never opened"), _pickle_beside_safetensors),
    UserCase(Case("custom-code-checkpoint", "a model directory whose config.json names its own architecture and "
                  "code (`auto_map`, `modeling_evil.py`)", ERROR,
                  "holds a EvilBlipForCaptioning (its config.json); captioner.model needs a BlipForConditionalGeneration"),
             _custom_code_checkpoint),
]  # fmt: skip


@dataclass(frozen=True)
class SourceScan:
    """What must not appear in pipeline/**/*.py, and lines it must match (so that the scan can fail)."""

    name: str
    pattern: str
    examples: tuple[str, ...]


SCANS = [
    SourceScan("trust-remote-code", r"trust_remote_code", ("AutoModel.from_pretrained(name, trust_remote_code=True)",)),
    SourceScan("unpickling",
               r"(?i)(?:pickle|dill|joblib)\s*\.\s*(?:loads?|Unpickler)\b|from\s+\S*(?:pickle|dill|joblib)\s+import\s+[^\n]*\b(?:loads?|Unpickler)\b",
               ("state = pickle.load(open(path, 'rb'))", "cloudpickle.loads(blob)", "from pickle import loads",
                "joblib.load(path)")),
    SourceScan("torch-load", r"\btorch\s*\.\s*(?:serialization\s*\.\s*)?load\s*\(|from\s+torch\s+import\s+[^\n]*\bload\b",
               ("weights = torch.load(path)", "from torch import load, save")),
    SourceScan("allow-pickle", r"allow_pickle", ("np.load(path, allow_pickle=True)",)),
    SourceScan("pickle-switch", r"\b(?:use_safetensors|weights_only)\s*=\s*False\b",
               ("Model.from_pretrained(p, use_safetensors=False)", "torch.load(p, weights_only=False)")),
]  # fmt: skip

CATALOGUE = [
    Section("Job spec", "A spec that cannot run is refused with one line that names the key (`capfilt: error: "
            "job.yaml: captioner.top_k: …`), exit status 2, before Ray starts and before anything is written. Model settings "
            "that are local directories are checked for the right BLIP head and safetensors weights; hub names are "
            "left to `from_pretrained`.", tuple(c.case for c in SPEC)),
    Section("Output directory", "`output.path` must be new, empty, or an earlier capfilt output, which resumes; "
            "anything else is refused before anything is written, unless `--overwrite` empties it first. One run "
            "at a time writes an output: a lock on local paths (object stores have none).",
            tuple(c.case for c in OUTPUT)),
    Section("Security", "capfilt loads weights from safetensors only (every `from_pretrained` of the actor passes "
            "`use_safetensors=True`) and never runs a checkpoint's own code. Besides these cases, tests read "
            "pipeline/ for `trust_remote_code`, `pickle.load`, `torch.load`, `allow_pickle`, `use_safetensors=False` "
            "and `weights_only=False`: none may appear.", tuple(c.case for c in MODEL_LOADING)),
]  # fmt: skip


# --- the user --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory) -> dict[str, str]:
    """The model directories the cases name: the tiny captioner and ITM, the captioner's weights as a
    pickle only, and a directory that is not a model."""
    import torch
    from safetensors.torch import load_file

    where = tmp_path_factory.mktemp("user-side-models")
    pickled = where / "pickled"
    shutil.copytree(tiny_models.captioner, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(tiny_models.captioner / "model.safetensors"), pickled / "pytorch_model.bin")
    (where / "empty").mkdir()
    return {"captioner": str(tiny_models.captioner), "itm": str(tiny_models.itm), "pickled": str(pickled),
            "empty": str(where / "empty")}  # fmt: skip


class User:
    """Someone at a terminal: a directory with a job spec over an empty URL list, and `capfilt`."""

    def __init__(self, where: Path, models: dict[str, str], request: pytest.FixtureRequest,
                 capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
        self.where, self.models, self.request = where, models, request
        self.capsys, self.monkeypatch = capsys, monkeypatch
        self.out = where / "out"
        self.home = where / "home"
        (self.home / "itm").mkdir(parents=True)
        monkeypatch.setenv("HOME", str(self.home))  # never the real home, whatever a case does
        self.url_list = where / "urls.parquet"
        pq.write_table(pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}),
                       self.url_list)  # fmt: skip

    def job(self, changes: dict[str, Any] | None = None, out: Path | None = None) -> str:
        """Write the job spec with `changes` merged in; returns its path."""
        raw: dict[str, Any] = {
            "input": {"url_list": str(self.url_list)},
            "captioner": {"model": self.models["captioner"]},
            "filter": {"model": self.models["itm"]},
            "output": {"path": str(self.out if out is None else out)},
        }
        for section, body in (changes or {}).items():
            if isinstance(body, dict) and isinstance(raw.get(section), dict):
                raw[section] = {k: v for k, v in {**raw[section], **body}.items() if v is not DROP}
            else:
                raw[section] = body
        paths = {f"<{name}>": path for name, path in self.models.items()}
        raw = _fill(raw, {**paths, "<missing>": str(self.where / "missing.parquet")})
        job = self.where / "job.yaml"
        job.write_text(yaml.safe_dump(raw))
        return str(job)

    def refused(self, case: Case, *argv: str, unchanged: Path | None = None) -> str:
        """The command exits 2 with one line that says `case.says`, before Ray starts, and leaves
        `unchanged` (by default the output directory) as it was. Returns the line."""
        unchanged = self.out if unchanged is None else unchanged
        before = _listing(unchanged)
        self.capsys.readouterr()
        with self.monkeypatch.context() as patch:
            patch.setattr("pipeline.job.runner.ray_session", _no_ray)
            code = main(list(argv))
        err = self.capsys.readouterr().err
        lines = err.splitlines()
        assert code == 2, err
        assert len(lines) == 1 and lines[0].startswith("capfilt: error: "), err
        assert case.says in lines[0], lines[0]
        assert _listing(unchanged) == before
        return lines[0]

    def runs(self, *argv: str) -> None:
        self.request.getfixturevalue("ray_local")
        self.capsys.readouterr()
        code = main(list(argv))
        assert code == 0, self.capsys.readouterr().err


def _fill(value: Any, places: dict[str, str]) -> Any:
    """`value` with every string that is a placeholder (`<name>`) replaced by its path."""
    if isinstance(value, str):
        return places.get(value, value)
    if isinstance(value, dict):
        return {k: _fill(v, places) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, places) for v in value]
    return value


@pytest.fixture
def user(tmp_path, models, request, capsys, monkeypatch) -> User:
    return User(tmp_path, models, request, capsys, monkeypatch)


def _no_ray(address: str | None) -> None:
    raise AssertionError("Ray was started: the error came after the point where it should have")


def _listing(path: Path) -> Any:
    """What a refusal must not change: a file's bytes, or a directory's entries and its files' sizes
    (not a directory's own size, which other processes change on /)."""
    if path.is_file() and not path.is_symlink():
        return path.read_bytes()
    if not path.is_dir():
        return None
    with os.scandir(path) as entries:
        return sorted((e.name, e.is_dir(follow_symlinks=False),
                       e.stat(follow_symlinks=False).st_size if e.is_file(follow_symlinks=False) else 0)
                      for e in entries)  # fmt: skip


HOLD_LOCK = """
import sys
from pipeline.job.output_guard import lock_output
from pipeline.core.storage import Location
with lock_output(Location.of(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def lock_held_elsewhere(root: Path) -> Iterator[subprocess.Popen]:
    """Another process holding `root`'s lock, through capfilt's own API, as a running job does."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(root)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.communicate()


# --- the catalogue's tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec_case", SPEC, ids=lambda c: c.case.id)
def test_job_spec(user, spec_case):
    user.refused(spec_case.case, "run", user.job(spec_case.changes))
    assert not user.out.exists()


@pytest.mark.parametrize("user_case", OUTPUT, ids=lambda c: c.case.id)
def test_output_directory(user, user_case):
    user_case.act(user, user_case.case)


@pytest.mark.parametrize("model_case", MODEL_LOADING, ids=lambda c: c.case.id)
def test_security(user, model_case):
    model_case.act(user, model_case.case)


@pytest.mark.parametrize("scan", SCANS, ids=lambda s: s.name)
def test_the_source_never_unpickles_nor_runs_model_code(scan):
    pattern = re.compile(scan.pattern)
    for example in scan.examples:
        assert pattern.search(example), f"the scan would miss {example!r}"
    sources = sorted((ROOT / "pipeline").rglob("*.py"))
    assert len(sources) > 30
    hits = []
    for source in sources:
        text = source.read_text(encoding="utf-8")
        for found in pattern.finditer(text):
            line = text.count("\n", 0, found.start()) + 1
            hits.append(f"{source.relative_to(ROOT)}:{line}: {found.group()}")
    assert hits == []


def test_every_from_pretrained_of_the_actor_says_use_safetensors():
    tree = ast.parse((ROOT / "pipeline" / "curate" / "capfilt_stage.py").read_text())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "_Models")
    load = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "load")
    calls = [
        n
        for n in ast.walk(load)
        if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "from_pretrained"
    ]
    assert len(calls) == 4  # two models, two processors
    for call in calls:
        flag = {k.arg: k.value for k in call.keywords}.get("use_safetensors")
        assert isinstance(flag, ast.Constant) and flag.value is True, ast.unparse(call)


def test_every_catalogue_case_is_run():
    run = [c.case for c in SPEC + OUTPUT + MODEL_LOADING]  # the parametrizations of the tests above
    every = [case for section in CATALOGUE for case in section.cases]
    assert sorted(c.name for c in run) == sorted(c.name for c in every)
    assert len({c.name for c in every}) == len(every)  # names are ids: unique


# --- more of the same rules ---------------------------------------------------------------------------------


def test_the_lock_file_names_its_holder(tmp_path):
    with lock_output(Location.of(tmp_path)):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", holder["since"])
        # Another open file of the lock: flock refuses it, in the same process too.
        busy = rf"is being written by another capfilt run \(pid {os.getpid()} "
        with pytest.raises(SpecError, match=busy), lock_output(Location.of(tmp_path)):
            pass
    with lock_output(Location.of(tmp_path)):  # released when the block ended
        pass


def test_capfilt_names_are_what_a_job_and_its_tools_write():
    names = capfilt_names(Location.of("/out"))
    assert {"manifest.json", "_input", "downloads", "shards", RETRY_DIR, LOCK_NAME} <= names
    assert "_input.parquet" in names  # an output of an earlier capfilt still resumes
    assert {".manifest.json.tmp", ".capfilt-rethreshold"} <= names


def test_an_object_store_output_is_checked_and_emptied_but_not_locked(s3_endpoint):
    from tests.s3 import new_bucket

    root = Location.of(f"s3://{new_bucket()}/job")
    (root / "notes.txt").write_text("mine")
    foreign = r"^output\.path: s3://.*/job holds files that are not a capfilt output"
    with pytest.raises(SpecError, match=foreign), claim_output(root, overwrite=False, log=lambda _: None):
        pass
    logs: list[str] = []
    with claim_output(root, overwrite=True, log=logs.append):
        assert list(root.iterdir()) == []
    assert any("in an object store, which capfilt cannot lock" in line for line in logs), logs
    bucket = Location.of(f"s3://{root.path.split('/')[0]}")
    whole = r"--overwrite will not delete a whole bucket"
    with pytest.raises(SpecError, match=whole), claim_output(bucket, overwrite=True, log=lambda _: None):
        pass


def test_submit_hands_overwrite_to_the_command_on_the_cluster(user, monkeypatch):
    for overwrite in (False, True):
        args = _parser().parse_args(entrypoint(overwrite).split()[1:])
        assert args.job == "job.yaml" and args.overwrite is overwrite
    asked = {}

    def submit(spec: JobSpec, address: str | None, overwrite: bool = False) -> str:
        asked["overwrite"] = overwrite
        return "raysubmit_test"

    monkeypatch.setattr("pipeline.job.cluster_jobs.submit", submit)
    assert main(["submit", user.job(), "--overwrite"]) == 0
    assert asked == {"overwrite": True}


@pytest.mark.parametrize(
    ("value", "refused"),
    [
        ("Salesforce/blip-image-captioning-large", False),
        ("blip-base", False),
        ("org/name/revision", True),
        ("./cap", True),
        ("../models/cap", True),
        ("/abs/cap", True),
        ("C:\\models\\cap", True),
        ("a" * 5000, False),  # a hub name too long for a path: not a crash, left to from_pretrained
        ("./cap\nnext", True),
    ],
)
def test_hub_names_are_left_to_from_pretrained_and_paths_must_exist(value, refused):
    if not refused:
        check_model("captioner.model", value, "BlipForConditionalGeneration")
        return
    with pytest.raises(SpecError, match=r"^captioner\.model: no such model directory: ") as err:
        check_model("captioner.model", value, "BlipForConditionalGeneration")
    assert "\n" not in str(err.value)


def test_a_typo_in_a_model_directory_is_caught_with_what_its_parent_holds(tmp_path, monkeypatch):
    """`capfilt tiny-models models`, then `filter.model: models/itm2`: one slash, like a hub name, but
    `models/` is a directory here, so it is a missing directory (no hub traffic, no retries in the
    actors), and the error shows the closest name."""
    for name in ("captioner", "itm"):
        (tmp_path / "models" / name).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as err:
        check_model("filter.model", "models/itm2", "BlipForImageTextRetrieval")
    assert str(err.value) == (
        "filter.model: no such model directory: models/itm2 (did you mean models/itm? models/ holds: captioner, itm)"
    )
    with pytest.raises(SpecError, match=r"did you mean models/captioner\? "):
        check_model("captioner.model", "models/captionr", "BlipForConditionalGeneration")
    check_model("captioner.model", "Salesforce/blip-image-captioning-large", "BlipForConditionalGeneration")


# --- fuzzing the spec loader ----------------------------------------------------------------------------------

SCHEMA = job_schema()
SECTIONS = sorted(SCHEMA["properties"])
FIELDS = {name: SCHEMA["properties"][name]["properties"] for name in SECTIONS}
MISSPELT = [
    "inptu",
    "captioning",
    "filters",
    "Output",
    "treshold",
    "top_k",
    "batchsize",
    "url-list",
    "model ",
    "",
]
URLS = "<urls>"  # replaced by an existing (empty) file, so that a spec can get past the file check
NO_LINE_BREAKS = st.characters(blacklist_categories=("Cs",))  # any character YAML can write (no surrogates)

strings = st.text(max_size=12) | st.sampled_from(
    [URLS, "10.0.0.0/8", "fd00::/8", "intranet", "parquet", "keep_ratio", "org/model", "./nope", ""]
)
scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # nan, inf, -inf and -0.0 included
    st.booleans(),
    st.none(),
    strings,
    st.dates(),
    st.datetimes(),
)
names = st.sampled_from(SECTIONS + sorted({k for f in FIELDS.values() for k in f}) + MISSPELT) | st.text(
    NO_LINE_BREAKS, max_size=6
)
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3),
    max_leaves=6,
)


def _typed(key: str, prop: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Mostly a value of the key's own type, so that specs get past the type checks and reach the
    range, network and file checks; sometimes anything at all."""
    kinds = prop.get("type", [])
    by_kind = {"integer": st.integers(-1, 100_000), "number": st.floats(-0.5, 2) | st.integers(-1, 2),
               "string": strings, "boolean": st.booleans(), "null": st.none(),
               "array": st.lists(st.text(max_size=8) | st.sampled_from(["10.0.0.0/8", "::1/128", "intranet"]),
                                 max_size=3)}  # fmt: skip
    typed = [by_kind[k] for k in (kinds if isinstance(kinds, list) else [kinds]) if k in by_kind]
    if "enum" in prop:
        typed.append(st.sampled_from(prop["enum"]))
    if key == "url_list":
        typed = [st.just(URLS)]
    own = st.one_of(*typed)
    return st.sampled_from(range(8)).flatmap(lambda n: anything if n == 7 else own)  # 1 in 8: anything


def _section(name: str, misspelt: bool) -> st.SearchStrategy[Any]:
    fields = FIELDS[name]
    required = {k: _typed(k, fields[k]) for k in SCHEMA["properties"][name].get("required", [])}
    optional = {k: _typed(k, p) for k, p in fields.items() if k not in required}
    if misspelt:
        return st.fixed_dictionaries(
            required, optional={**optional, **dict.fromkeys(MISSPELT[4:8], anything)}
        )
    return st.fixed_dictionaries(required, optional=optional)


def _spec(misspelt: bool) -> st.SearchStrategy[dict[str, Any]]:
    """A spec with the required sections and some of the others, keys of the schema's names."""
    others = {n: _section(n, misspelt) for n in SECTIONS if n not in ("input", "output")}
    if misspelt:
        others.update(dict.fromkeys(MISSPELT[:4], anything))
    return st.fixed_dictionaries({"input": _section("input", misspelt), "output": _section("output", misspelt)},
                                 optional=others)  # fmt: skip


specs = st.one_of(
    _spec(misspelt=False), _spec(misspelt=True), st.dictionaries(names, anything, max_size=4), anything
)
YAML_BITS = ["input:", "output:", "captioner:", "filter:", " url_list: ", " path: ", " threshold: ", URLS, "\n", "  ",
             "{", "}", "[", "]", ", ", "- ", ": ", "? ", "'", '"', "#", "~", "null", "1e999", ".nan", "-0.0", "0x1F",
             "!!str ", "!!python/object:os.system ", "\t", "%YAML 1.1\n", "---\n", "...\n", "|\n", ">\n",
             "&a ", "*a", "!!float ", "!!int ", "!!bool ", "!!binary ", "!!timestamp ", "2024-01-01", "1" * 40]  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("fuzz")
    (where / "urls.parquet").write_bytes(b"")  # the file check only asks whether it exists
    return where


def _json_key(key: Any) -> str:
    """A mapping key as the spec's messages name it: as a JSON key (1 is "1", None is "null"), what is
    not printable escaped (SpecError keeps its message on one line so)."""
    if not isinstance(key, str):
        key = json.dumps(key) if key is None or isinstance(key, bool | int | float) else str(key)
    return str(SpecError(key))


def assert_spec_or_one_line_error(path: Path) -> None:
    """`load_spec` returns a JobSpec or raises SpecError: one line, the file first and, for a mapping,
    then the key path it is about."""
    try:
        parsed = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:  # what PyYAML raises for a bad tag varies; load_spec must still say it in one line
        parsed = None
    for check_files in (True, False):
        try:
            spec = load_spec(path, check_files=check_files)
        except SpecError as err:
            text = str(err)
            assert "\n" not in text and "\r" not in text, text
            assert text.startswith(f"{path}: "), text
            rest = text[len(f"{path}: ") :]
            if rest.startswith("not valid YAML: "):
                assert ", line " in rest or ", position " in rest, text  # where in the file
            elif isinstance(parsed, dict):
                heads = {"(top level)", *SECTIONS, *map(_json_key, parsed)}
                assert any(rest.startswith((f"{h}: ", f"{h}.")) for h in heads), text
            event(
                f"refused: {'.'.join(rest.split(':')[0].split('.')[:2])[:30]}"
            )  # --hypothesis-show-statistics
        else:
            assert isinstance(spec, JobSpec)
            event("a JobSpec")


FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip


@FUZZ
@given(
    text=st.text(max_size=300)
    | st.lists(st.sampled_from(YAML_BITS) | st.text(max_size=4), max_size=40).map("".join)
)
def test_any_text_is_a_spec_or_one_line_error(fuzz_dir, text):
    path = fuzz_dir / "text.yaml"
    path.write_text(text.replace(URLS, str(fuzz_dir / "urls.parquet")), encoding="utf-8")
    assert_spec_or_one_line_error(path)


@FUZZ
@given(raw=specs)
def test_any_structure_of_the_schemas_names_is_a_spec_or_one_line_error(fuzz_dir, raw):
    path = fuzz_dir / "spec.yaml"
    path.write_text(
        yaml.safe_dump(_fill(raw, {URLS: str(fuzz_dir / "urls.parquet")}), allow_unicode=True),
        encoding="utf-8",
    )
    assert_spec_or_one_line_error(path)


@FUZZ
@given(
    overrides=st.lists(
        st.tuples(st.sampled_from([f"{s}.{k}" for s in SECTIONS for k in FIELDS[s]] + [*SECTIONS, *MISSPELT]),
                  st.text(max_size=20) | st.sampled_from(["null", "1e999", ".nan", "[1, 2]", "{a: 1}", "'2024'", "2024-01-01"])),
        max_size=4,
    )
)  # fmt: skip
def test_any_overrides_give_a_spec_or_one_line_error(fuzz_dir, overrides):
    path = fuzz_dir / "base.yaml"
    path.write_text(f"input: {{url_list: {fuzz_dir / 'urls.parquet'}}}\noutput: {{path: out}}\n")
    items = [f"{key}={value}" for key, value in overrides]
    try:
        spec = load_spec(path, overrides=items)
    except SpecError as err:
        # An override's own problem names --set, the rest the file.
        assert "\n" not in str(err) and str(err).startswith((f"{path}: ", "--set ")), str(err)
    else:
        assert isinstance(spec, JobSpec)


# Found by the fuzzers above, and fixed in pipeline/spec/config.py: mapping keys YAML allows but JSON does not,
# aliases (self-reference, exponential expansion), integers too long to print, PyYAML's plain Python
# errors for a bad explicit tag, a line break in a key.
FOUND_BY_FUZZING = {
    "date-key": ("2024-01-01: x\n", [], "2024-01-01: unknown key"),
    "binary-key": ("? !!binary aGVsbG8=\n: 1\n", [], "b'hello': unknown key"),
    "recursive-alias": ("captioner: &a {prompt: *a}\n", [], "aliases (*name) are not allowed"),
    "billion-laughs": ("x0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
                       + "".join(f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10)), [],
                       "aliases (*name) are not allowed"),
    "huge-integer": (f"output: {{path: out, shard_size: {'9' * 5000}}}\n", [], "cannot be read: ValueError: Exceeds the limit"),
    "long-integer": (f"output: {{path: out, shard_size: {10**30}}}\n", [], "output.shard_size: integer out of range"),
    "line-break-in-key": ('captioner: {"top\\np": 0.9}\n', [], "captioner.top\\np: unknown key"),
    "alias-in-override": ("", ["captioner.num_captions=&a [*a]"], "--set captioner.num_captions=&a [*a]: expected integer, got '&a [*a]'"),
    "bad-explicit-tag": ("filter: {threshold: !!float high}\n", [], "not valid YAML: tag:yaml.org,2002:float 'high' cannot be read: ValueError"),
    "nested-too-deeply": ("x: " + "[" * 5000 + "]" * 5000 + "\n", [], "not valid YAML: nested too deeply"),
    "empty-int-tag": ("filter: {batch_size: !!int }\n", [], "not valid YAML"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FOUND_BY_FUZZING))
def test_what_the_fuzzers_found_is_one_line_that_says_what(fuzz_dir, name):
    text, overrides, says = FOUND_BY_FUZZING[name]
    path = fuzz_dir / f"{name}.yaml"
    path.write_text(f"input: {{url_list: {fuzz_dir / 'urls.parquet'}}}\noutput: {{path: out}}\n{text}")
    with pytest.raises(SpecError) as refused:
        load_spec(path, overrides=overrides)
    assert "\n" not in str(refused.value) and says in str(refused.value), str(refused.value)
