"""Where the files that ship beside the code live.

`schemas/` and `jobs/` sit at the repository root because they are contracts a user reads;
a built wheel carries copies under `pipeline/_bundled/`. One function finds either.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def bundled_path(*parts: str) -> Path:
    """The path of a shipped file, e.g. `bundled_path("schemas", "job.schema.json")`."""
    for root in (_HERE / "_bundled", _HERE.parent):
        candidate = root.joinpath(*parts)
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"capfilt is installed without its {'/'.join(parts)}")
