"""Images out of a WebDataset tar, by sample key: the chunk reader, the writer, retry-failed and the
HTML report.

A tar has no index, so finding a member means reading the headers before it; with `keys` given,
reading stops at the last wanted image.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Collection

from pipeline.core.storage import Location


def read_jpegs(
    path: Location | str | os.PathLike[str], keys: Collection[str] | None = None
) -> dict[str, bytes]:
    """KEY.jpg bytes by KEY, for every sample or only `keys` (those found)."""
    wanted = None if keys is None else set(keys)
    found: dict[str, bytes] = {}
    if wanted is not None and not wanted:
        return found
    with Location.of(path).open("rb") as stream, tarfile.open(fileobj=stream) as archive:
        for member in archive:
            key, _, ext = member.name.partition(".")
            if ext != "jpg" or (wanted is not None and key not in wanted):
                continue
            found[key] = archive.extractfile(member).read()  # type: ignore[union-attr]
            if wanted is not None and len(found) == len(wanted):
                break
    return found
