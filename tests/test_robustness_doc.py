"""docs/robustness.md is the hostile-input catalogue the tests run, rendered; it cannot drift."""

from __future__ import annotations

from pathlib import Path

from pipeline.spec.fates import Fate
from tests.catalogue import ERROR, RUNS, SCORED, render, sections

PAGE = Path(__file__).resolve().parents[1] / "docs" / "robustness.md"


def test_the_page_is_the_catalogue_rendered():
    assert PAGE.read_text() == render(), (
        "docs/robustness.md is stale: python -m tests.catalogue > docs/robustness.md"
    )


def test_every_case_has_a_unique_name_and_a_known_outcome():
    cases = [case for section in sections() for case in section.cases]
    names = [case.name for case in cases]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    known = {f.value for f in Fate} | {SCORED, ERROR}
    unknown = [c.name for c in cases if c.outcome not in known and not c.outcome.startswith(RUNS)]
    assert unknown == []
