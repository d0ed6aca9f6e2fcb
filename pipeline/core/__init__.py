"""Plumbing every stage shares: where files live (`storage`: a local path or an fsspec URI, written
whole), one-line messages, the `Resources` a stage declares, stage timings, and reading images out
of a WebDataset tar.

Imports nothing else of `pipeline` (only the package's version); everything else may import it.
"""
