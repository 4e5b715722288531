"""mmel.retrieval."""
