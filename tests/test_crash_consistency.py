"""Kill a data job's driver and its workers at random points, then re-run it: nothing lost, nothing doubled.

The job runs as a separate driver process against a Ray cluster that outlives it (as `ray job submit` or a
KubeRay cluster would), so killing the driver is what a lost head-node shell or a scheduler's SIGKILL does,
and killing a worker is a lost actor process. The kill times come from a fixed seed, and their number is
bounded, so the test is reproducible and ends.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import loopback_cluster
from pipelines.common.shards import iter_tar_samples

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow]
ITEMS = 24
PER_PART = 2  # 12 parts: three interrupted runs commit at most 9 of them


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
        if pid == ancestor:
            return True
    return False


def _actor_pids() -> list[int]:
    """Processes of the data job's Ray actors (their process title names the map worker), on this test's
    cluster only: its raylets are this process's children, so the actors descend from it."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ray::" in cmd and ("MapWorker" in cmd or "_PartWorker" in cmd) and _descends_from(int(proc.name),
                                                                                          os.getpid()):
            pids.append(int(proc.name))
    return pids


def _committed(out: Path) -> int:
    return len(list((out / "_parts").glob("part-*.index.parquet"))) if (out / "_parts").is_dir() else 0


def _run(out: Path, address: str, log: Path, kill_worker_after: int | None, kill_driver_after: int | None) -> int:
    """One driver run. Kills one of its actors once ``kill_worker_after`` more parts have committed, and the
    driver itself after ``kill_driver_after`` (counted in progress, not seconds, so the kills land mid-run
    on a fast machine and a slow one alike). Returns the driver's exit code (-9: killed)."""
    env = dict(os.environ, RAY_ADDRESS=address, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "pipelines/make_pseudo4d.py", "--preset", "tiny", "--output", str(out),
           "--items-per-part", str(PER_PART), "--concurrency", "2", "--set", f"procedural.count={ITEMS}"]
    start = _committed(out)
    with log.open("a") as fh:
        fh.write(f"\n=== run from {start} parts: kill a worker after {kill_worker_after}, the driver after "
                 f"{kill_driver_after} more\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        t0 = time.time()
        while proc.poll() is None and time.time() - t0 < 600:
            done = _committed(out) - start
            if kill_worker_after is not None and done >= kill_worker_after:
                pids = _actor_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    fh.write(f"=== killed actor {pids[0]} after {done} parts\n")
                    fh.flush()
                    kill_worker_after = None
            if kill_driver_after is not None and done >= kill_driver_after:
                proc.send_signal(signal.SIGKILL)
                fh.write(f"=== killed the driver after {done} parts\n")
                fh.flush()
                break
            time.sleep(0.02)
        return proc.wait(timeout=60)


def _check(out: Path) -> None:
    """The invariants a reader relies on after the final run."""
    index = pq.read_table(out / "index.parquet").to_pylist()
    keys = [r["key"] for r in index]
    assert len(keys) == len(set(keys)), "duplicate keys in the index"
    assert {r["item_id"] for r in index} == {f"procedural-{i:06d}" for i in range(ITEMS)}, "items missing"
    assert pq.read_table(out / "failures.parquet").num_rows == 0
    in_tars: dict[str, str] = {}
    for folder in ("shards", "clips"):
        for tar in sorted((out / folder).iterdir()):
            assert tar.suffix == ".tar", f"a temporary or stray file is visible to readers: {tar}"
            for key, _ in iter_tar_samples(str(tar)):
                assert key not in in_tars, f"{key} is in {in_tars.get(key)} and {tar}"
                in_tars[key] = f"{folder}/{tar.name}"
    assert in_tars == {r["key"]: r["shard"] for r in index}, "the index and the tars disagree"


def test_killed_drivers_and_workers_lose_and_double_nothing(tmp_path: Path) -> None:
    with loopback_cluster(2) as cluster:  # outlives the drivers, as a real cluster does
        rng = random.Random(13)
        out, log = tmp_path / "out", tmp_path / "driver.log"
        kills = []
        for _ in range(3):  # bounded: three interrupted runs, each losing a worker and then its driver
            kill_worker_after = rng.randint(0, 1)
            kills.append(_run(out, cluster.address, log, kill_worker_after, kill_worker_after + rng.randint(1, 2)))
        rc = _run(out, cluster.address, log, None, None)  # the re-run that finishes
        assert rc == 0, log.read_text()[-3000:]
        _check(out)
        text = log.read_text()
        assert -signal.SIGKILL in kills, f"no driver was killed mid-run: {kills}"  # the test tested something
        assert "killed actor" in text, "no worker was killed mid-run"
        summary = json.loads((out / "summary.json").read_text())
        assert summary["items_skipped"] > 0, "the interrupted runs committed nothing: the re-run resumed nothing"
