"""Portable model checkpoints (``model.pt``): what training exports and what the 4D stage and generation load.

A Ray Train checkpoint holds DeepSpeed's sharded training state and is only
good for resuming. ``model.pt`` is the hand-off format: plain tensors (EMA
weights when EMA is on), the model's config and the training config.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipelines.common.errors import UserError

if TYPE_CHECKING:
    from model.dit import VideoDiT
    from model.upsampler import VideoUpsampler

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
        if path.suffix == ".gz":  # shipped weights (slim_export): bf16 compresses by about a fifth
            import gzip
            import io
            ckpt = torch.load(io.BytesIO(gzip.decompress(path.read_bytes())), map_location="cpu", weights_only=False)
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); re-export it from its "
                        "training run") from None
    for key in ("stage", "model_config", "state_dict"):
        if key not in ckpt:
            raise UserError(f"checkpoint {path} lacks '{key}'; it was not written by this project's training")
    if ckpt.get("base_ref"):
        # A slim 4D checkpoint (see slim_fourd) stores its sync layers only and names the base it was
        # trained on, beside it: the base is shared by every variant instead of copied into each.
        base_path = path.parent / ckpt["base_ref"]
        base = load_checkpoint(str(base_path))
        if base["stage"] != "base" or base.get("digest") != ckpt.get("base_digest"):
            raise UserError(f"checkpoint {path} needs its base {base_path}, which is missing or another base "
                            "(digest differs); keep the files of one export together")
        ckpt["state_dict"] = {**{f"base.{k}": v for k, v in base["state_dict"].items()}, **ckpt["state_dict"]}
        ckpt["model_config"] = base["model_config"]
    return ckpt


BASE_PREFIX = "base."
"""Where a 4D checkpoint keeps its frozen base's weights (``FourDModel.base``)."""


def base_from_checkpoint(ckpt: dict[str, Any], spec: str) -> VideoDiT:
    """The base video DiT of a loaded base or 4D checkpoint, weights in: the one place a checkpoint becomes a
    model (training's 4D stage, generation and evaluation all build through here)."""
    from model.dit import DiTConfig, VideoDiT
    if ckpt["stage"] not in ("base", "4d"):
        raise UserError(f"checkpoint '{spec}' holds a '{ckpt['stage']}' model, not a base or 4D model")
    base = VideoDiT(DiTConfig(**ckpt["model_config"]))
    state = ckpt["state_dict"]
    if ckpt["stage"] == "4d":
        state = {k[len(BASE_PREFIX):]: v for k, v in state.items() if k.startswith(BASE_PREFIX)}
    try:
        base.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"checkpoint '{spec}' does not match its own model config ({str(exc).splitlines()[0]}); "
                        "re-export it from its training run") from None
    return base


def sync_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The synchronization layers' weights of a loaded 4D checkpoint (everything but the base)."""
    return {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(BASE_PREFIX)}


def upsampler_from_checkpoint(ckpt: dict[str, Any], spec: str) -> VideoUpsampler:
    """The x4 upsampler of a loaded upsampler checkpoint, weights in (fp32)."""
    from model.upsampler import upsampler_from_config
    if ckpt["stage"] != "upsampler":
        raise UserError(f"checkpoint '{spec}' holds a '{ckpt['stage']}' model; pass an upsampler checkpoint")
    model = upsampler_from_config(ckpt["model_config"])
    model.load_state_dict({k: v.float() for k, v in ckpt["state_dict"].items()})
    return model


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes and bytes of a state dict (identifies a set of weights)."""
    import hashlib
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def slim_export(checkpoints: dict[str, str], out: str | Path, base: str, dtype: torch.dtype = torch.bfloat16,
                compress: bool = True) -> dict:
    """Write shippable copies of one base and the checkpoints trained on it into ``out`` (bf16 by default).

    ``checkpoints`` maps a name to a checkpoint spec. The base is written once as ``base.pt[.gz]``; each 4D
    checkpoint keeps only its sync layers plus ``base_ref``/``base_digest`` (load_checkpoint puts the base
    back); other stages (the upsampler) are written whole. ``compress`` gzips each file (load_checkpoint
    reads both). Returns {name: file size in bytes}.
    """
    ext = ".pt.gz" if compress else ".pt"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def cast(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}

    base_ckpt = load_checkpoint(base)
    base_ckpt["state_dict"] = cast(base_ckpt["state_dict"])
    base_ckpt["digest"] = state_digest(base_ckpt["state_dict"])
    sizes = {"base": save_checkpoint_file(out / f"base{ext}", base_ckpt)}
    for name, spec in checkpoints.items():
        ckpt = load_checkpoint(spec)
        sd = cast(ckpt["state_dict"])
        if ckpt["stage"] == "4d":
            frozen = {k[len("base."):]: v for k, v in sd.items() if k.startswith("base.")}
            if state_digest(frozen) != base_ckpt["digest"]:
                raise UserError(f"checkpoint '{spec}' ({name}) was not trained on the base '{base}'")
            sd = {k: v for k, v in sd.items() if not k.startswith("base.")}
            ckpt.update(base_ref=f"base{ext}", base_digest=base_ckpt["digest"])
        ckpt["state_dict"] = sd
        sizes[name] = save_checkpoint_file(out / f"{name}{ext}", ckpt)
    return sizes


def save_checkpoint_file(path: Path, payload: dict[str, Any]) -> int:
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".gz":
        import gzip
        import io
        buf = io.BytesIO()
        torch.save(payload, buf)
        tmp.write_bytes(gzip.compress(buf.getvalue(), compresslevel=9, mtime=0))
    else:
        torch.save(payload, tmp)
    tmp.replace(path)
    return path.stat().st_size


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as <path>/model.pt (atomically: a reader never sees half a file)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_checkpoint_file(path / MODEL_FILE, payload)
    return path / MODEL_FILE
