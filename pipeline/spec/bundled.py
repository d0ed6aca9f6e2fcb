"""Where the files that ship beside the code live.

`schemas/` and `jobs/` sit at the repository root because they are contracts a user reads;
a built wheel carries copies under `pipeline/_bundled/`. One function finds either.
"""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]  # pipeline/


def bundled_path(*parts: str) -> Path:
    """The path of a shipped file, e.g. `bundled_path("schemas", "job.schema.json")`."""
    for root in (_PACKAGE / "_bundled", _PACKAGE.parent):
        candidate = root.joinpath(*parts)
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"capfilt is installed without its {'/'.join(parts)}")
