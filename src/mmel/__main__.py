from mmel.cli.main import app

app()
