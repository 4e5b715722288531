"""Offline experiments: `mmel evaluate` (baselines, exhaustive ranking, two-stage through the served linker)
and name-prior tuning. Nothing here serves a request; the server never imports it."""
