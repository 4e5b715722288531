"""mmel.data."""
