"""The keep rule and the fate counter, table-driven."""

from __future__ import annotations

import pytest

from pipeline.curate.decide import SYNTHETIC, WEB, Candidate, candidates, decide
from pipeline.spec.config import KeepSpec
from pipeline.spec.fates import Fate, add_counts, count_fates

FATES = [
    "kept",
    "filtered",
    "duplicate_image",
    "download_failed",
    "decode_failed",
    "wrong_size",
    "invalid_input",
    "blocked",
]


@pytest.mark.parametrize(
    ("web", "web_itm", "synthetic", "synthetic_itm", "threshold", "kept", "selected"),
    [
        # the threshold boundary: equal is kept, just below is dropped
        ("a dog", 0.5, [], [], 0.5, [("a dog", WEB, 0.5)], "a dog"),
        ("a dog", 0.4999, [], [], 0.5, [], None),
        ("a dog", 0.0, ["a cat"], [0.0], 0.0, [("a dog", WEB, 0.0), ("a cat", SYNTHETIC, 0.0)], "a dog"),
        ("a dog", 1.0, ["a cat"], [0.9999], 1.0, [("a dog", WEB, 1.0)], "a dog"),
        # web only
        ("a dog", 0.9, ["a cat"], [0.2], 0.5, [("a dog", WEB, 0.9)], "a dog"),
        ("a dog", 0.8, [], [], 0.5, [("a dog", WEB, 0.8)], "a dog"),
        # synthetic only, best first
        ("a dog", 0.1, ["a cat", "a puppy"], [0.6, 0.8], 0.5, [("a puppy", SYNTHETIC, 0.8), ("a cat", SYNTHETIC, 0.6)], "a puppy"),
        (None, None, ["a cat"], [0.6], 0.5, [("a cat", SYNTHETIC, 0.6)], "a cat"),
        # both
        ("a dog", 0.7, ["a puppy"], [0.9], 0.5, [("a puppy", SYNTHETIC, 0.9), ("a dog", WEB, 0.7)], "a puppy"),
        ("a dog", 0.95, ["a puppy", "a cat"], [0.9, 0.6], 0.5, [("a dog", WEB, 0.95), ("a puppy", SYNTHETIC, 0.9), ("a cat", SYNTHETIC, 0.6)], "a dog"),
        # none passes
        ("a dog", 0.3, ["a cat", "a puppy"], [0.2, 0.49], 0.5, [], None),
        (None, None, [], [], 0.5, [], None),
        # ties: the web caption first, then the synthetic ones in their order
        ("a dog", 0.7, ["a puppy"], [0.7], 0.5, [("a dog", WEB, 0.7), ("a puppy", SYNTHETIC, 0.7)], "a dog"),
        ("a dog", 0.6, ["a cat", "a puppy"], [0.7, 0.7], 0.5, [("a cat", SYNTHETIC, 0.7), ("a puppy", SYNTHETIC, 0.7), ("a dog", WEB, 0.6)], "a cat"),
        # an empty or blank web caption is never a candidate, whatever its score
        ("", 0.99, ["a cat"], [0.6], 0.5, [("a cat", SYNTHETIC, 0.6)], "a cat"),
        ("   ", 0.99, [], [], 0.5, [], None),
        ("\n\t", 0.99, ["a cat"], [0.1], 0.0, [("a cat", SYNTHETIC, 0.1)], "a cat"),
        # an unscored web caption (web_itm None) is not a candidate
        ("a dog", None, ["a cat"], [0.4], 0.3, [("a cat", SYNTHETIC, 0.4)], "a cat"),
        ("a dog", None, [], [], 0.0, [], None),
        # empty synthetic text is skipped, whatever its score
        ("a dog", 0.9, ["", " "], [0.99, 0.99], 0.5, [("a dog", WEB, 0.9)], "a dog"),
        (None, None, ["", "a cat", "  "], [1.0, 0.6, 1.0], 0.5, [("a cat", SYNTHETIC, 0.6)], "a cat"),
        # text is kept whole (not stripped)
        (" a dog ", 0.9, [], [], 0.5, [(" a dog ", WEB, 0.9)], " a dog "),
    ],
)  # fmt: skip
def test_keep_rule(web, web_itm, synthetic, synthetic_itm, threshold, kept, selected):
    got, chosen = decide(candidates(web, web_itm, synthetic, synthetic_itm), threshold)
    assert [(c.text, c.source, c.itm) for c in got] == kept
    assert chosen == selected
    assert all(isinstance(c.itm, float) for c in got)


@pytest.mark.parametrize(
    ("web", "web_itm", "synthetic", "synthetic_itm", "expected"),
    [
        ("a dog", 0.2, ["a cat", "a puppy"], [0.3, 0.4], [("a dog", WEB), ("a cat", SYNTHETIC), ("a puppy", SYNTHETIC)]),
        ("", 0.2, ["a cat"], [0.3], [("a cat", SYNTHETIC)]),
        ("a dog", None, ["a cat"], [0.3], [("a cat", SYNTHETIC)]),
        (None, 0.2, [], [], []),
        ("a dog", 1, [], [], [("a dog", WEB)]),  # an int score becomes a float
    ],
)  # fmt: skip
def test_candidates_are_every_scored_non_empty_caption_web_first(
    web, web_itm, synthetic, synthetic_itm, expected
):
    found = candidates(web, web_itm, synthetic, synthetic_itm)
    assert [(c.text, c.source) for c in found] == expected
    assert all(type(c.itm) is float for c in found)


