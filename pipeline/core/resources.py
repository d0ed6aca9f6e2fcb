"""What one worker of a stage needs. Stages declare it; only the runner turns it into Ray options."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resources:
    cpus: float = 1
    gpus: float = 0
