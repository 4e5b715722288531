"""mmel.evaluation."""
