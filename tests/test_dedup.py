"""Image dedup: exact by decoded pixels, near by embedding cosine, first occurrence in input order kept,
across shards that arrive in any order; and a whole job with planted copies, rethresholded and retried."""

from __future__ import annotations

import io
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.curate.dedup import DuplicateIndex, InInputOrder, KeptImage, pixel_hash
from pipeline.job.rethreshold import rethreshold
from pipeline.job.retry import retry_failed
from pipeline.job.runner import run_job
from pipeline.output.job_output import JobOutput
from pipeline.spec.config import DedupSpec
from pipeline.spec.layout import OutputLayout
from pipeline.synthetic.dedup_bench import (
    COPY_KINDS,
    NEAR_THRESHOLDS,
    format_dedup_report,
    meets_target,
    planted_copy,
    run_dedup_bench,
)
from pipeline.synthetic.sample_web import Route, jpeg_bytes, png_bytes, render_scene
from tests.conftest import make_spec, read_records, tar_keys

D = 8
EXACT = DedupSpec(exact=True, near_threshold=None)
NEAR = DedupSpec(exact=False, near_threshold=0.95)
BOTH = DedupSpec(exact=True, near_threshold=0.95)


def unit(*values: float) -> np.ndarray:
    v = np.zeros(D, dtype=np.float32)
    v[: len(values)] = values
    return (v / np.linalg.norm(v)).astype(np.float16)


def at_cosine(base: np.ndarray, cosine: float, towards: int = 7) -> np.ndarray:
    """A unit vector at exactly `cosine` from `base` (which must be orthogonal to axis `towards`)."""
    b = base.astype(np.float32)
    other = np.zeros(D, dtype=np.float32)
    other[towards] = 1
    return (cosine * b + np.sqrt(1 - cosine**2) * other).astype(np.float16)


def image(key: str, pixels: str | None = None, embedding: np.ndarray | None = None) -> KeptImage:
    return KeptImage(key, pixels, embedding)


def test_the_pixel_hash_is_of_decoded_pixels_and_size():
    rgb = np.random.default_rng(0).integers(0, 256, (6, 4, 3), dtype=np.uint8)
    as_png, as_bmp = io.BytesIO(), io.BytesIO()
    Image.fromarray(rgb).save(as_png, format="PNG")
    Image.fromarray(rgb).save(as_bmp, format="BMP")
    decoded = [np.asarray(Image.open(io.BytesIO(b.getvalue())).convert("RGB")) for b in (as_png, as_bmp)]
    assert pixel_hash(decoded[0]) == pixel_hash(decoded[1]) == pixel_hash(rgb)  # two encodings, one picture
    assert pixel_hash(rgb.reshape(4, 6, 3)) != pixel_hash(rgb)  # the same bytes in another shape
    changed = rgb.copy()
    changed[0, 0, 0] ^= 1
    assert pixel_hash(changed) != pixel_hash(rgb)


def test_exact_copies_point_at_the_first_occurrence_across_batches():
    index = DuplicateIndex(EXACT, D)
    assert index.decide([image("a", "p1"), image("b", "p2"), image("c", "p1")]) == {"c": "a"}
    assert index.decide([image("d", "p2"), image("e", "p3"), image("f", "p1"), image("g", None)]) == {
        "d": "b",
        "f": "a",
    }


def test_near_copies_at_or_above_the_threshold_and_not_below():
    base = unit(1, 0, 0)
    index = DuplicateIndex(NEAR, D)
    assert index.decide([image("a", "p1", base)]) == {}
    close, far = at_cosine(base, 0.96), at_cosine(base, 0.93)
    # The same pixel hash is no copy when only near dedup is on.
    assert index.decide([image("b", "p1", far), image("c", "p9", close)]) == {"c": "a"}


def test_a_copy_of_a_copy_is_measured_against_the_original():
    a = unit(1, 0, 0)
    b = at_cosine(a, 0.97, towards=6)  # a copy of a
    c = (
        0.97 * b.astype(np.float32) + np.sqrt(1 - 0.97**2) * unit(0, 0, 0, 0, 0, 1).astype(np.float32)
    ).astype(np.float16)
    assert float(np.dot(a.astype(np.float32), c.astype(np.float32))) < 0.95  # but c is no copy of a
    rows = [image("a", None, a), image("b", None, b), image("c", None, c)]
    for batches in ([rows], [[row] for row in rows]):  # one batch, or a shard each
        index = DuplicateIndex(NEAR, D)
        decided = {}
        for batch in batches:
            decided |= index.decide(batch)
        assert decided == {"b": "a"}


