"""mmel.cli."""
