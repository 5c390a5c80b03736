"""Diffusion video super-resolution x4 (paper section 4.1: 72x128 -> 288x512).

The upsampler is a pixel-space VideoDiT whose every frame also sees the low-res
frame, bilinearly upsampled x4, as extra input channels; it predicts the rectified
flow velocity of the high-res clip. Long inputs (a whole 8x8 grid) are cut into
clips of ``clip_frames`` frames that attend jointly and are sampled ``batch_clips``
at a time, so memory stays bounded whatever the number of frames.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import rectified_flow as rf
from model.dit import DiTConfig, VideoDiT


@dataclass
class UpsamplerConfig:
    patch_size: int = 8
    """Pixel patch side at the high resolution."""
    width: int = 768
    """Token channels."""
    depth: int = 12
    """Transformer blocks."""
    heads: int = 6
    """Attention heads (head size a multiple of 16)."""
    mlp_ratio: float = 4.5
    """SwiGLU hidden size as a multiple of width."""
    in_channels: int = 3
    """Channels per frame."""
    qk_norm: bool = True
    """RMS-normalise queries and keys."""
    clip_frames: int = 8
    """Frames attended jointly (one grid row of the 8x8 grid); longer inputs are cut into clips."""
    batch_clips: int = 8
    """Clips sampled together by ``upsample`` (bounds peak memory)."""
    steps: int = 10
    """Default sampling steps of ``upsample``."""
    checkpointing: bool = False
    """Recompute block activations in the backward pass."""

    def dit(self) -> DiTConfig:
        return DiTConfig(patch_size=self.patch_size, width=self.width, depth=self.depth, heads=self.heads,
                         mlp_ratio=self.mlp_ratio, in_channels=self.in_channels, num_contexts=1,
                         pixel_cond_channels=self.in_channels, qk_norm=self.qk_norm,
                         checkpointing=self.checkpointing)


UPSAMPLER_PRESETS: dict[str, UpsamplerConfig] = {
    "tiny": UpsamplerConfig(patch_size=4, width=32, depth=2, heads=2, mlp_ratio=2.0, clip_frames=4, batch_clips=4,
                            steps=2),
    "small": UpsamplerConfig(patch_size=8, width=384, depth=8, heads=6),
    # 8x8 grid at 288x512: 8 clips of 8 frames x 2304 tokens, ~150 M parameters; fits an 80 GB GPU in bf16.
    "paper": UpsamplerConfig(patch_size=8, width=768, depth=12, heads=6),
}


def upsampler_config(preset: str, **overrides) -> UpsamplerConfig:
    if preset not in UPSAMPLER_PRESETS:
        raise ValueError(f"unknown upsampler preset {preset!r}; choose one of {sorted(UPSAMPLER_PRESETS)}")
    return replace(UPSAMPLER_PRESETS[preset], **overrides)


class VideoUpsampler(nn.Module):
    scale = 4

    def __init__(self, cfg: UpsamplerConfig):
        super().__init__()
        self.cfg = cfg
        self.dit = VideoDiT(cfg.dit())

    def upsample_input(self, lowres: torch.Tensor) -> torch.Tensor:
        B, Fr, C, h, w = lowres.shape
        up = F.interpolate(lowres.flatten(0, 1), scale_factor=self.scale, mode="bilinear", align_corners=False)
        return up.view(B, Fr, C, h * self.scale, w * self.scale)

    def forward(self, x_hr_noisy: torch.Tensor, t: torch.Tensor, lowres: torch.Tensor) -> torch.Tensor:
        """Velocity [B, F, C, H, W] of the high-res clip given the low-res clip [B, F, C, H/4, W/4]."""
        B, Fr, C, H, W = x_hr_noisy.shape
        want = (B, Fr, C, H // self.scale, W // self.scale)
        if tuple(lowres.shape) != want or H % self.scale or W % self.scale:
            raise ValueError(f"lowres must be {want} (x4 smaller than x_hr_noisy {tuple(x_hr_noisy.shape)}), "
                             f"got {tuple(lowres.shape)}")
        context = torch.zeros(B, dtype=torch.long, device=x_hr_noisy.device)
        return self.dit(x_hr_noisy, t, context, pixels=self.upsample_input(lowres))

    def training_loss(self, hr: torch.Tensor, lowres: torch.Tensor, generator: torch.Generator | None = None):
        return rf.training_loss(lambda x, t, cond, mask: self(x, t, lowres), hr, None, generator)

    @torch.no_grad()
    def upsample(self, lowres: torch.Tensor, steps: int | None = None, method: str = "euler",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample the x4 video [B, F, C, 4h, 4w] for lowres [B, F, C, h, w], clip by clip."""
        if lowres.dim() != 5:
            raise ValueError(f"lowres must be [B, F, C, h, w], got shape {tuple(lowres.shape)}")
        B, Fr, C, h, w = lowres.shape
        self.dit.check_frames(lowres.new_empty(0, 0, C, h * self.scale, w * self.scale), "upsampled lowres")
        steps = steps or self.cfg.steps
        clip = self.cfg.clip_frames
        # (sample, first frame, length) of every clip; clips of one length are batched together.
        clips = [(b, f0, min(clip, Fr - f0)) for b in range(B) for f0 in range(0, Fr, clip)]
        out = lowres.new_empty(B, Fr, C, h * self.scale, w * self.scale)
        for length in sorted({c[2] for c in clips}):
            same = [c for c in clips if c[2] == length]
            for i in range(0, len(same), self.cfg.batch_clips):
                group = same[i:i + self.cfg.batch_clips]
                lr = torch.stack([lowres[b, f0:f0 + length] for b, f0, _ in group])
                noise = torch.randn((len(group), length, C, h * self.scale, w * self.scale), generator=generator,
                                    device=lowres.device, dtype=lowres.dtype)
                hr = rf.sample(lambda x, t, cond, mask: self(x, t, lr), noise, steps, method)
                for (b, f0, _), frames in zip(group, hr):
                    out[b, f0:f0 + length] = frames
        return out.clamp(-1, 1)

    def flops_per_sample(self, frames: int, height: int, width: int) -> float:
        """Forward FLOPs for `frames` high-res frames, attention within clips of clip_frames."""
        clip = self.cfg.clip_frames
        full, rest = divmod(frames, clip)
        total = full * self.dit.flops_per_sample(clip, height, width)
        return total + (self.dit.flops_per_sample(rest, height, width) if rest else 0.0)

    def num_parameters(self) -> int:
        return self.dit.num_parameters()
