"""4Real-Video models in pure torch + einops: base video DiT, rectified flow, x4 upsampler, 4D two-stream model."""

from model.dit import CONTEXT_DYNAMIC, CONTEXT_FREEZE_TIME, DIT_PRESETS, DiTConfig, VideoDiT, dit_config
from model.fourd import SYNC_VARIANTS, FourDConfig, FourDModel, grid_condition_mask
from model.upsampler import UPSAMPLER_PRESETS, UpsamplerConfig, VideoUpsampler, upsampler_config

__all__ = [
    "CONTEXT_DYNAMIC", "CONTEXT_FREEZE_TIME", "DIT_PRESETS", "DiTConfig", "VideoDiT", "dit_config",
    "SYNC_VARIANTS", "FourDConfig", "FourDModel", "grid_condition_mask",
    "UPSAMPLER_PRESETS", "UpsamplerConfig", "VideoUpsampler", "upsampler_config",
]
