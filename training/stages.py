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
from model.dit import DIT_PRESETS, DiTConfig, VideoDiT
from pipelines.common.errors import UserError
from training.checkpoints import load_checkpoint
from training.config import TrainConfig


def _preset(presets: dict, name: str, what: str):
    if name not in presets:
        raise UserError(f"unknown {what} preset '{name}'; choose one of {', '.join(presets)}")
    return dataclasses.replace(presets[name])


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
        mcfg: DiTConfig = _preset(DIT_PRESETS, cfg.model_preset, "model")
        mcfg.checkpointing = cfg.activation_checkpointing
        self.net = VideoDiT(mcfg)
        self.patch_size = mcfg.patch_size

    def forward(self, batch: dict[str, torch.Tensor], seed: int) -> tuple[torch.Tensor, dict[str, float]]:
        x0, mask, context = batch["x"], batch["mask"], batch["context"]
        return rf.training_loss(lambda xt, t, cond, m: self.net(xt, t, context, cond=cond, mask=m), x0, mask,
                                generator=self._gen(seed, x0.device))

    @torch.no_grad()
    def sample(self, batch: dict[str, torch.Tensor], steps: int, seed: int) -> torch.Tensor:
        x0, mask, context = batch["x"], batch["mask"], batch["context"]
        noise = torch.randn(x0.shape, generator=self._gen(seed, x0.device), device=x0.device)
        return rf.sample(lambda xt, t, cond, m: self.net(xt, t, context, cond=cond, mask=m), noise, steps,
                         cond=x0, mask=mask)

    def flops_per_sample(self, batch: dict[str, torch.Tensor]) -> float:
        _, f, _, h, w = batch["x"].shape
        return float(self.net.flops_per_sample(f, h, w))


class UpsamplerStage(Stage):
    """x4 video super-resolution conditioned on the (box-filtered) low-resolution clip."""

    name = "upsampler"

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        from model.upsampler import UPSAMPLER_PRESETS, VideoUpsampler
        ucfg = _preset(UPSAMPLER_PRESETS, cfg.model_preset, "upsampler")
        if hasattr(ucfg, "checkpointing"):
            ucfg.checkpointing = cfg.activation_checkpointing
        self.net = VideoUpsampler(ucfg)
        self.patch_size = getattr(ucfg, "patch_size", 1)

    def forward(self, batch: dict[str, torch.Tensor], seed: int) -> tuple[torch.Tensor, dict[str, float]]:
        x0, lowres = batch["x"], batch["lowres"]
        mask = torch.zeros(x0.shape[:2], device=x0.device)
        return rf.training_loss(lambda xt, t, cond, m: self.net(xt, t, lowres), x0, mask,
                                generator=self._gen(seed, x0.device))

    @torch.no_grad()
    def sample(self, batch: dict[str, torch.Tensor], steps: int, seed: int) -> torch.Tensor:
        x0, lowres = batch["x"], batch["lowres"]
        noise = torch.randn(x0.shape, generator=self._gen(seed, x0.device), device=x0.device)
        return rf.sample(lambda xt, t, cond, m: self.net(xt, t, lowres), noise, steps)

    def flops_per_sample(self, batch: dict[str, torch.Tensor]) -> float:
        _, f, _, h, w = batch["x"].shape
        return float(self.net.flops_per_sample(f, h, w))


def load_base_model(spec: str) -> VideoDiT:
    """The frozen base of the 4D stage, from a base-stage checkpoint (path or runs:/<id>)."""
    ckpt = load_checkpoint(spec)
    if ckpt["stage"] != "base":
        raise UserError(f"base_checkpoint '{spec}' holds a '{ckpt['stage']}' model; pass a base-stage checkpoint")
    base = VideoDiT(DiTConfig(**ckpt["model_config"]))
    base.load_state_dict(ckpt["state_dict"])
    return base


class FourDStage(Stage):
    """Two-stream 4D model over a frozen base; only the synchronization layers train."""

    name = "4d"

    def __init__(self, cfg: TrainConfig, base: VideoDiT | None = None) -> None:
        super().__init__()
        from model.fourd import FourDConfig, FourDModel
        if base is None:
            if not cfg.base_checkpoint:
                raise UserError("the 4d stage needs --base-checkpoint (a base-stage checkpoint_final folder or "
                                "runs:/<mlflow run id>); train the base stage first")
            base = load_base_model(cfg.base_checkpoint)
        base.cfg.checkpointing = cfg.activation_checkpointing
        self.net = FourDModel(base, FourDConfig(sync=cfg.sync, soft_init=cfg.soft_init))
        self.patch_size = base.cfg.patch_size
        if not self.trainable_parameters():
            raise UserError(f"sync variant '{cfg.sync}' has no trainable parameters; train soft, hard or "
                            "sequential, and use the train_free_* variants directly in generation/evaluation")

    def forward(self, batch: dict[str, torch.Tensor], seed: int) -> tuple[torch.Tensor, dict[str, float]]:
        x0, mask = batch["x"], batch["mask"]
        return rf.training_loss(lambda xt, t, cond, m: self.net(xt, t, cond=cond, mask=m), x0, mask,
                                generator=self._gen(seed, x0.device))

    @torch.no_grad()
    def sample(self, batch: dict[str, torch.Tensor], steps: int, seed: int) -> torch.Tensor:
        x0, mask = batch["x"], batch["mask"]
        noise = torch.randn(x0.shape, generator=self._gen(seed, x0.device), device=x0.device)
        return rf.sample(lambda xt, t, cond, m: self.net(xt, t, cond=cond, mask=m), noise, steps, cond=x0, mask=mask)

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
    stage = {"base": BaseStage, "upsampler": UpsamplerStage, "4d": FourDStage}[cfg.stage](cfg)
    if cfg.compile_blocks:
        net = stage.net
        (net.compile_blocks if hasattr(net, "compile_blocks") else net.dit.compile_blocks)()
    return stage
