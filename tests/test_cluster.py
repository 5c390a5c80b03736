"""The local head: start it, submit a real job with `ray job submit`, read it back, stop it. No mocks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _env(tmp: Path, dash: int, gcs: int) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    env.update(RAY_LOCAL_DIR=str(tmp / "state"), RAY_DASHBOARD_PORT=str(dash), RAY_PORT=str(gcs),
               RAY_TEMP_DIR=f"/tmp/ray-t{gcs}", RAY_NUM_CPUS="2", PATH=f"{VENV_BIN}:{env['PATH']}")
    return env


@pytest.mark.ray
def test_local_head_runs_a_submitted_job(tmp_path: Path) -> None:
    dash, gcs = free_port(), free_port()
    env = _env(tmp_path, dash, gcs)
    start = subprocess.run([str(ROOT / "cluster/start_local.sh")], env=env, capture_output=True, text=True, timeout=420)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        # Everything a user needs comes from env.sh: address and the token (auth stays on).
        for line in (tmp_path / "state/env.sh").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
        assert env["RAY_AUTH_MODE"] == "token" and Path(env["RAY_AUTH_TOKEN_PATH"]).stat().st_size > 0
        # `ray start` recorded the head for plain ray.init() calls: stop must take that back (issue 13)
        address_file = Path(f"/tmp/ray-t{gcs}/ray_current_cluster")
        assert address_file.read_text().strip() == env["RAY_GCS_ADDRESS"]
        assert env["RAY_GCS_ADDRESS"].endswith(f":{gcs}")
        submit = subprocess.run(
            ["ray", "job", "submit", "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "cluster/runtime_env.yaml"),
             "--submission-id", f"check-{gcs}", "--", "python", "pipelines/cluster_check.py", "--tasks", "3"],
            env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        # Read the status back through the SDK, in a child with the same environment (the token comes from it).
        status = subprocess.run(
            [sys.executable, "-c", "import os; from ray.job_submission import JobSubmissionClient as C; "
             f"print(C(os.environ['RAY_ADDRESS']).get_job_status('check-{gcs}').value)"],
            env=env, capture_output=True, text=True, timeout=60)
        assert status.stdout.strip().splitlines()[-1] == "SUCCEEDED", status.stdout + status.stderr
        logs = subprocess.run(["ray", "job", "logs", f"check-{gcs}"], env=env, capture_output=True, text=True,
                              timeout=60)
        assert "ran 3 tasks" in logs.stdout and "cluster check OK" in logs.stdout

        # Without the token the head refuses: auth is really on, not just configured.
        bad = dict(env, RAY_AUTH_TOKEN_PATH=str(tmp_path / "wrong_token"))
        (tmp_path / "wrong_token").write_text("0" * 64)
        denied = subprocess.run(["ray", "job", "list"], env=bad, capture_output=True, text=True, timeout=60)
        assert denied.returncode != 0
    finally:
        stop = subprocess.run([str(ROOT / "cluster/stop_local.sh")], env=env, capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0, stop.stderr
    time.sleep(1)
    assert subprocess.run(["pgrep", "-f", f"/tmp/ray-t{gcs}"], capture_output=True).returncode != 0
    # nothing left that would send a later plain ray.init() to the dead head
    assert not address_file.exists() and not (tmp_path / "state/env.sh").exists()


def test_bad_option_is_one_line_and_nonzero() -> None:
    out = subprocess.run([sys.executable, "pipelines/cluster_check.py", "--tasks", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --tasks must be at least 1, got 0"
