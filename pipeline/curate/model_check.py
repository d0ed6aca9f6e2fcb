"""The two model settings, checked on the driver before any work: a mistyped model directory should
fail in the first second, not in every CapFilt actor after the download.

A value that is an existing directory is a local model (as `JobSpec.with_absolute_paths` and
`from_pretrained` take it); a value that only looks like a path (absolute, `.`, `~`, a backslash,
more than one `/`, or `dir/name` where `dir` is a directory here: `models/itm2` after
`capfilt tiny-models models`) is a missing directory, not a hub name, and the error names what its
parent holds; anything else is a hub name, left to
`from_pretrained` (this check never uses the network; `run_job` then loads the captioner's image
processor before any work, so a hub name that does not resolve fails before the download too).

A local directory must hold what capfilt will load: a `config.json` naming the right BLIP head (the
two are easy to swap) and weights in safetensors format. capfilt never loads pickle checkpoints
(`pytorch_model.bin`): unpickling runs code from the file. The actors also pass
`use_safetensors=True`, so a hub model without safetensors weights is refused there too.

Why only here, called by `run_job` and not by `load_spec`: the model must exist where the job's
driver runs. `capfilt run` calls `run_job` right after loading the spec, before Ray starts, so it
still fails in the first second; `capfilt submit` validates a spec whose directories may exist only
on the cluster, and a finished job's spec is read back from its manifest after its models may be
gone. One check, in the one function every job goes through.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

from pipeline.core.messages import one_line, printable
from pipeline.core.storage import is_uri
from pipeline.curate.blip_text import first_token_id
from pipeline.spec.config import JobSpec, SpecError

CAPTIONER_CLASS = "BlipForConditionalGeneration"
FILTER_CLASS = "BlipForImageTextRetrieval"
MODEL_TYPE = "blip"
HUB_EXAMPLE = {"captioner.model": "Salesforce/blip-image-captioning-large",
               "filter.model": "Salesforce/blip-itm-large-coco"}  # fmt: skip
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # transformers 4 / 5


def check_models(spec: JobSpec) -> None:
    """Raise SpecError (one line, naming the key) for a model setting capfilt cannot load."""
    check_model("captioner.model", spec.captioner.model, CAPTIONER_CLASS)
    check_model("filter.model", spec.filter.model, FILTER_CLASS)


def check_itm_tokenizer(spec: JobSpec) -> None:
    """Under `filter.itm_first_token: enc`, the filter's tokenizer must hold BLIP's `[ENC]` token: read
    it on the driver (a directory, or a hub name from the cache or the hub) so that a tokenizer without
    one is a one-line error before any download, not a failed shard per actor."""
    if spec.filter.itm_first_token != "enc":
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.filter.model)
    except (OSError, ValueError, KeyError, TypeError) as err:
        shown = printable(spec.filter.model)
        raise SpecError(f"filter.model: cannot read the tokenizer of {shown}: {one_line(err)}") from None
    first_token_id(tokenizer, spec.filter)


def embedding_size(spec: JobSpec) -> int:
    """The filter checkpoint's ITC embedding size (`image_text_hidden_size`), read on the driver from
    its config (a directory, or a hub name from the cache or the hub): it fixes the type of every
    shard's `image_embedding` column, a shard with no scored row included."""
    from transformers import BlipConfig

    try:
        return int(BlipConfig.from_pretrained(spec.filter.model).image_text_hidden_size)
    except (OSError, ValueError, KeyError, TypeError) as err:
        shown = printable(spec.filter.model)
        raise SpecError(f"filter.model: cannot read the config of {shown}: {one_line(err)}") from None


def check_model(key: str, value: str, architecture: str) -> None:
    # os.path's tests, not pathlib's: they answer False for a name too long or with a NUL byte.
    path, shown = Path(value), printable(value)
    if os.path.isdir(value):
        _check_directory(key, path, architecture)
    elif is_uri(value):
        raise SpecError(f"{key}: {shown}: models load from a local directory or a hub name, not a URI")
    elif os.path.exists(value):
        raise SpecError(f"{key}: {shown} is a file; name the model's directory (config.json, *.safetensors)")
    elif value.startswith("~") and os.path.isdir(os.path.expanduser(value)):
        home = printable(os.path.expanduser(value))
        raise SpecError(f"{key}: {shown}: '~' is not expanded in a job spec; write {home}")
    elif looks_like_a_path(value):
        hint = _near_directories(value) or f"a local directory, or a hub name such as {HUB_EXAMPLE[key]}"
        raise SpecError(f"{key}: no such model directory: {shown} ({hint})")


def looks_like_a_path(value: str) -> bool:
    """Not a hub name (`org/name` or `name`): what a user meant as a directory. `org/name` is a path
    when `org` is a directory here, as a hub organisation's name seldom is."""
    if value.startswith(("/", ".", "~")) or "\\" in value or value.count("/") > 1:
        return True
    parent, slash, _ = value.partition("/")
    return bool(slash) and os.path.isdir(parent)


def _near_directories(value: str) -> str:
    """What the missing directory's parent holds, the closest name first: the typo, shown."""
    parent = os.path.dirname(value.rstrip("/")) or "."
    try:
        names = sorted(e.name for e in os.scandir(parent) if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return ""
    if not names:
        return ""
    close = difflib.get_close_matches(os.path.basename(value.rstrip("/")), names, n=1)
    hint = f"did you mean {printable(os.path.join(parent, close[0]))}? " if close else ""
    listed = ", ".join(printable(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
    return f"{hint}{printable(parent)}/ holds: {listed}"


def _check_directory(key: str, path: Path, architecture: str) -> None:
    config = _read_config(key, path)
    shown = printable(path)
    found = config.get("architectures") or []
    found = [str(a) for a in found] if isinstance(found, list) else [str(found)]
    model_type = config.get("model_type")
    if (found and architecture not in found) or (not found and model_type != MODEL_TYPE):
        what = f"a {', '.join(found)}" if found else f"a model of type {model_type!r}"
        raise SpecError(
            f"{key}: {shown} holds {what} (its config.json); captioner.model needs a {CAPTIONER_CLASS} "
            f"and filter.model a {FILTER_CLASS}"
        )
    if not any(path.glob("*.safetensors")):
        raise SpecError(
            f"{key}: {shown} has no .safetensors weights; capfilt does not load pickle checkpoints "
            "(convert it with save_pretrained(safe_serialization=True))"
        )
    if not any((path / name).is_file() for name in PROCESSOR_FILES):
        raise SpecError(
            f"{key}: {shown} has no {' or '.join(PROCESSOR_FILES)}; save the model's processor beside it "
            "(processor.save_pretrained)"
        )


def _read_config(key: str, path: Path) -> dict:
    config = path / "config.json"
    if not config.is_file():
        raise SpecError(f"{key}: {printable(path)} has no config.json; not a transformers model directory")
    try:
        found = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SpecError(f"{key}: {printable(config)} is not valid JSON: {one_line(err)}") from None
    if not isinstance(found, dict):
        raise SpecError(f"{key}: {printable(config)} is not a JSON object")
    return found
