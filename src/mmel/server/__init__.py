"""mmel.server."""