def test_within_a_batch_a_copy_points_at_the_most_similar_earlier_original():
    a, b = unit(1, 0, 0), unit(0, 1, 0)
    c = unit(1, 0.3, 0)  # cosine 0.958 with a, 0.287 with b
    d = unit(1, 0.05, 0)  # near a and c; c is a copy, so d points at a
    index = DuplicateIndex(BOTH, D)
    decided = index.decide(
        [image("a", "pa", a), image("b", "pb", b), image("c", "pc", c), image("d", "pd", d)]
    )
    assert decided == {"c": "a", "d": "a"}


def test_rows_without_a_hash_or_embedding_are_never_copies():
    index = DuplicateIndex(BOTH, D)
    assert index.decide([image("a"), image("b"), image("c", "p", None), image("d", "p", None)]) == {"d": "c"}


def test_originals_from_earlier_shards_and_dedup_off():
    index = DuplicateIndex(BOTH, D)
    index.add_originals([image("a", "p1", unit(1, 0)), image("b", "p2", unit(0, 1))])
    assert index.decide([image("c", "p2", unit(0, 0, 1)), image("d", "p9", unit(1, 0.01))]) == {
        "c": "b",
        "d": "a",
    }
    off = DuplicateIndex(DedupSpec(exact=False, near_threshold=None), D)
    assert not off.active
    assert off.decide([image("a", "p1", unit(1)), image("b", "p1", unit(1))]) == {}


def test_shards_are_decided_in_input_order_whatever_order_they_arrive_in():
    in_order = InInputOrder(["s0", "s1", "s2", "s3"], DuplicateIndex(EXACT, D))
    # s1 arrives first and holds the image s0 will have: s0, earlier in the input, keeps it.
    assert in_order.arrived("s1", [image("s1-a", "p1")], "payload 1") == []
    assert in_order.arrived("s3", [image("s3-a", "p2")], "payload 3") == []
    assert in_order.arrived("s0", [image("s0-a", "p1")], "payload 0") == [
        ("s0", "payload 0", {}),
        ("s1", "payload 1", {"s1-a": "s0-a"}),
    ]
    # A failed shard is passed over: the shards after it are decided without it.
    assert in_order.failed("s2") == [("s3", "payload 3", {})]


def test_with_dedup_off_a_shard_is_handed_back_as_it_arrives():
    in_order = InInputOrder(["s0", "s1"], DuplicateIndex(DedupSpec(exact=False), D))
    assert in_order.arrived("s1", [image("k", "p")], "payload") == [("s1", "payload", {})]


