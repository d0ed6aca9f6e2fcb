"""Messages for manifests, logs and errors: one line, no terminal codes, the reason first."""

from __future__ import annotations

from pipeline.core.messages import one_line, printable

RAY_ERROR = (
    "\x1b[36mray::_StageActor.__call__()\x1b[39m (pid=4242, ip=10.0.0.5, actor_id=ab12)\n"
    "Traceback (most recent call last):\n"
    '  File "/opt/capfilt/pipeline/curate/capfilt_stage.py", line 242, in load\n'
    "    model = BlipForConditionalGeneration.from_pretrained(name)\n"
    '  File "/opt/venv/lib/python3.11/site-packages/transformers/modeling_utils.py", line 4100, in from_pretrained\n'
    "    raise OSError(message)\n"
    "\x1b[31mOSError\x1b[0m: models/itm2 is not a local folder\n"
    "and is not a valid model identifier listed on the hub\n"
)


def test_a_remote_traceback_becomes_its_exception_without_colour_codes():
    assert one_line(RuntimeError(RAY_ERROR)) == (
        "OSError: models/itm2 is not a local folder and is not a valid model identifier listed on the hub"
    )


def test_a_long_message_is_cut_at_a_word_and_says_so():
    text = "word " * 200
    cut = one_line(ValueError(text), limit=52)
    assert cut == "word " * 9 + "word…" and len(cut) <= 52
    assert one_line(ValueError("x" * 80), limit=10) == "x" * 9 + "…"  # no word to cut at
    assert one_line(ValueError("short  text\n here")) == "short text here"


def test_printable_escapes_what_would_break_the_line_or_drive_the_terminal():
    assert printable("a\nb\x1b[31m") == "a\\nb\\x1b[31m"
