"""Stage 1, from a URL list to raw shards on disk: reading the list's formats, `prepare` (input shards,
keys, the URL policy per row, duplicate counting), and img2dataset's per-shard download inside the
network guard (`fetch_guard`) and the image guard.

May import: `core`, `spec`.
"""
