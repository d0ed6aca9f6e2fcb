"""Running whole jobs: the runner (the only module that knows Ray: it wires the stages into Ray Data
and tasks), who may write an output (`output_guard`: refusals, `--overwrite`, the lock), resume,
`rethreshold`, `retry-failed`, and submitting to a cluster through the Ray Jobs API.

May import: `core`, `spec`, `ingest`, `curate`, `output`.
"""
