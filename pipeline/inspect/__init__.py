"""Reading an output back: `capfilt inspect` (its figures, the text and the HTML report) and the
loader that feeds a pretraining run from the shards.

May import: `core`, `spec`, `ingest`, `curate`, `output`, `job`.
"""
