"""Shared fixtures: one real local Ray instance per test session, tiny temp outputs."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Tests start their own private Ray; a RAY_ADDRESS left in the shell must not redirect them.
os.environ.pop("RAY_ADDRESS", None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """A real single-node Ray (2 CPUs) shared by the tests that need one."""
    import ray
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()