@pytest.mark.parametrize(
    ("scores", "threshold", "kept"),
    [
        ([0.6, 0.9, 0.7, 0.95], 0.5, [0.95, 0.9, 0.7, 0.6]),
        ([0.6, 0.9, 0.7, 0.95], 0.8, [0.95, 0.9]),
        ([0.1, 0.2], 0.5, []),
        ([], 0.5, []),
    ],
)
def test_kept_captions_are_sorted_best_first(scores, threshold, kept):
    found = [Candidate(f"c{i}", SYNTHETIC, s) for i, s in enumerate(scores)]
    got, selected = decide(found, threshold)
    assert [c.itm for c in got] == kept
    assert selected == (got[0].text if got else None)


# web caption (itm 0.9, itc 0.2), then synthetic a..d: (itm, itc)
RANKED = [("a", 0.6, 0.5), ("b", 0.95, 0.1), ("c", 0.4, 0.9), ("d", 0.7, 0.3)]


@pytest.mark.parametrize(
    ("keep", "threshold", "kept"),
    [
        (KeepSpec(), 0.5, ["b", "web", "d", "a"]),  # CapFilt's rule: every passing caption, by ITM
        (KeepSpec(by="itc"), 0.5, ["a", "d", "web", "b"]),  # the same captions, by ITC ("c" fails ITM)
        (KeepSpec(rule="top_k", k=2), 0.5, ["b", "web"]),
        (KeepSpec(rule="top_k", k=2, by="itc"), 0.5, ["a", "d"]),  # the best ITC among those passing ITM
        (KeepSpec(rule="top_k", k=10), 0.5, ["b", "web", "d", "a"]),  # k larger than what passes
        (KeepSpec(rule="top_k", k=1, by="itc"), 0.0, ["c"]),
        (KeepSpec(rule="top_k", k=3), 0.99, []),  # top-k never keeps a caption below the threshold
    ],
)
def test_top_k_and_itc_ranking(keep, threshold, kept):
    found = candidates(
        "web", 0.9, [t for t, _, _ in RANKED], [m for _, m, _ in RANKED], 0.2, [c for _, _, c in RANKED]
    )
    got, selected = decide(found, threshold, keep)
    assert [c.text for c in got] == kept
    assert selected == (kept[0] if kept else None)


def test_ranking_by_itc_needs_itc_scores():
    found = candidates("a dog", 0.9, ["a cat"], [0.8])  # as a shard written before ITC stores them
    assert decide(found, 0.5)[1] == "a dog"
    with pytest.raises(ValueError, match="ranking by ITC needs ITC scores"):
        decide(found, 0.5, KeepSpec(by="itc"))


@pytest.mark.parametrize(
    ("synthetic", "synthetic_itm"), [(["a", "b"], [0.1]), (["a"], [0.1, 0.2]), ([], [0.1])]
)
def test_mismatched_lengths_are_an_error(synthetic, synthetic_itm):
    with pytest.raises(ValueError):
        candidates("a dog", 0.5, synthetic, synthetic_itm)


# --- fates -----------------------------------------------------------------------------------------


def test_the_fates_are_the_contract():
    assert [f.value for f in Fate] == FATES


@pytest.mark.parametrize(
    ("statuses", "nonzero"),
    [
        ([], {}),
        (["kept", "kept", "blocked"], {"kept": 2, "blocked": 1}),
        (FATES, dict.fromkeys(FATES, 1)),
        ([Fate.FILTERED, "filtered", Fate.DECODE_FAILED], {"filtered": 2, "decode_failed": 1}),
        (iter(["invalid_input"] * 3), {"invalid_input": 3}),
    ],
)
def test_count_fates_lists_every_fate_zeros_included(statuses, nonzero):
    counts = count_fates(statuses)
    assert list(counts) == FATES
    assert counts == {f: nonzero.get(f, 0) for f in FATES}


@pytest.mark.parametrize(
    ("statuses", "unknown"),
    [(["kept", "lost"], "['lost']"), (["KEPT"], "['KEPT']"), (["ok", "kept", "error"], "['error', 'ok']"), ([None], "[None]")],
)  # fmt: skip
def test_count_fates_refuses_unknown_fates(statuses, unknown):
    with pytest.raises(ValueError) as caught:
        count_fates(statuses)
    assert str(caught.value) == f"unknown fate(s): {unknown}"


def test_add_counts_adds_fate_by_fate():
    total = add_counts(count_fates(["kept", "blocked"]), {"kept": 3, "filtered": 1})
    assert total == {
        "kept": 4,
        "filtered": 1,
        "duplicate_image": 0,
        "download_failed": 0,
        "decode_failed": 0,
        "wrong_size": 0,
        "invalid_input": 0,
        "blocked": 1,
    }
