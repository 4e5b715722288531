"""mmel.features."""
