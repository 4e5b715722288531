"""mmel.server.routers."""
