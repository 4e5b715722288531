"""Joining a Ray cluster, or starting a private one for one command: what the Ray engine and replicated serving share.

Without an address a single-node Ray is started (no dashboard, a temporary directory under /tmp,
usage statistics off) and stopped by `close()`. Ray's servers listen on the machine's address,
not loopback alone (Ray has no option for that); its token authentication, on by default,
refuses clients that do not hold the session's token. With an address the driver joins that
cluster and `close()` only disconnects. A driver already connected (`ray.init` called by the
caller) is used as it is and left connected.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import ray

TEMP_PARENT = Path("/tmp")   # Ray's unix socket paths must stay short (108 bytes), whatever $TMPDIR is


class RayConnection:
    """This process's connection to Ray for the length of one command."""

    def __init__(self, address: str | None = None, *, num_cpus: float | None = None):
        self._temp_dir: Path | None = None
        self.connected_here = not ray.is_initialized()
        if not self.connected_here:
            return
        if address is not None:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")   # no reports to the outside
        self._temp_dir = Path(tempfile.mkdtemp(prefix="mmel-ray-", dir=TEMP_PARENT))
        try:
            ray.init(address="local", num_cpus=math.ceil(num_cpus or local_cpus()), include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING, _temp_dir=str(self._temp_dir))
        except BaseException:
            self.close()
            raise

    @property
    def started_here(self) -> bool:
        """Whether this connection started the Ray it uses (a private one for this command)."""
        return self._temp_dir is not None

    def cluster_cpus(self) -> float:
        return ray.cluster_resources().get("CPU", 0.0)

    def close(self) -> None:
        """Disconnect if this connection connected (stopping the Ray it started, removing its files). Idempotent."""
        if self.connected_here and ray.is_initialized():
            ray.shutdown()
        self.connected_here = False
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None


def local_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


__all__ = ["RayConnection", "local_cpus"]
