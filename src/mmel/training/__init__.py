"""mmel.training."""
