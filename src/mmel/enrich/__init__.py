"""mmel.enrich."""
