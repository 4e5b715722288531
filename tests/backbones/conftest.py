"""Backbone tests run real (small) models: keep them to one torch thread while they run."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One thread per test process: with pytest-xdist workers sharing two cores, OpenMP's spinning
    threads stall each other (measured: 100x slower small ops when the machine is oversubscribed)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
