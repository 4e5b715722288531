"""`mmel serve --replicas N`: the same API from N replicas over one index, on Ray Serve.

Each replica is a Ray actor that builds the very app `mmel serve` runs (`create_app`, built in
the replica from the settings, so nothing big is pickled): its lifespan opens the index there
and starts the replica's own `LinkBatcher`, so dynamic batching works per replica. Ray Serve's
HTTP proxy listens on the settings' host and port and spreads requests over the replicas; it
lets a replica hold `2 * max_batch` requests at a time, enough to fill a batch. Replicas on one
node share the index files through the page cache where the index is memory-mapped.

What differs from the single-process server: the proxy is Ray Serve's own uvicorn, so what
`mmel serve` sets on its uvicorn (`server.running`: the room for long URLs and header blocks
that the app answers 414/431, the time a request head may take to arrive) is the proxy's own
setting here; and `/health` describes whichever replica answers.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import torch
from fastapi import FastAPI

from mmel.core.errors import UsageError
from mmel.server.app import create_app
from mmel.server.settings import ServerSettings

logger = logging.getLogger(__name__)

APP_NAME = "mmel"


def build_replica_app(settings: ServerSettings, threads: int | None) -> FastAPI:
    """A replica's app, built in the replica (its lifespan loads the index there)."""
    if threads is not None:
        torch.set_num_threads(threads)
    return create_app(settings)


def run_replicas(settings: ServerSettings, replicas: int, *, threads: int | None = None,
                 ray_address: str | None = None, cpus_per_replica: float = 1.0,
                 stop: threading.Event | None = None) -> None:
    """Serve the API from `replicas` replicas on `settings.host:settings.port` until SIGINT/SIGTERM (or `stop`).

    Joins the Ray cluster at `ray_address` (and removes only this app from its Serve at the end),
    or starts a private one for the server's life.
    """
    if replicas < 1:
        raise UsageError(f"--replicas must be at least 1, got {replicas}")
    # Ray's handler for fatal signals, installed when Ray is first imported, would abort this process on
    # SIGTERM before the clean stop below (leaving the Ray it started running): Ray is imported after this.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    from ray import serve

    from mmel.scale.cluster import RayConnection

    connection = RayConnection(ray_address, num_cpus=replicas * cpus_per_replica)
    deployed = False
    try:
        if connection.cluster_cpus() < replicas * cpus_per_replica:
            raise UsageError(f"{replicas} replicas of {cpus_per_replica:g} CPU need {replicas * cpus_per_replica:g} "
                             f"CPUs; the Ray cluster has {connection.cluster_cpus():g}")
        serve.start(http_options={"host": settings.host, "port": settings.port}, proxy_location="HeadOnly")
        def build_app() -> FastAPI:   # a plain function: Ray Serve calls it in each replica (a partial it would not)
            return build_replica_app(settings, threads)

        deployment = serve.deployment(
            serve.ingress(build_app)(), name=APP_NAME,
            num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica},
            max_ongoing_requests=2 * settings.max_batch)
        deployed = True
        serve.run(deployment.bind(), name=APP_NAME, route_prefix="/")
        logger.warning("serving %s with %d replicas at http://%s:%d", settings.index_dir, replicas, settings.host,
                       settings.port)
        _wait_for_stop(stop or threading.Event())
    finally:
        if deployed:
            serve.delete(APP_NAME)        # its replicas close their linkers
        if connection.started_here:
            serve.shutdown()
        connection.close()


def _wait_for_stop(stop: threading.Event) -> None:
    """Block until `stop` is set or the process gets SIGINT or SIGTERM (before this, during start-up, Ray's
    own SIGTERM handler exits with SystemExit, which stops everything through the same `finally`)."""
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


__all__ = ["build_replica_app", "run_replicas"]
