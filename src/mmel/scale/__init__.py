"""Scale-out on Ray: the Ray engine for batch work (`ray_engine.py`) and replicated serving (`serve.py`).

The only package that imports Ray; the commands import it only for `--engine ray` or
`mmel serve --replicas N` with N > 1, so the default local runs never load Ray.
"""
