"""What a job is and what it promises: the job spec (YAML, checked against `schemas/job.schema.json`,
its fingerprint), the files a job writes under `output.path` (`layout`), the fates a row can end in,
and the output shard's Arrow schema (`records`).

May import: `core`.
"""