@pytest.mark.parametrize("threshold", [0.5, 0.95, 1.0])
def test_near_dedup_agrees_with_brute_force_cosines(threshold):
    """faiss's batched searches decide what a plain loop over every pair in order decides."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(6, D))
    vectors = np.concatenate([c + 0.15 * rng.normal(size=(5, D)) for c in centres])[rng.permutation(30)]
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
    rows = [image(f"{i:02d}", None, v) for i, v in enumerate(vectors)]
    index = DuplicateIndex(DedupSpec(exact=False, near_threshold=threshold), D)
    decided = index.decide(rows[:10]) | index.decide(rows[10:])
    unit32 = vectors.astype(np.float32)
    unit32 /= np.linalg.norm(unit32, axis=1, keepdims=True)
    expected, originals = {}, []
    for i in range(len(rows)):
        near = [j for j in originals if unit32[i] @ unit32[j] >= threshold]
        if near:
            expected[rows[i].key] = rows[max(near, key=lambda j: unit32[i] @ unit32[j])].key
        else:
            originals.append(i)
    assert set(decided) == set(expected)


# --- a whole job ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("ray_local")
def test_a_job_keeps_the_first_occurrence_and_names_it_in_every_copy(tmp_path, web, tiny_models, capsys):
    """Planted copies over three shards: a byte copy and a lossless re-encoding (exact), a recompressed
    copy (near), a copy in a later shard, a copy that only a retry fetches. Threshold 0 keeps every
    scored row, so dedup alone decides."""
    site, _ = web
    x, y, z = (render_scene(900 + i)[0] for i in range(3))
    stored_x = Image.open(io.BytesIO(jpeg_bytes(x))).convert("RGB")  # the pixels a JPEG of x decodes to
    bodies = {
        "/d/x.jpg": jpeg_bytes(x),
        "/d/y.jpg": jpeg_bytes(y),
        "/d/x-copy.jpg": jpeg_bytes(x),  # byte copy
        "/d/x.png": png_bytes(stored_x, mode="RGB"),  # the same pixels, losslessly
        "/d/z.jpg": jpeg_bytes(z),
        "/d/y-copy.jpg": jpeg_bytes(y),  # a copy in the next shard
        "/d/x-q30.jpg": jpeg_bytes(x, quality=30),  # other pixels, the same picture
        "/d/late.jpg": jpeg_bytes(y),  # fails now, a copy once retried
    }
    for path, body in bodies.items():
        kind = "image/png" if path.endswith(".png") else "image/jpeg"
        site.add(path, Route(503) if path == "/d/late.jpg" else Route(200, body, (("Content-Type", kind),)))
    rows = [(site.url(path), f"row {i}") for i, path in enumerate(bodies)]
    near = {
        "dedup": {"exact": True, "near_threshold": 0.999}
    }  # the tiny model: copies at 1.0, others < 0.996
    output = {"shard_size": 3, "keep_downloads": True}
    spec = make_spec(tmp_path, rows, tiny_models, filter={"threshold": 0.0, **near}, output=output)
    result = run_job(spec, log=lambda _: None)
    records = {r["url"].rsplit("/", 1)[1]: r for r in read_records(result.layout)}
    key = {name: r["key"] for name, r in records.items()}
    fates = {name: (r["status"], r["duplicate_of"]) for name, r in records.items()}
    assert fates == {
        "x.jpg": ("kept", None),
        "y.jpg": ("kept", None),
        "x-copy.jpg": ("duplicate_image", key["x.jpg"]),
        "x.png": ("duplicate_image", key["x.jpg"]),
        "z.jpg": ("kept", None),
        "y-copy.jpg": ("duplicate_image", key["y.jpg"]),
        "x-q30.jpg": ("duplicate_image", key["x.jpg"]),
        "late.jpg": ("download_failed", None),
    }
    assert (
        records["x.png"]["pixel_hash"] == records["x.jpg"]["pixel_hash"] != records["x-q30.jpg"]["pixel_hash"]
    )
    assert records["x-copy.jpg"]["kept_captions"] and records["x-copy.jpg"]["caption"] is None
    assert result.manifest["counts"]["duplicate_image"] == 4 and result.complete
    assert tar_keys(result.layout) == Counter(key[n] for n in ("x.jpg", "y.jpg", "z.jpg"))

    # `capfilt inspect` counts them, and its report lists them with the key each repeats.
    assert main(["inspect", str(result.layout.root), "--html", str(tmp_path / "report.html")]) == 0
    assert re.search(r"^duplicate_image\s+4\s", capsys.readouterr().out, re.MULTILINE)
    report = (tmp_path / "report.html").read_text()
    assert "duplicate_image: an earlier kept row shows the same image (duplicate_of) (4 rows)" in report
    assert f'<td class="text">{key["x.jpg"]}</td>' in report

    # Exact only: the recompressed copy is its own image, until rethreshold dedups near copies too.
    exact = make_spec(tmp_path, rows, tiny_models, out="exact", filter={"threshold": 0.0}, output=output)
    exact_root = run_job(exact, log=lambda _: None).layout.root
    assert _fates_by_name(exact_root)["x-q30.jpg"] == "kept"
    assert _fates_by_name(exact_root)["x.png"] == "duplicate_image"
    near_out = tmp_path / "near"
    assert main(["rethreshold", str(exact_root), "--near-threshold", "0.999", "--out", str(near_out)]) == 0
    assert _fates_by_name(near_out)["x-q30.jpg"] == "duplicate_image"

    # rethreshold decides again from the stored hashes and embeddings: the same decisions.
    again = rethreshold(JobOutput.open(result.layout.root), 0.0, tmp_path / "again")
    assert again["counts"] == result.manifest["counts"]
    assert {r["key"]: r for r in read_records(OutputLayout(tmp_path / "again"))} == {
        r["key"]: r for r in read_records(result.layout)
    }

    # A row folded in later is decided against everything kept, the shards after its own included.
    site.add("/d/late.jpg", Route(200, bodies["/d/late.jpg"], (("Content-Type", "image/jpeg"),)))
    retry_failed(JobOutput.open(result.layout.root), log=lambda _: None)
    late = next(r for r in read_records(result.layout) if r["url"].endswith("/d/late.jpg"))
    assert (late["status"], late["duplicate_of"]) == ("duplicate_image", key["y.jpg"])
    manifest = JobOutput.open(result.layout.root).manifest
    assert manifest["counts"]["duplicate_image"] == 5 and sum(manifest["counts"].values()) == len(rows)


def _fates_by_name(root) -> dict[str, str]:
    return {r["url"].rsplit("/", 1)[1]: r["status"] for r in read_records(OutputLayout(root))}


def test_the_target_needs_recall_on_all_and_on_altered_copies_and_few_false_merges():
    met = {"recall_all": 0.96, "recall_altered": 0.95, "false_merge_rate": 0.01}
    assert meets_target(met)
    assert not meets_target({**met, "recall_altered": 0.94})  # exact copies alone cannot carry it
    assert not meets_target({**met, "recall_all": None})
    assert not meets_target({**met, "false_merge_rate": 0.011})


def test_planted_copies_are_what_their_kind_says():
    rng = np.random.default_rng(0)
    jpeg = jpeg_bytes(render_scene(7, size=64)[0])
    original = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    copies = {kind: planted_copy(jpeg, kind, rng) for kind in COPY_KINDS}
    assert copies["byte_copy"] == (jpeg, "image/jpeg")
    decoded = {k: np.asarray(Image.open(io.BytesIO(body)).convert("RGB")) for k, (body, _) in copies.items()}
    assert copies["lossless"][1] == "image/png" and pixel_hash(decoded["lossless"]) == pixel_hash(original)
    assert decoded["recompressed"].shape == original.shape and pixel_hash(
        decoded["recompressed"]
    ) != pixel_hash(original)
    assert (
        32 <= decoded["resized"].shape[0] < 48
        and decoded["resized"].shape[:2] == decoded["resized"].shape[1::-1]
    )
    assert 56 <= decoded["cropped"].shape[0] <= 60 and 56 <= decoded["cropped"].shape[1] <= 60


@pytest.mark.slow  # a job over the synthetic world
@pytest.mark.usefixtures("ray_local")
def test_the_dedup_bench_finds_every_exact_copy_and_merges_nothing_else(tmp_path):
    report = run_dedup_bench(distinct=30, copies_per_kind=2, out=tmp_path, log=lambda _: None)
    assert report["unscored"] == 0 and report["job_dedup"] == {"exact": True, "near_threshold": None}
    job = report["job"]
    assert job["recall"]["byte_copy"] == job["recall"]["lossless"] == 1.0
    assert job["recall"]["recompressed"] == job["recall"]["cropped"] == 0.0  # other pixels: no exact copy
    assert job["false_merges"] == 0
    assert job["recall_altered"] == 0.0 and not job["meets_target"]
    assert report["sweep"]["None"] == job  # the replay decides as the job did
    assert set(report["sweep"]) == {str(t) for t in NEAR_THRESHOLDS}
    printed = format_dedup_report(report)
    assert "byte_copy" in printed and "target: recall >= 0.95" in printed


@pytest.mark.usefixtures("ray_local")
def test_a_slow_first_shard_keeps_its_image_over_copies_that_finished_first(tmp_path, web, tiny_models):
    """The first shard answers 4 s late, so the shards after it arrive first and wait for it, holding
    every slot but its own (2 in flight, 2 downloading): the job ends, and the first occurrence, in the
    slow shard, is the one kept."""
    site, _ = web
    jpeg = (("Content-Type", "image/jpeg"),)
    copy = jpeg_bytes(render_scene(950)[0])
    site.add("/slow/first.jpg", Route(200, copy, jpeg, stall_s=4))
    for i in range(6):
        site.add(f"/slow/{i}.jpg", Route(200, jpeg_bytes(render_scene(960 + i)[0]), jpeg))
    site.add("/slow/copy.jpg", Route(200, copy, jpeg))
    names = ["first.jpg", "0.jpg", "1.jpg", "copy.jpg", "2.jpg", "3.jpg", "4.jpg", "5.jpg"]
    rows = [(site.url(f"/slow/{name}"), f"row {i}") for i, name in enumerate(names)]
    resources = {"shards_in_flight": 2, "download_tasks": 2}
    sections = {"filter": {"threshold": 0.0}, "output": {"shard_size": 2}, "resources": resources}
    spec = make_spec(tmp_path, rows, tiny_models, **sections)
    result = run_job(spec, log=lambda _: None)
    assert result.complete
    fates = {
        r["url"].rsplit("/", 1)[1]: (r["status"], r["duplicate_of"]) for r in read_records(result.layout)
    }
    first = next(r["key"] for r in read_records(result.layout) if r["url"].endswith("/first.jpg"))
    assert fates["first.jpg"] == ("kept", None) and fates["copy.jpg"] == ("duplicate_image", first)
    assert result.manifest["timings"]["shards_in_flight"]["peak"] <= 2
