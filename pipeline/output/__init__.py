"""Stage 3, what a job leaves behind: the shard writer (fates, WebDataset tar, Parquet, `done.json`),
the manifest and its accounting, the end-of-run summary, and `JobOutput`, the one reader of a
finished or running output.

May import: `core`, `spec`, `ingest`, `curate`.
"""
