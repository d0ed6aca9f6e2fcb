"""Stage 2, CapFilt itself: raw shards read as chunks, decoded and resized on the CPU
(`PreprocessStage`), captioned and ITM-scored by one actor holding both BLIP models (`CapFiltStage`),
a failed chunk split or retried (`chunk_retry`), and the keep rule applied to stored scores
(`decide`). Also the model-directory checks and the tiny checkpoints the tests and demo build.

May import: `core`, `spec`, `ingest`.
"""
