"""Metrics of a generated 4D grid against ground truth (rendered grids know every cell).

All functions take float tensors in [0, 1] shaped [V, T, 3, H, W] unless noted.
FVD (I3D) and LPIPS need pretrained weights, which load from a local path only;
without them the metric is reported as unavailable with the reason, never as 0.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.common.errors import UserError


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB over the last three dims (images in [0, 1]); identical images give +inf."""
    mse = ((a.double() - b.double()) ** 2).flatten(-3).mean(-1)
    return 10 * torch.log10(1.0 / mse)


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang et al. 2004: 11x11 Gaussian, sigma 1.5, K1 0.01, K2 0.03), averaged over channels and pixels."""
    lead = a.shape[:-3]
    c, h, w = a.shape[-3:]
    x, y = a.reshape(-1, c, h, w).double(), b.reshape(-1, c, h, w).double()
    g = _gaussian(min(11, h - (1 - h % 2), w - (1 - w % 2)))
    k = (g[:, None] * g[None, :]).expand(c, 1, -1, -1).contiguous()
    f = lambda z: F.conv2d(z, k, groups=c)  # noqa: E731  ('valid' filtering, as the reference code)
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).reshape(lead)


def consistency_error(gen: torch.Tensor, truth: torch.Tensor, axis: int) -> float:
    """Mean absolute difference between the frame-to-frame changes of ``gen`` and ``truth`` along ``axis``.

    axis=1 (time, along rows) measures flicker and wrong motion; axis=0 (views, along
    columns) measures multi-view inconsistency. 0 means the changes match the truth exactly.
    """
    dg, dt = torch.diff(gen.double(), dim=axis), torch.diff(truth.double(), dim=axis)
    return float((dg - dt).abs().mean())


def grid_report(gen: torch.Tensor, truth: torch.Tensor, given: torch.Tensor) -> dict:
    """Per-cell PSNR/SSIM, their means over generated cells, and the two consistency errors."""
    cell_psnr, cell_ssim = psnr(gen, truth), ssim(gen, truth)
    todo = ~given.bool()
    finite = torch.where(torch.isinf(cell_psnr), torch.full_like(cell_psnr, 100.0), cell_psnr)
    return {
        "psnr_per_cell": cell_psnr.tolist(), "ssim_per_cell": cell_ssim.tolist(),
        "psnr": float(finite[todo].mean()) if todo.any() else float("nan"),
        "ssim": float(cell_ssim[todo].mean()) if todo.any() else float("nan"),
        "temporal_consistency_error": consistency_error(gen, truth, axis=1),
        "multiview_consistency_error": consistency_error(gen, truth, axis=0),
        "generated_cells": int(todo.sum()),
    }


# ---------------------------------------------------------------- weight-based metrics

class MissingWeights(UserError):
    pass


def _load_torchscript(path: str, what: str, how: str) -> torch.jit.ScriptModule:
    if not path:
        raise MissingWeights(f"{what} not computed: no weights given; {how}")
    p = Path(path)
    if not p.is_file():
        raise MissingWeights(f"{what} not computed: weights file {p} does not exist; {how}")
    try:
        return torch.jit.load(str(p), map_location="cpu").eval()
    except Exception as exc:
        raise MissingWeights(f"{what} not computed: {p} is not a TorchScript model ({type(exc).__name__}); {how}") \
            from None


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)
    # tr(sqrt(s1 s2)) from the eigenvalues of s1 s2 (real, >= 0 up to round-off for PSD inputs)
    eig = np.linalg.eigvals(s1 @ s2)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


FVD_HOW = ("pass --i3d-weights with a TorchScript I3D feature extractor (e.g. the i3d_torchscript.pt used by "
           "StyleGAN-V's FVD code), taking [N, 3, T, 224, 224] in [-1, 1] and returning [N, 400] features")
LPIPS_HOW = ("pass --lpips-weights with a TorchScript LPIPS model taking two [N, 3, H, W] batches in [-1, 1] "
             "and returning [N] distances")


def fvd(gen_videos: torch.Tensor, real_videos: torch.Tensor, weights: str) -> float:
    """FVD between video sets [N, T, 3, H, W] in [0, 1] (rows and columns of the grids are the videos)."""
    i3d = _load_torchscript(weights, "FVD", FVD_HOW)

    def feats(v: torch.Tensor) -> np.ndarray:
        x = v.flatten(0, 1)
        x = F.interpolate(x.float(), size=(224, 224), mode="bilinear", align_corners=False)
        x = x.reshape(v.shape[0], v.shape[1], 3, 224, 224).permute(0, 2, 1, 3, 4) * 2 - 1
        with torch.no_grad():
            return i3d(x).double().numpy()
    return frechet_distance(feats(gen_videos), feats(real_videos))


def lpips(gen: torch.Tensor, truth: torch.Tensor, weights: str) -> torch.Tensor:
    """LPIPS per image for [N, 3, H, W] batches in [0, 1]."""
    net = _load_torchscript(weights, "LPIPS", LPIPS_HOW)
    with torch.no_grad():
        return net(gen.float() * 2 - 1, truth.float() * 2 - 1).flatten()


def nan_safe_mean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")
