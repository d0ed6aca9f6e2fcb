"""The job spec: YAML in, typed and validated before anything starts.

`schemas/job.schema.json` is the contract; these dataclasses are its typed mirror (a test keeps
the two from drifting). Every problem is reported as one line naming the key path, so a typo
fails in the first second instead of after an hour of downloading.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import ipaddress
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from pipeline.core.messages import printable
from pipeline.core.storage import Location, is_uri
from pipeline.spec.bundled import bundled_path
from pipeline.spec.list_files import ListFilesError, list_files
from pipeline.spec.records import SCHEMA_VERSION

DEFAULT_DISALLOWED_HEADER_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")


class SpecError(ValueError):
    """A job spec problem, as one line that names where it is (a line break in a key or value it
    quotes is written as an escape, so the line stays one)."""

    def __init__(self, message: str) -> None:
        super().__init__(printable(message))


class OverrideError(SpecError):
    """A `--set` override's problem: the message names `--set`, not the spec file it was applied to."""


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: a job spec has no use for `&anchor`/`*alias`, and with
    them a few hundred bytes expand to gigabytes ("billion laughs") or a value contains itself."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a spec", mark)
        return super().compose_node(parent, index)

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        """PyYAML raises plain ValueError, KeyError… for a bad explicit tag (`!!float high`): here they
        become YAML errors, with the line and column they are at."""
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as err:
            problem = f"{node.tag} {node.value!r} cannot be read: {type(err).__name__}: {err}"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_SpecLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as err:
        raise SpecError(f"not valid YAML: {' '.join(str(err).split())}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise SpecError("not valid YAML: nested too deeply") from None


@dataclass(frozen=True)
class InputSpec:
    url_list: str
    input_format: str | None = None  # None: from the extension of the list's files (`list_files`)
    url_col: str = "url"
    caption_col: str | None = "caption"
    extra_columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class DownloadSpec:
    image_size: int = 384
    resize_mode: str = "keep_ratio"
    timeout: float = 10
    retries: int = 0
    thread_count: int = 64
    allow_private_networks: bool = False
    allowed_networks: tuple[str, ...] = ()
    denied_networks: tuple[str, ...] = ()
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 100_000_000
    min_image_size: int = 0  # img2dataset's: an image whose shorter side is under it ends `wrong_size`
    max_aspect_ratio: float | None = None  # img2dataset's (None: no limit): longer side over shorter
    user_agent_token: str | None = None
    disallowed_header_directives: tuple[str, ...] = DEFAULT_DISALLOWED_HEADER_DIRECTIVES


@dataclass(frozen=True)
class CaptionerSpec:
    model: str = "Salesforce/blip-image-captioning-large"
    num_captions: int = 1
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    prompt: str = "a picture of "
    min_length: int = 5
    max_length: int = 20
    batch_size: int = 32
    seed: int = 0
    decoder: str = "own"  # the project's decode loop; "generate": transformers' generate, for comparison
    compile: bool = False  # torch.compile the decode step (own decoder); off, or failing: eager, logged


@dataclass(frozen=True)
class KeepSpec:
    """Which of an image's captions that pass the ITM threshold it keeps, best first by `by`:
    all of them (`threshold`, CapFilt's rule), or the `k` best (`top_k`, BLIP-2's: sample many, keep
    the best). The best kept caption is the one a sample is trained with."""

    rule: str = "threshold"  # or "top_k"
    k: int = 1
    by: str = "itm"  # or "itc": the ITC cosine similarity ranks


CAPFILT_KEEP = KeepSpec()  # every caption that passes, best ITM first


@dataclass(frozen=True)
class DedupSpec:
    """Which kept images are copies of an earlier kept image (`curate.dedup`): equal decoded pixels
    (`exact`), or an ITC embedding cosine of at least `near_threshold` (None: not by embedding)."""

    exact: bool = True
    near_threshold: float | None = None


@dataclass(frozen=True)
class FilterSpec:
    model: str = "Salesforce/blip-itm-large-coco"
    threshold: float = 0.5
    batch_size: int = 128
    itm_first_token: str = "enc"  # BLIP's ITM reads [ENC] first; "cls": transformers' [CLS]
    text_normalise: str = "blip"  # BLIP's pre_caption before ITM; "none": the text as written
    max_words: int = 30
    keep: KeepSpec = CAPFILT_KEEP
    dedup: DedupSpec = DedupSpec()


@dataclass(frozen=True)
class ResourcesSpec:
    """How the job runs, never what it writes: none of these is in a fingerprint."""

    actors: int | None = None
    gpus_per_actor: float = 1
    cpus_per_actor: float = 1
    download_tasks: int | None = None  # None: the CPUs the actors leave, at least one
    shards_in_flight: int | None = None  # None: download_tasks + 2 per actor
    download_deadline_s: float | None = None  # None: `runner.default_download_deadline`
    download_attempts: int = 3


@dataclass(frozen=True)
class OutputSpec:
    path: str
    shard_size: int = 10000
    keep_downloads: bool = False  # True: raw shards stay after their commit, for retry-failed and rethreshold
    image_embeddings: bool = True  # False: the shards' image_embedding column is null (scored all the same)


@dataclass(frozen=True)
class JobSpec:
    input: InputSpec
    output: OutputSpec
    download: DownloadSpec = field(default_factory=DownloadSpec)
    captioner: CaptionerSpec = field(default_factory=CaptionerSpec)
    filter: FilterSpec = field(default_factory=FilterSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def fingerprint(self) -> str:
        """Hash of everything that decides an output shard's content.

        Resources and the output path do not change what is written, so a job can be moved or
        resized and still resume; a changed threshold or model makes old shards stale.
        """
        sections = self._sections("input", "download", "captioner", "filter")
        sections["shard_schema"] = SCHEMA_VERSION  # a shard of another schema is rewritten, not mixed in
        if not self.output.image_embeddings:  # added later: left out at its default, as `_ADDED_LATER`
            sections["image_embeddings"] = False
        return _hash(sections)

    def with_absolute_paths(self) -> JobSpec:
        """Paths as the driver sees them, so Ray workers (on other nodes too) open the same files.

        A model value that is an existing directory is a path; anything else is a hub name. A URI
        (`s3://…`, `file:///…`) already names the same thing everywhere and is left as it is.
        """

        def absolute(value: str) -> str:
            return str(Path(value).resolve()) if Path(value).exists() else value

        def location(value: str) -> str:
            return value if is_uri(value) else str(Path(value).resolve())

        return dataclasses.replace(
            self,
            input=dataclasses.replace(self.input, url_list=location(self.input.url_list)),
            captioner=dataclasses.replace(self.captioner, model=absolute(self.captioner.model)),
            filter=dataclasses.replace(self.filter, model=absolute(self.filter.model)),
            output=dataclasses.replace(self.output, path=location(self.output.path)),
        )

    def download_fingerprint(self) -> str:
        """Hash of everything that decides the raw (downloaded) shards."""
        return _hash(self.download_settings())

    def download_settings(self) -> dict[str, Any]:
        """Everything that decides the raw (downloaded) shards: the input and download sections (a
        setting added later left out at its default) and the shard size."""
        return self._sections("input", "download")

    def _sections(self, *names: str) -> dict[str, Any]:
        spec = self.to_dict()
        for section, keys in _ADDED_LATER.items():
            defaults = {f.name: f.default for f in dataclasses.fields(_SECTIONS[section])}
            for key in keys:
                if spec[section][key] == _as_json(defaults[key]):
                    del spec[section][key]
        return {**{k: spec[k] for k in names}, "shard_size": spec["output"]["shard_size"]}


# Settings added after outputs were first written. At their default they are left out of the
# fingerprints, so that work finished before they existed stays finished, and resumes, after an
# upgrade. A setting added later goes here.
_ADDED_LATER = {
    "input": ("extra_columns",),
    "captioner": ("decoder", "compile"),
    "filter": ("keep",),
    "download": (
        "allowed_networks",
        "denied_networks",
        "max_body_bytes",
        "max_image_pixels",
        "min_image_size",
        "max_aspect_ratio",
    ),
}


def _as_json(value: Any) -> Any:
    """A setting's value as the spec's JSON holds it (a nested section as its mapping)."""
    return json.loads(json.dumps(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value))


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


_SECTIONS: dict[str, type] = {
    "input": InputSpec,
    "download": DownloadSpec,
    "captioner": CaptionerSpec,
    "filter": FilterSpec,
    "resources": ResourcesSpec,
    "output": OutputSpec,
}


def job_schema() -> dict[str, Any]:
    return json.loads(bundled_path("schemas", "job.schema.json").read_text())


def load_spec(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), check_files: bool = True
) -> JobSpec:
    """Read, override (`key.path=value`, value parsed as YAML), validate and type a job spec.

    `check_files=False` is for a spec that runs elsewhere (`capfilt submit`): its URL list need
    only exist where the job runs."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such job spec file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: cannot read the job spec: {' '.join(str(err).split())}") from None
    try:
        raw = _parse_yaml(text)
        raw = raw if raw is not None else {}
        return spec_from_dict(raw, overrides) if check_files else typed_spec(raw, overrides)
    except OverrideError:
        raise
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None


def spec_from_dict(raw: Any, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """A spec to run: validated, typed, its URL list's files found and their format settled."""
    return _check_files(typed_spec(raw, overrides))


def typed_spec(raw: Any, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Validated and typed, without looking at the files it names: how a finished job's spec is read
    back from its manifest (its URL list may be long gone)."""
    if not isinstance(raw, dict):
        raise SpecError(f"the spec must be a mapping of sections, not {type(raw).__name__}")
    raw = _plain(raw)  # a copy that holds JSON's types only
    for item in overrides:
        _apply_override(raw, item)
    try:
        _validate(raw)
    except SpecError as err:
        raise _blamed_on_override(err, overrides) from None
    sections = {name: _section(cls, raw[name]) for name, cls in _SECTIONS.items() if name in raw}
    spec = JobSpec(**sections)
    _check_networks(spec.download)
    _check_dedup(spec)
    return spec


def _section(cls: type, values: dict[str, Any]) -> Any:
    """A validated section's dataclass; a nested section (`filter.keep`) as its own dataclass."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    typed = {}
    for key, value in values.items():
        if dataclasses.is_dataclass(defaults[key]):
            typed[key] = _section(type(defaults[key]), value)
        else:
            typed[key] = tuple(value) if isinstance(value, list) else value
    return cls(**typed)


def _blamed_on_override(err: SpecError, overrides: list[str] | tuple[str, ...]) -> SpecError:
    """The error as `--set`'s when it is about a key an override set (a typo in `--set` is not the
    spec file's), else as it is."""
    for item in overrides:
        key, message = item.partition("=")[0].strip(), str(err)
        if message.startswith(f"{key}: "):
            return OverrideError(f"--set {item}: {message.removeprefix(f'{key}: ')}")
        if message.startswith(f"{key}."):
            return OverrideError(f"--set {item}: {message}")
    return err


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise OverrideError(f"--set {item!r}: expected key.path=value")
    try:
        value = _plain(_parse_yaml(text), key.strip())  # as in a spec file: dates become strings
    except SpecError:
        value = text
    if isinstance(value, str) and not text.strip().startswith(("'", '"')):
        value = text  # YAML would strip it: "captioner.prompt=a picture of " keeps its space
    *parents, leaf = key.strip().split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise OverrideError(f"--set {key}: {'.'.join(parents[: i + 1])} is not a section")
        node = child
    node[leaf] = value


_MAX_INTEGER = 2**63  # no setting needs more; a 5000-digit one cannot even be printed


def _plain(value: Any, where: str = "") -> Any:
    """`value` with JSON's types only, as a schema validates: mapping keys become strings (YAML allows
    numbers, dates, even binary keys), dates and other YAML scalars strings; a SpecError names where
    an integer is out of range."""
    if isinstance(value, dict):
        plain = {}
        for key, item in value.items():
            name = _plain_key(key, where)
            plain[name] = _plain(item, f"{where}.{name}" if where else name)
        return plain
    if isinstance(value, list | tuple):
        return [_plain(item, f"{where}.{i}" if where else str(i)) for i, item in enumerate(value)]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _MAX_INTEGER:
        raise SpecError(f"{where or '(top level)'}: integer out of range (at most 2**63 - 1 in size)")
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _plain_key(key: Any, where: str) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, int) and not isinstance(key, bool) and abs(key) >= _MAX_INTEGER:
        raise SpecError(f"{where or '(top level)'}: a key is an integer out of range")
    return json.dumps(key) if key is None or isinstance(key, bool | int | float) else str(key)


def _is_integer(_checker: Any, instance: Any) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)  # 3.0 is not an integer here


