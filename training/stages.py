"""The three training stages as one interface: build the model, compute the loss, draw samples, export.

Each stage is an ``nn.Module`` whose ``forward(batch, seed)`` returns the loss,
so DeepSpeed wraps the whole thing (ZeRO-3 hooks see every parameter use) and
the loop in loop.py stays stage-agnostic.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from model import rectified_flow as rf
from model.dit import DIT_PRESETS, VideoDiT
from pipelines.common.errors import UserError
from pipelines.common.checkpoints import base_from_checkpoint, load_checkpoint, sync_state
from training.config import TrainConfig


def _preset(presets: dict, name: str, what: str, overrides: dict | None = None):
    """A copy of a model preset with ``--set model.<field>=...`` overrides applied (unknown fields: one clear error)."""
    if name not in presets:
        raise UserError(f"unknown {what} preset '{name}'; choose one of {', '.join(presets)}")
    cfg = presets[name]
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides or {}) - fields)
    if unknown:
        raise UserError(f"unknown {what} field(s) {', '.join(unknown)} in model overrides; "
                        f"the {what} config has {', '.join(sorted(fields))}")
    return dataclasses.replace(cfg, **(overrides or {}))


class Stage(nn.Module):
    """Common surface of the stages; subclasses set ``self.net`` and implement ``forward``/``sample``."""

    name = ""
    net: nn.Module

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def tokens_per_sample(self, batch: dict[str, torch.Tensor]) -> int:
        x = batch["x"]
        p = self.patch_size
        return int(x[0].numel() // x.shape[-3] // (p * p))

    def train_flops_per_sample(self, batch: dict[str, torch.Tensor]) -> float:
        """Forward + backward FLOPs of one sample (backward = 2x forward when every weight trains)."""
        return 3 * self.flops_per_sample(batch)

    def export(self) -> dict[str, Any]:
        return {"stage": self.name, "model_config": dataclasses.asdict(self.net.cfg), "state_dict":
                {k: v.detach().cpu() for k, v in self.net.state_dict().items()}}

    @staticmethod
    def _gen(seed: int, device: torch.device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return g


class BaseStage(Stage):
    """Masked video diffusion on rows (dynamic) and columns (freeze-time) of the grids."""

    name = "base"

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        if cfg.init_from:  # weights (and so the architecture) from a base checkpoint, a fresh schedule
            self.net = load_base_model(cfg.init_from, "init_from")
        else:
            self.net = VideoDiT(_preset(DIT_PRESETS, cfg.model_preset, "model", cfg.model))
        self.net.cfg.checkpointing = cfg.activation_checkpointing  # the model reads its own copy of the config
        self.patch_size = self.net.cfg.patch_size

    def forward(self, batch: dict[str, torch.Tensor], seed: int) -> tuple[torch.Tensor, dict[str, float]]:
        x0, mask, context = batch["x"], batch["mask"], batch["context"]
        return rf.training_loss(lambda xt, t, cond, m: self.net(xt, t, context, cond=cond, mask=m), x0, mask,
                                generator=self._gen(seed, x0.device), shift=self.net.cfg.flow_shift)

    @torch.no_grad()
    def sample(self, batch: dict[str, torch.Tensor], steps: int, seed: int) -> torch.Tensor:
        x0, mask, context = batch["x"], batch["mask"], batch["context"]
        noise = torch.randn(x0.shape, generator=self._gen(seed, x0.device), device=x0.device)
        return rf.sample(lambda xt, t, cond, m: self.net(xt, t, context, cond=cond, mask=m), noise, steps,
                         cond=x0, mask=mask, shift=self.net.cfg.flow_shift)

    def flops_per_sample(self, batch: dict[str, torch.Tensor]) -> float:
        _, f, _, h, w = batch["x"].shape
        return float(self.net.flops_per_sample(f, h, w))


class UpsamplerStage(Stage):
    """x4 video super-resolution conditioned on the (box-filtered) low-resolution clip."""

    name = "upsampler"

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        from model.upsampler import UPSAMPLER_PRESETS, VideoUpsampler
        ucfg = _preset(UPSAMPLER_PRESETS, cfg.model_preset, "upsampler", cfg.model)
        if hasattr(ucfg, "checkpointing"):
            ucfg.checkpointing = cfg.activation_checkpointing
        self.net = VideoUpsampler(ucfg)
        self.patch_size = getattr(ucfg, "patch_size", 1)

    def forward(self, batch: dict[str, torch.Tensor], seed: int) -> tuple[torch.Tensor, dict[str, float]]:
        # The net's own loss noise-augments the clean low-res condition (levels drawn from this step's seed).
        x0, lowres = batch["x"], batch["lowres"]
        return self.net.training_loss(x0, lowres, generator=self._gen(seed, x0.device))

    @torch.no_grad()
    def sample(self, batch: dict[str, torch.Tensor], steps: int, seed: int) -> torch.Tensor:
        # As generation samples (condition corrupted at cfg.sample_aug_level), with independent noise per
        # preview clip: they are unrelated videos, not the views of one grid.
        x0, lowres = batch["x"], batch["lowres"]
        return self.net.upsample(lowres, steps, generator=self._gen(seed, x0.device), shared_noise=False)

    def flops_per_sample(self, batch: dict[str, torch.Tensor]) -> float:
        _, f, _, h, w = batch["x"].shape
        return float(self.net.flops_per_sample(f, h, w))


def load_base_model(spec: str, option: str = "base_checkpoint") -> VideoDiT:
    """A base video DiT from a base-stage checkpoint (path or runs:/<id>): the 4D stage's frozen base, or the
    base stage's starting weights (``option`` names the flag in the error)."""
    ckpt = load_checkpoint(spec)
    if ckpt["stage"] != "base":
        raise UserError(f"{option} '{spec}' holds a '{ckpt['stage']}' model; pass a base-stage checkpoint")
    return base_from_checkpoint(ckpt, spec)


