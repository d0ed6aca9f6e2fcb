"""One way to put an exception into a manifest, a log line or an error message."""

from __future__ import annotations


def one_line(err: BaseException, limit: int = 500) -> str:
    """The exception's text on one line (whitespace runs collapsed), at most `limit` characters."""
    return " ".join(str(err).split())[:limit]
