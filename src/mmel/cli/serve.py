"""`mmel serve`: the REST API and the web page over one index, with uvicorn (imported when the command runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmel.cli.choices import QueryRuntimeName, QueryRuntimeOption
from mmel.cli.engines import EngineName
from mmel.cli.errors import exit_on_user_errors

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def serve(
    index_dir: Annotated[Path, typer.Argument(help="Index directory (from `mmel index build`).")],
    host: Annotated[str, typer.Option(help="Interface to bind; the default serves this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    token: Annotated[str | None, typer.Option(envvar="MMEL_SERVER_TOKEN", help="Require this bearer token on "
                                              "/link and /entities (prefer the environment variable).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Most mentions per /link/batch call, and per joint linker "
                                                       "call of concurrent /link requests.")] = 64,
    batch_wait_ms: Annotated[float, typer.Option(min=0.0, help="How long a /link request waits for others to be "
                                                             "linked with it (dynamic batching).")] = 2.0,
    max_body_mb: Annotated[float, typer.Option(min=0.01, help="Largest request body, in MiB.")] = 12.0,
    max_image_mb: Annotated[float, typer.Option(min=0.01, help="Largest uploaded image, in MiB.")] = 8.0,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds before a request answers 504 (or 408 when "
                                                         "its body has not all arrived by then).")] = 30.0,
    threads: Annotated[int | None, typer.Option(min=1, help="Torch threads (default: torch's choice); 1-2 "
                                                            "avoids oversubscription under concurrent load.")] = None,
    replicas: Annotated[int, typer.Option(min=1, help="Serve from this many replicas over the one index (Ray "
                                                      "Serve; more than 1 implies --engine ray).")] = 1,
    engine: Annotated[EngineName, typer.Option(help="local: one uvicorn process; ray: Ray Serve replicas.")
                      ] = EngineName.local,
    ray_address: Annotated[str | None, typer.Option(help="With --engine ray: join this Ray cluster (default: start "
                                                         "one for the server's life).")] = None,
    query_runtime: QueryRuntimeOption = QueryRuntimeName.auto,  # type: ignore[attr-defined]
) -> None:
    """Serve POST /link, POST /link/batch, GET /entities/{qid}, GET /health, the docs at /docs and the page at /.

    With --replicas N (N > 1) or --engine ray, Ray Serve runs N replicas of the same app, each with
    its own dynamic batching, behind one HTTP proxy on --host/--port.
    """
    import torch
    import uvicorn

    from mmel.server.app import create_app
    from mmel.server.running import uvicorn_config
    from mmel.server.settings import ServerSettings

    with exit_on_user_errors():
        settings = ServerSettings(index_dir=index_dir, host=host, port=port, token=token, max_batch=max_batch,
                                  max_body_bytes=int(max_body_mb * 2**20), max_image_bytes=int(max_image_mb * 2**20),
                                  request_timeout_s=timeout, link_batch_wait_ms=batch_wait_ms,
                                  query_runtime=query_runtime.value)
        if host not in LOCAL_HOSTS and token is None:
            typer.echo(f"warning: serving on {host} without a token: anyone who can reach it can use it", err=True)
        if replicas > 1 or engine is EngineName.ray:
            from mmel.scale.serve import run_replicas

            run_replicas(settings, replicas, threads=threads, ray_address=ray_address)
            return
        if threads is not None:
            torch.set_num_threads(threads)
        app = create_app(settings)
    uvicorn.Server(uvicorn_config(app, settings)).run()
