"""Serving: the index (FAISS vectors, SQLite entity store, the model's entity cache, BM25), the first stage,
reranking, NIL calibration and the Linker that answers queries."""
