"""MLflow the way a cluster uses it: a real `mlflow server` on loopback (its own backend store and artifact
root), a training job pointed at it only through MLFLOW_TRACKING_URI, and everything read back through the
server: the run, its metrics, its contact sheets and its checkpoint."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, tiny_train_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture()
def mlflow_server(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    while True:
        try:
            if urllib.request.urlopen(url + "/health", timeout=2).read() == b"OK":
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url, root
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _artifacts(client, run_id: str, path: str = "") -> list[str]:
    out = []
    for a in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def test_training_logs_to_a_tracking_server(ray_local, train_grids, mlflow_server, tmp_path, monkeypatch) -> None:
    import mlflow
    from PIL import Image

    from pipelines.common.checkpoints import load_checkpoint
    from training.launch import run
    url, root = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # the only thing a team sets: no --mlflow-uri
    cfg = tiny_train_config("base", tmp_path / "run", [str(train_grids)])
    assert cfg.mlflow_uri == ""
    run(cfg)
    assert not (tmp_path / "run" / "mlflow.db").exists()  # nothing tracked in the run folder

    client = mlflow.MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("4real-base")
    (rec,) = client.search_runs([exp.experiment_id])
    assert rec.info.status == "FINISHED" and rec.data.params["stage"] == "base"
    assert [m.step for m in client.get_metric_history(rec.info.run_id, "loss")] == \
        list(range(1, cfg.total_steps + 1))
    arts = _artifacts(client, rec.info.run_id)
    sheets = [a for a in arts if a.startswith("samples/") and a.endswith(".png")]
    assert sheets and "final_checkpoint/model.pt" in arts
    # the files travel through the server into its artifact root, and come back whole
    assert list((root / "artifacts").rglob("model.pt"))
    local = Path(client.download_artifacts(rec.info.run_id, sheets[0], str(tmp_path / "dl")))
    assert Image.open(local).size[0] > 0
    ckpt = Path(client.download_artifacts(rec.info.run_id, "final_checkpoint", str(tmp_path / "dl")))
    assert load_checkpoint(str(ckpt))["stage"] == "base"

