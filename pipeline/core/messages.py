"""One way to put an exception, or any text, into a manifest, a log line or an error message."""

from __future__ import annotations


def one_line(err: BaseException, limit: int = 500) -> str:
    """The exception's text on one line (whitespace runs collapsed), at most `limit` characters."""
    return " ".join(str(err).split())[:limit]


def printable(text: object) -> str:
    """`text` with each character that is not printable (a line break, an escape sequence) written as
    its escape: a message stays one line and cannot drive the terminal, whatever a path or key holds."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in str(text))
