"""The cluster files agree with each other, with the image and with docs/cluster.md.

Nothing here builds the image or starts a cluster (no Docker daemon or Kubernetes on the project's
machines). What can drift silently is checked instead: one Ray version everywhere (Ray refuses a
driver of another version), one image name everywhere (a node on another tag runs other code), a
valid job spec with paths every node can open, and docs whose links lead somewhere.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import transformers
import yaml

from pipeline import __version__
from pipeline.curate.attention import CHECKED_TRANSFORMERS
from pipeline.spec.config import typed_spec

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "jobs" / "cluster"
DOC = ROOT / "docs" / "cluster.md"
DOCKERFILE = ROOT / "Dockerfile"

BASE_IMAGE = re.compile(r"^FROM\s+rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py311-gpu\s*$", re.MULTILINE)
IMAGE_TAG = re.compile(r":(?P<capfilt>[^:/]+)-ray(?P<ray>\d+\.\d+\.\d+)$")
BUILD_COMMAND = re.compile(r"docker build\b[^\n]*?\s-t\s+(\S+)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def kuberay() -> tuple[dict[str, Any], dict[str, Any]]:
    """The RayCluster and its shared volume claim."""
    documents = [d for d in yaml.safe_load_all((CLUSTER / "kuberay-raycluster.yaml").read_text()) if d]
    by_kind = {d["kind"]: d for d in documents}
    assert set(by_kind) == {"RayCluster", "PersistentVolumeClaim"}, sorted(by_kind)
    return by_kind["RayCluster"], by_kind["PersistentVolumeClaim"]


def launcher() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "ray-cluster-launcher.yaml").read_text())


def groups(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Head and worker groups by name, each with rayStartParams and a pod template."""
    return {"head": cluster["spec"]["headGroupSpec"]} | {
        g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]
    }


def containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def documented_image() -> str:
    images = set(BUILD_COMMAND.findall(DOC.read_text()))
    assert len(images) == 1, f"docs/cluster.md should build one image, found {sorted(images)}"
    return images.pop()


def dockerfile_ray() -> str:
    match = BASE_IMAGE.search(DOCKERFILE.read_text())
    assert match, "Dockerfile: no FROM rayproject/ray:X.Y.Z-py311-gpu"
    return match["ray"]


def test_the_cluster_files_parse_as_what_they_claim():
    cluster, claim = kuberay()
    assert cluster["apiVersion"] == "ray.io/v1"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod mounts it at once
    config = launcher()
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def test_one_ray_version_in_the_dockerfile_kuberay_and_the_launcher():
    ray = dockerfile_ray()
    cluster, _ = kuberay()
    assert cluster["spec"]["rayVersion"] == ray
    for image in [launcher()["docker"]["image"], documented_image()]:
        tag = IMAGE_TAG.search(image)
        assert tag, f"{image}: tag should end in -ray<version>"
        assert tag["ray"] == ray, f"{image}: Ray {tag['ray']}, the Dockerfile builds on Ray {ray}"


def test_every_cluster_file_runs_the_image_docs_cluster_md_builds():
    image = documented_image()
    cluster, _ = kuberay()
    used = {name: [c["image"] for c in containers(g)] for name, g in groups(cluster).items()}
    used["launcher"] = [launcher()["docker"]["image"]]
    used["Dockerfile's build comment"] = BUILD_COMMAND.findall(DOCKERFILE.read_text())
    for where, images in used.items():
        assert images and set(images) == {image}, f"{where}: {images}, docs/cluster.md builds {image}"


def test_the_image_pins_the_transformers_the_sdpa_attention_was_checked_against():
    pinned = re.search(r"ARG TRANSFORMERS_VERSION=(\S+)", DOCKERFILE.read_text())
    assert pinned and pinned[1] == CHECKED_TRANSFORMERS == transformers.__version__


def test_the_image_tag_names_this_capfilt_version():
    # A new version under an old tag is not pulled again by nodes that have the old one.
    assert IMAGE_TAG.search(documented_image())["capfilt"] == __version__


def test_gpus_declared_to_ray_match_the_gpus_each_pod_asks_for():
    cluster, _ = kuberay()
    for name, group in groups(cluster).items():
        limits = [c.get("resources", {}).get("limits", {}) for c in containers(group)]
        asked = sum(int(limit.get("nvidia.com/gpu", 0)) for limit in limits)
        declared = group["rayStartParams"].get("num-gpus")
        if name == "head":
            assert (asked, declared) == (0, "0"), "the head must declare 0 GPUs, so no actor waits on it"
        else:
            assert declared == str(asked), f"group {name}: num-gpus {declared!r} but {asked} GPUs per pod"
    assert any(group["rayStartParams"].get("num-gpus", "0") != "0" for group in groups(cluster).values())
    head_start = " ".join(launcher()["head_start_ray_commands"])
    assert "--num-gpus=0" in head_start


def test_every_pod_mounts_the_shared_volume_and_a_memory_backed_shm():
    cluster, claim = kuberay()
    for name, group in groups(cluster).items():
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            data = volumes[mounts["/data"]]
            assert data["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], name
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", name
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("HF_HOME", "").startswith("/data/"), f"{name}: HF_HOME off the shared volume"


def test_the_cluster_job_spec_is_valid_with_paths_every_node_can_open():
    specs = {
        path.name: document
        for path in sorted(CLUSTER.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if isinstance(document, dict) and "input" in document  # not a cluster definition
    }
    assert "cc3m-on-cluster.yaml" in specs
    for name, raw in specs.items():
        spec = typed_spec(raw)
        # A relative path would be made absolute on the submitting machine, not on the cluster.
        for value in (spec.input.url_list, spec.output.path):
            assert value.startswith(("/data/", "s3://", "gs://")), f"{name}: {value}"


def test_the_dockerignore_lets_in_exactly_what_the_dockerfile_copies():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "everything else (.git, .venv, demo/, test artefacts, outputs) stays out"
    let_in = {line[1:] for line in lines if line.startswith("!")}
    copied = set()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            copied.update(w for w in line.split()[1:-1] if not w.startswith("--"))
    assert copied <= let_in, f"copied but left out of the build context: {sorted(copied - let_in)}"
    # The wheel's own inputs must all be copied, or `pip install` in the image fails.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {"pyproject.toml", project["project"]["readme"], *wheel["packages"], *wheel["force-include"]}
    assert needed <= copied, f"the wheel needs {sorted(needed - copied)}, which the Dockerfile does not copy"


def _anchors(markdown: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", markdown.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize(
    "doc", [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name
)
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(doc):
    links = [link for link in LINK.findall(doc.read_text()) if not re.match(r"[a-z]+:", link)]
    assert links or doc != DOC, "no relative links found: has the link syntax changed?"
    for link in links:
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        assert path.exists(), f"{doc.name}: {link} -> no such file"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{doc.name}: {link} -> no such heading"
