"""Lexical scorers, in one place: BM25 over entity text (`bm25`), the surface-name match (`name_match`),
fuzzy name candidates (`fuzzy`, DIM's protocol) and reciprocal-rank fusion of ranked lists (`fusion`).

They read strings, never features or models, so the linker, evaluation and training share them.
"""
