"""The keep rule and the fate counter, table-driven."""

from __future__ import annotations

import pytest

from pipeline.decide import SYNTHETIC, WEB, Candidate, candidates, decide
from pipeline.fates import Fate, count_fates


@pytest.mark.parametrize(
    ("web", "web_itm", "synthetic", "synthetic_itm", "threshold", "kept", "selected"),
    [
        ("a dog", 0.5, [], [], 0.5, [("a dog", WEB)], "a dog"),  # the boundary is kept
        ("a dog", 0.4999, [], [], 0.5, [], None),
        ("a dog", 0.9, ["a cat"], [0.2], 0.5, [("a dog", WEB)], "a dog"),
        ("a dog", 0.1, ["a cat", "a puppy"], [0.6, 0.8], 0.5, [("a puppy", SYNTHETIC), ("a cat", SYNTHETIC)],
         "a puppy"),
        ("a dog", 0.7, ["a puppy"], [0.9], 0.5, [("a puppy", SYNTHETIC), ("a dog", WEB)], "a puppy"),
        ("a dog", 0.7, ["a puppy"], [0.7], 0.5, [("a dog", WEB), ("a puppy", SYNTHETIC)], "a dog"),  # tie: web first
        ("", 0.99, ["a cat"], [0.6], 0.5, [("a cat", SYNTHETIC)], "a cat"),  # an empty web caption is no candidate
        ("   ", 0.99, [], [], 0.5, [], None),
        (None, None, ["a cat"], [0.6], 0.5, [("a cat", SYNTHETIC)], "a cat"),
        ("a dog", None, ["a cat"], [0.4], 0.3, [("a cat", SYNTHETIC)], "a cat"),  # unscored web caption
        ("a dog", 0.9, ["", " "], [0.99, 0.99], 0.5, [("a dog", WEB)], "a dog"),  # empty synthetic text skipped
        ("a dog", 0.0, ["a cat"], [0.0], 0.0, [("a dog", WEB), ("a cat", SYNTHETIC)], "a dog"),
        ("a dog", 1.0, ["a cat"], [1.0], 1.0, [("a dog", WEB), ("a cat", SYNTHETIC)], "a dog"),
    ],
)  # fmt: skip
def test_keep_rule(web, web_itm, synthetic, synthetic_itm, threshold, kept, selected):
    got, chosen = decide(candidates(web, web_itm, synthetic, synthetic_itm), threshold)
    assert [(c.text, c.source) for c in got] == kept
    assert chosen == selected
    assert all(c.itm >= threshold for c in got)


def test_kept_captions_are_sorted_best_first():
    found = [Candidate(f"c{i}", SYNTHETIC, s) for i, s in enumerate([0.6, 0.9, 0.7, 0.95])]
    kept, _ = decide(found, 0.5)
    assert [c.itm for c in kept] == [0.95, 0.9, 0.7, 0.6]


def test_mismatched_scores_are_an_error():
    with pytest.raises(ValueError):
        candidates("a dog", 0.5, ["a", "b"], [0.1])


def test_count_fates_lists_every_fate_and_refuses_unknown_ones():
    assert count_fates(["kept", "kept", "blocked"]) == {
        f.value: {"kept": 2, "blocked": 1}.get(f.value, 0) for f in Fate
    }
    assert list(count_fates([])) == [f.value for f in Fate]
    with pytest.raises(ValueError, match="unknown fate"):
        count_fates(["kept", "lost"])
