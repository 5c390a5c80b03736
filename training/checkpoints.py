"""Portable model checkpoints (``model.pt``): what training exports and what the 4D stage and generation load.

A Ray Train checkpoint holds DeepSpeed's sharded training state and is only
good for resuming. ``model.pt`` is the hand-off format: plain tensors (EMA
weights when EMA is on), the model's config and the training config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipelines.common.errors import UserError

MODEL_FILE = "model.pt"


def resolve_checkpoint(spec: str, tracking_uri: str | None = None, dst: str | Path | None = None) -> Path:
    """A model.pt, a folder holding one, or ``runs:/<mlflow run id>`` -> path of model.pt.

    MLflow checkpoints are downloaded to ``dst`` (a temporary folder if None) from the
    store at ``tracking_uri`` (default: MLFLOW_TRACKING_URI).
    """
    if not spec:
        raise UserError("no checkpoint given; pass a folder with model.pt, a model.pt file or runs:/<mlflow run id>")
    if spec.startswith("runs:/"):
        import mlflow
        run_id = spec[len("runs:/"):].strip("/").split("/")[0]
        if dst is not None:
            Path(dst).mkdir(parents=True, exist_ok=True)
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="final_checkpoint",
                                                        dst_path=str(dst) if dst else None, tracking_uri=tracking_uri)
        except Exception as exc:
            raise UserError(f"could not fetch the final checkpoint of MLflow run {run_id} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); check the tracking URI "
                            "(--mlflow-uri or MLFLOW_TRACKING_URI) and the run id (mlflow ui lists runs)") from None
        return resolve_checkpoint(local)
    p = Path(spec)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.is_file():
        raise UserError(f"checkpoint '{spec}' not found (looked for {p}); pass the checkpoint_final folder of a "
                        "training run or its MLflow run as runs:/<run id>")
    return p


def load_checkpoint(spec: str) -> dict[str, Any]:
    path = resolve_checkpoint(spec)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); re-export it from its "
                        "training run") from None
    for key in ("stage", "model_config", "state_dict"):
        if key not in ckpt:
            raise UserError(f"checkpoint {path} lacks '{key}'; it was not written by this project's training")
    return ckpt


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (MODEL_FILE + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path / MODEL_FILE)
    return path / MODEL_FILE
