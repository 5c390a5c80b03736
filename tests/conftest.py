"""Shared fixtures: one real local Ray instance per test session, tiny temp outputs."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # faster failure detection in tests
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
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def train_grids(ray_local, tmp_path_factory):
    """Pseudo-4D grid and clip shards written by the real job (4 views x 6 frames at 32 px) for training tests."""
    from pipelines.make_pseudo4d import main
    out = tmp_path_factory.mktemp("train_grids")
    assert main(["--preset", "tiny", "--output", str(out), "--views", "4", "--frames", "6", "--set",
                 "procedural.count=4"]) == 0
    return out


@pytest.fixture(scope="session")
def one_grid(tmp_path_factory):
    """Two grids to overfit (one per worker)."""
    from shardgen import make_grid_shards
    return make_grid_shards(tmp_path_factory.mktemp("one_grid"), n=2, views=4, frames=6, size=16, per_shard=1)


def tiny_train_config(stage: str, out, grids: list[str], **overrides):
    """The tiny preset of a stage writing to ``out``, reading ``grids``, plus dotted-key overrides."""
    import dataclasses

    from pipelines.common.config import apply_overrides
    from training.config import presets_for
    cfg = dataclasses.replace(presets_for(stage)["tiny"](), output=str(out), run_name=f"{stage}-test")
    return apply_overrides(cfg, {"data.grids": grids, **overrides})


@pytest.fixture(scope="session")
def base_run(ray_local, train_grids, tmp_path_factory):
    """A base model trained by the real job (tiny preset); its checkpoint feeds the 4D and generation tests."""
    from training.launch import run
    # its last two of four steps profiled: 5 asked for, so the window is closed by the run's end (test_training
    # checks the profile files); a DeepSpeed entry of the user's (a smaller gradient bucket) goes through
    cfg = tiny_train_config("base", tmp_path_factory.mktemp("base_run"), [str(train_grids)], profile_at=2,
                            profile_steps=5, **{"deepspeed.zero_optimization.reduce_bucket_size": "3e5"})
    run(cfg)
    return cfg


@pytest.fixture(scope="session")
def fourd_run(ray_local, base_run, train_grids, tmp_path_factory):
    """A soft-sync 4D model trained over ``base_run``, mixing two sources by weight."""
    from pathlib import Path

    from training.launch import run
    cfg = tiny_train_config("4d", tmp_path_factory.mktemp("fourd_run"), [str(train_grids), str(train_grids)],
                            base_checkpoint=str(Path(base_run.output) / "checkpoint_final"),
                            **{"data.weights": [0.5, 0.5]})
    run(cfg)
    return cfg


@pytest.fixture(scope="session")
def upsampler_run(ray_local, train_grids, tmp_path_factory):
    """An x4 upsampler trained by the real job (tiny preset)."""
    from training.launch import run
    cfg = tiny_train_config("upsampler", tmp_path_factory.mktemp("upsampler_run"), [str(train_grids)])
    run(cfg)
    return cfg


@contextlib.contextmanager
def loopback_cluster(*node_cpus: int):
    """A real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: one raylet per entry of
    ``node_cpus``, the first the head). Ray records the newest cluster in its address file, where a plain
    ``ray.init()`` and job drivers look; it is put back as it was, so nothing after the test joins a dead
    cluster (or, while it runs, another session's driver this one)."""
    from ray.cluster_utils import Cluster
    record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    before = record.read_bytes() if record.is_file() else None
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": node_cpus[0], "include_dashboard": False})
    try:
        for n in node_cpus[1:]:
            cluster.add_node(num_cpus=n)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()
        if before is None:
            record.unlink(missing_ok=True)
        else:
            record.write_bytes(before)
