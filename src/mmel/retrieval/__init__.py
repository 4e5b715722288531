"""Serving: the index (FAISS vectors, SQLite entity store, the model's entity cache, BM25), the first stage,
reranking, NIL calibration and the Linker that answers queries.

The name table below is imported by the CLI for its choices, so it stays free of heavy imports.
"""

FIRST_STAGES = ("dense", "bm25", "hybrid")   # first-stage kinds (first_stage.py)
