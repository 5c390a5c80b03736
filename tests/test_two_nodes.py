"""The jobs on a real two-node Ray cluster on loopback: two raylets with one CPU each (`ray.cluster_utils`),
the jobs submitted as separate driver processes with RAY_ADDRESS, as on a cluster.

With one CPU per node and two one-CPU workers, Ray must put one on each node; the jobs report the nodes
they used (the render summary's ``nodes_used``, the training start-up line), and their outputs must be what
a one-node run makes: the same samples, the same losses. The run folder is on a path both nodes reach,
which on a real cluster is shared storage or a bucket (README, "Running on a cluster").
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import loopback_cluster
from pipelines.common.shards import iter_tar_samples

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def two_nodes():
    with loopback_cluster(1, 1) as cluster:  # two raylets, one CPU each
        yield cluster


def _job(args: list[str], address: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS=address, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    return {k: f for tar in sorted((out / "shards").glob("*.tar")) for k, f in iter_tar_samples(str(tar))}


def test_render_job_uses_both_nodes_and_renders_what_one_node_renders(two_nodes, ray_local, tmp_path: Path) -> None:
    from pipelines.render_objaverse import main
    args = ["--preset", "tiny", "--count", "4", "--max-actions", "1", "--items-per-part", "1", "--concurrency", "2",
            "--cpus-per-worker", "1"]
    two, one = tmp_path / "two", tmp_path / "one"
    _job(["pipelines/render_objaverse.py", *args, "--output", str(two), "--cache-dir", str(tmp_path / "c2")],
         two_nodes.address)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["nodes_used"] == 2 and summary["items_ok_this_run"] == 4
    assert main(args + ["--output", str(one), "--cache-dir", str(tmp_path / "c1")]) == 0  # the session's one node
    assert json.loads((one / "summary.json").read_text())["nodes_used"] == 1
    a, b = _samples(two), _samples(one)
    assert sorted(a) == sorted(b) and len(a) == 4
    for key in a:
        assert sorted(a[key]) == sorted(b[key])
        assert a[key]["cameras.json"] == b[key]["cameras.json"]
        for name in (n for n in a[key] if n.endswith(".png")):
            pa_, pb = (np.asarray(Image.open(io.BytesIO(x[key][name]))).astype(int) for x in (a, b))
            assert np.abs(pa_ - pb).max() <= 2, (key, name)  # the same render, wherever it ran


def test_training_puts_a_worker_on_each_node_resumes_and_matches_one_node(two_nodes, ray_local, train_grids,
                                                                         tmp_path: Path) -> None:
    args = ["training/train_base.py", "--preset", "tiny", "--data.grids", str(train_grids), "--num-workers", "2",
            "--cpus-per-worker", "1", "--mlflow-uri", "none", "--checkpoint-every", "2"]
    two = tmp_path / "two"
    _job(args + ["--output", str(two), "--steps-this-run", "2"], two_nodes.address)
    summary = json.loads((two / "summary.json").read_text())["metrics"]
    assert (summary["nodes"], summary["resumed_at"]) == (2, 0)  # one worker on each node
    assert not (two / "checkpoint_final").exists()
    _job(args + ["--output", str(two)], two_nodes.address)  # continues from the step-2 checkpoint
    summary = json.loads((two / "summary.json").read_text())["metrics"]
    assert (summary["nodes"], summary["resumed_at"]) == (2, 2)
    assert (two / "checkpoint_final" / "model.pt").is_file()

    # The same job on one node (the session's local Ray, two workers there): the same losses, step by step.
    one = tmp_path / "one"
    _job(args + ["--output", str(one)], "")  # no RAY_ADDRESS: a private one-node Ray
    def losses(out: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}
    got, want = losses(two), losses(one)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    assert all(abs(got[s] - want[s]) < 1e-5 for s in got), (got, want)