def _is_number(_checker: Any, instance: Any) -> bool:
    return isinstance(instance, int | float) and not isinstance(instance, bool) and math.isfinite(instance)


# Stricter than JSON Schema's defaults: `batch_size: 64.0` would reach range() as a float, and a
# NaN threshold passes minimum/maximum and then silently filters every row.
_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine_many(
        {"integer": _is_integer, "number": _is_number}
    ),
)


def _validate(raw: dict[str, Any]) -> None:
    validator = _Validator(job_schema())
    errors = sorted(validator.iter_errors(raw), key=lambda e: (len(e.absolute_path), list(e.absolute_path)))
    if errors:
        raise SpecError(_describe(errors[0]))


def _describe(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        key = unknown[0]
        hint = difflib.get_close_matches(key, allowed, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else f" (allowed: {', '.join(allowed)})"
        return f"{where + '.' if where else ''}{key}: unknown key{suggestion}"
    if error.validator == "required":
        missing = error.message.split("'")[1]
        return f"{where + '.' if where else ''}{missing}: required key is missing"
    if error.validator == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return f"{where or '(top level)'}: expected {expected}, got {error.instance!r}"
    if error.validator == "enum":
        choices = ", ".join("null (the default)" if v is None else str(v) for v in error.validator_value)
        return f"{where}: {error.instance!r} is not one of {choices}"
    return f"{where or '(top level)'}: {error.message}"


def _check_networks(download: DownloadSpec) -> None:
    for key in ("allowed_networks", "denied_networks"):
        for i, value in enumerate(getattr(download, key)):
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise SpecError(
                    f"download.{key}.{i}: {value!r} is not a network (CIDR, e.g. 10.0.0.0/8 or fd00::/8)"
                ) from None


def _check_dedup(spec: JobSpec) -> None:
    """Near dedup decides from the stored embeddings when a shard is written again (retry-failed,
    rethreshold), so it needs them stored."""
    if spec.filter.dedup.near_threshold is not None and not spec.output.image_embeddings:
        raise SpecError(
            "filter.dedup.near_threshold needs output.image_embeddings: true (retry-failed and rethreshold "
            "decide near duplicates from the stored embeddings); set one or the other"
        )


def _check_files(spec: JobSpec) -> JobSpec:
    """The spec with `input.input_format` settled from the list's files (so the spec a job records,
    and its fingerprints, name it), once the list and the output location are found usable."""
    try:
        _, input_format = list_files(spec.input.url_list, spec.input.input_format)
    except ListFilesError as err:
        raise SpecError(str(err)) from None
    output = spec.output.path
    if is_uri(output):
        try:
            Location.of(output)
        except (ImportError, ValueError) as err:
            raise SpecError(f"output.path: cannot open {output}: {' '.join(str(err).split())}") from None
    return dataclasses.replace(spec, input=dataclasses.replace(spec.input, input_format=input_format))