def check_fourd_init(ckpt: dict[str, Any], spec: str, sync: str) -> None:
    """The checkpoint --init-from names must be a 4D model of the variant this run trains."""
    if ckpt["stage"] != "4d":
        raise UserError(f"init_from '{spec}' holds a '{ckpt['stage']}' model; pass the checkpoint_final of a 4D run "
                        "(use --base-checkpoint for a base model)")
    saved = ckpt.get("fourd_config", {}).get("sync")
    if saved != sync:
        raise UserError(f"init_from '{spec}' was trained with sync '{saved}', this run trains '{sync}'; "
                        f"pass --sync {saved} or a checkpoint of the '{sync}' variant")


def load_fourd_init(spec: str, sync: str) -> tuple[VideoDiT, dict[str, torch.Tensor]]:
    """(base, sync-layer weights) of a 4D checkpoint to continue from (``--init-from``, section 4.1's phase 2)."""
    ckpt = load_checkpoint(spec)
    check_fourd_init(ckpt, spec, sync)
    return base_from_checkpoint(ckpt, spec), sync_state(ckpt)


class FourDStage(Stage):
    """Two-stream 4D model over a frozen base; only the synchronization layers train."""

    name = "4d"

    def __init__(self, cfg: TrainConfig, base: VideoDiT | None = None) -> None:
        super().__init__()
        from model.fourd import FourDConfig, FourDModel
        sync_state = None
        if base is None:
            if cfg.init_from:
                base, sync_state = load_fourd_init(cfg.init_from, cfg.sync)
            elif not cfg.base_checkpoint:
                raise UserError("the 4d stage needs --base-checkpoint (a base-stage checkpoint_final folder or "
                                "runs:/<mlflow run id>) or --init-from (a 4D checkpoint); train the base stage first")
            else:
                base = load_base_model(cfg.base_checkpoint)
        base.cfg.checkpointing = cfg.activation_checkpointing
        self.net = FourDModel(base, FourDConfig(sync=cfg.sync, soft_init=cfg.soft_init))
        if sync_state is not None:
            missing, unexpected = self.net.load_state_dict(sync_state, strict=False)
            missing = [k for k in missing if not k.startswith("base.")]
            if missing or unexpected:
                raise UserError(f"init_from '{cfg.init_from}' does not fit a '{cfg.sync}' 4D model (missing "
                                f"{missing[:3]}, unexpected {unexpected[:3]})")
        self.patch_size = base.cfg.patch_size
        if not self.trainable_parameters():
            raise UserError(f"sync variant '{cfg.sync}' has no trainable parameters; train soft, hard or "
                            "sequential, and use the train_free_* variants directly in generation/evaluation")

    def forward(self, batch: dict[str, torch.Tensor], seed: int) -> tuple[torch.Tensor, dict[str, float]]:
        x0, mask = batch["x"], batch["mask"]
        # the frozen base's noise-level shift: the sync layers learn at the times the base was trained at
        return rf.training_loss(lambda xt, t, cond, m: self.net(xt, t, cond=cond, mask=m), x0, mask,
                                generator=self._gen(seed, x0.device), shift=self.net.base.cfg.flow_shift)

    @torch.no_grad()
    def sample(self, batch: dict[str, torch.Tensor], steps: int, seed: int) -> torch.Tensor:
        x0, mask = batch["x"], batch["mask"]
        noise = torch.randn(x0.shape, generator=self._gen(seed, x0.device), device=x0.device)
        return rf.sample(lambda xt, t, cond, m: self.net(xt, t, cond=cond, mask=m), noise, steps, cond=x0, mask=mask,
                         shift=self.net.base.cfg.flow_shift)

    def flops_per_sample(self, batch: dict[str, torch.Tensor]) -> float:
        _, v, t, _, h, w = batch["x"].shape
        return float(self.net.flops_per_sample(v, t, h, w))

    def train_flops_per_sample(self, batch: dict[str, torch.Tensor]) -> float:
        _, v, t, _, h, w = batch["x"].shape
        return float(self.net.train_flops_per_sample(v, t, h, w))  # the frozen base needs no weight gradients

    def tokens_per_sample(self, batch: dict[str, torch.Tensor]) -> int:
        _, v, t, _, h, w = batch["x"].shape
        return v * t * (h // self.patch_size) * (w // self.patch_size)

    def export(self) -> dict[str, Any]:
        out = super().export()
        out["model_config"] = dataclasses.asdict(self.net.base.cfg)
        out["fourd_config"] = dataclasses.asdict(self.net.cfg)
        return out


def build_stage(cfg: TrainConfig) -> Stage:
    from training.specs import TRAIN_SPECS
    stage = TRAIN_SPECS[cfg.stage].build(cfg)
    if cfg.fp8:  # before compiling: the compiled blocks then fuse the FP8 casts into their kernels
        from model.dit import DiTBlock
        from model.fp8 import enable_fp8, fp8_supported
        if cfg.use_gpu and torch.cuda.is_available() and not fp8_supported(torch.cuda.current_device()):
            raise UserError(f"fp8 (on at the paper preset's base and 4D stages) needs FP8 tensor cores (compute capability "
                            f"8.9+, e.g. H100); {torch.cuda.get_device_name()} has none: pass --set fp8=false")
        for block in (m for m in stage.modules() if isinstance(m, DiTBlock)):
            enable_fp8(block)
    if cfg.compile_blocks:
        net = stage.net
        (net.compile_blocks if hasattr(net, "compile_blocks") else net.dit.compile_blocks)(tune=cfg.compile_tuning)
    return stage
