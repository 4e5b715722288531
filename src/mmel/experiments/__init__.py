"""Offline experiments: `mmel evaluate` (baselines, exhaustive ranking, two-stage through the served linker)
and name-prior tuning. Nothing here serves a request; the server never imports it.

The name table below is imported by the CLI for its choices, so it stays free of heavy imports.
"""

BASELINES = ("bm25", "bm25-text", "dense", "name-match")   # `mmel evaluate --model` baselines (evaluate.py)
DIM_CANDIDATES = "dim-candidates"                          # DIM's candidate-limited protocol (models.md §4.7)
PROTOCOLS = ("full-kb", DIM_CANDIDATES)                    # `mmel evaluate --protocol`
