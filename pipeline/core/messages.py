"""One way to put an exception, or any text, into a manifest, a log line or an error message."""

from __future__ import annotations

import re

# Terminal control sequences (colours, cursor moves): Ray colours the remote errors it re-raises.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_TRACEBACK = "Traceback (most recent call last):"


def one_line(err: BaseException | str, limit: int = 500) -> str:
    """The exception's text on one line (whitespace runs collapsed), at most `limit` characters, cut
    at a word with "…". Colour codes are dropped, and of a text that carries a traceback (Ray's remote
    errors do) only the exception after its last frame is kept: the reason, not the stack."""
    text = " ".join(_reason(_ANSI.sub("", str(err))).split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut) + "…"


def _reason(text: str) -> str:
    if _TRACEBACK not in text:
        return text
    lines = text.splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  ")]  # frames and their code
    after = [line for line in lines[frames[-1] + 1 :] if line.strip()] if frames else []
    return "\n".join(after) or text


def printable(text: object) -> str:
    """`text` with each character that is not printable (a line break, an escape sequence) written as
    its escape: a message stays one line and cannot drive the terminal, whatever a path or key holds."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in str(text))
