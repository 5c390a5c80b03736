"""Shared helpers for the model tests (tiny presets, randomised so zero-initialised layers do something)."""

from __future__ import annotations

import torch

from model import DIT_PRESETS, VideoDiT


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter with noise: adaLN-Zero would otherwise make every output zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def tiny_dit(seed: int = 0, **overrides) -> VideoDiT:
    from dataclasses import replace
    torch.manual_seed(seed)
    return randomize_(VideoDiT(replace(DIT_PRESETS["tiny"], **overrides)), seed)
