"""Metrics of a generated 4D grid against ground truth (rendered grids know every cell).

All functions take float tensors in [0, 1] shaped [V, T, 3, H, W] unless noted.
``METRICS`` is the one registry of reported metrics (per-grid ones and set-level
ones); every score is over generated cells only, since the given first row and
column are copied exactly and would flatter every method alike.
FVD (I3D) and LPIPS need pretrained weights, which load from a local path only;
without them the metric is reported as unavailable with the reason, never as 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping

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


def _valid_filter(g: torch.Tensor, n: int) -> torch.Tensor:
    """The [n - k + 1, n] matrix of 'valid' filtering with the 1-D kernel ``g`` (k taps) along an axis of n."""
    k = len(g)
    tap = torch.arange(n, device=g.device)[None, :] - torch.arange(n - k + 1, device=g.device)[:, None]
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    return torch.where((tap >= 0) & (tap < k), g[tap.clamp(0, k - 1)], zero)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang et al. 2004: 11x11 Gaussian, sigma 1.5, K1 0.01, K2 0.03), averaged over channels and pixels.

    The Gaussian is separable, so the five local moments are filtered as two matrix products (rows, then
    columns; 'valid' filtering, as the reference code) in float64. That gives the 2-D convolution's values to
    round-off, 11-36x faster on CPU (benchmarks/bench_eval_metrics.py): float64 grouped convolutions have no
    fast path there, and evaluation spent 90% of its time in them."""
    lead = a.shape[:-3]
    c, h, w = a.shape[-3:]
    x, y = a.reshape(-1, c, h, w).double(), b.reshape(-1, c, h, w).double()
    g = _gaussian(min(11, h - (1 - h % 2), w - (1 - w % 2))).to(x.device)
    gh, gw = _valid_filter(g, h), _valid_filter(g, w).T
    # one moment at a time: peak memory stays that of the five filtered moments the formula needs
    mx, my, exx, eyy, exy = (gh @ (z @ gw) for z in (x, y, x * x, y * y, x * y))
    sxx, syy, sxy = exx - mx ** 2, eyy - my ** 2, exy - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).reshape(lead)


def consistency_error(gen: torch.Tensor, truth: torch.Tensor, axis: int, given: torch.Tensor | None = None) -> float:
    """Mean absolute difference between the frame-to-frame changes of ``gen`` and ``truth`` along ``axis``.

    axis=1 (time, along rows) measures flicker and wrong motion; axis=0 (views, along
    columns) measures multi-view inconsistency. 0 means the changes match the truth exactly.
    With ``given`` ([V, T], 1 = given cell) only pairs of neighbours with at least one
    generated cell count: given cells are copied exactly, so a pair of two given cells
    always scores 0 and would only dilute the error (flattering every method alike).
    """
    dg, dt = torch.diff(gen.double(), dim=axis), torch.diff(truth.double(), dim=axis)
    err = (dg - dt).abs().flatten(2).mean(-1)  # [pairs along axis, other axis]: mean over C, H, W
    if given is None:
        return float(err.mean())
    g = given.bool()
    both_given = g.narrow(axis, 0, g.shape[axis] - 1) & g.narrow(axis, 1, g.shape[axis] - 1)
    counted = ~both_given
    return float(err[counted].mean()) if counted.any() else float("nan")


def high_frequency_energy(images: torch.Tensor) -> torch.Tensor:
    """Mean squared Laplacian per image of [..., 3, H, W] images in [0, 1] -> [...].

    A sharpness measure: PSNR rewards a blurry mean prediction, this does not (blur
    removes exactly the energy the 4-neighbour Laplacian responds to). 'Valid'
    filtering, so image borders add nothing.
    """
    lead = images.shape[:-3]
    c, h, w = images.shape[-3:]
    x = images.reshape(-1, c, h, w).double()
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    lap = F.conv2d(x, k.expand(c, 1, 3, 3).contiguous(), groups=c)
    return (lap ** 2).flatten(1).mean(1).reshape(lead)


def high_frequency_ratio(gen: torch.Tensor, truth: torch.Tensor) -> float:
    """High-frequency energy of ``gen`` over the ground truth's (1 = as sharp as the truth, < 1 = blurrier)."""
    ref = float(high_frequency_energy(truth).mean())
    return float(high_frequency_energy(gen).mean()) / ref if ref > 0 else float("nan")


PSNR_CAP_DB = 20 * math.log10(255)
"""The most a cell's PSNR counts in a mean: 48.13 dB, an RMS error of one 8-bit level. An exact cell (+inf) must
count as something finite, and where it stops is a convention: the data are 8-bit images, so closer than one
level is treated as exact. The cap was 100 dB (for exact cells only) until 2026-11-25. Procedural actions often
return to their first pose, so copying the first column reproduced 280 of the 60 held-out render grids' cells
bit for bit. At 100 dB each, they raised its mean by 4.9 dB, level with the trained models (above them on run 7's
12 grids; docs/results.md). No model's cell comes near the cap (42.0 dB at most there)."""


def _capped_psnr(x: torch.Tensor) -> torch.Tensor:
    """PSNR per cell with everything above ``PSNR_CAP_DB`` (exact matches included) counted at the cap."""
    return x.clamp_max(PSNR_CAP_DB)


def masked_psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PSNR per image over the pixels where ``mask`` [..., 1, H, W] is true; NaN for an image with none."""
    m = mask.to(torch.float64).expand_as(a)
    sq = (a.double() - b.double()) ** 2 * m
    n = m.flatten(-3).sum(-1)
    mse = sq.flatten(-3).sum(-1) / n.clamp_min(1)
    return torch.where(n > 0, 10 * torch.log10(1.0 / mse), torch.full_like(mse, float("nan")))


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


# ---------------------------------------------------------------- the metric registry

@dataclass(frozen=True)
class GridSample:
    """One evaluated grid: everything a metric may look at."""

    gen: torch.Tensor                        # [V, T, 3, H, W] in [0, 1], the filled grid
    truth: torch.Tensor                      # [V, T, 3, H, W] in [0, 1], the ground truth
    given: torch.Tensor                      # [V, T], 1 = given (copied) cell
    object_mask: torch.Tensor | None = None  # [V, T, 1, H, W] bool, the ground truth's alpha > 0.5 (renders)

    @property
    def todo(self) -> torch.Tensor:
        return ~self.given.bool()

    # Per-cell scores, computed once per grid: the report lists them and the metrics average them.
    @cached_property
    def psnr_cells(self) -> torch.Tensor:
        return psnr(self.gen, self.truth)

    @cached_property
    def ssim_cells(self) -> torch.Tensor:
        return ssim(self.gen, self.truth)


@dataclass(frozen=True)
class Metric:
    """A registered metric.

    ``per_grid``: ``fn(GridSample) -> float``, reported as mean, std, min and max over a
    set's grids; otherwise ``fn(list[GridSample], weights) -> float`` over the whole set
    (``weights`` maps "i3d"/"lpips" to local weight paths; may raise MissingWeights).
    """

    fn: Callable[..., float]
    label: str
    digits: int
    per_grid: bool = True


def _psnr_generated(s: GridSample) -> float:
    return float(_capped_psnr(s.psnr_cells)[s.todo].mean()) if s.todo.any() else float("nan")


def _ssim_generated(s: GridSample) -> float:
    return float(s.ssim_cells[s.todo].mean()) if s.todo.any() else float("nan")


def _psnr_object(s: GridSample) -> float:
    """PSNR over the object's pixels per generated cell, mean over cells showing the object (n/a without alpha)."""
    if s.object_mask is None or not s.todo.any():
        return float("nan")
    cells = masked_psnr(s.gen[s.todo], s.truth[s.todo], s.object_mask[s.todo])
    cells = _capped_psnr(cells[~torch.isnan(cells)])
    return float(cells.mean()) if cells.numel() else float("nan")


def _hf_ratio(s: GridSample) -> float:
    return high_frequency_ratio(s.gen[s.todo], s.truth[s.todo]) if s.todo.any() else float("nan")


def _fvd_set(samples: list[GridSample], weights: Mapping[str, str]) -> float:
    # FVD compares sets of equal-length videos: the rows, and the columns too when they are as long
    gen, real = [], []
    for s in samples:
        V, T = s.gen.shape[:2]
        gen += [s.gen[v] for v in range(V)] + ([s.gen[:, t] for t in range(T)] if V == T else [])
        real += [s.truth[v] for v in range(V)] + ([s.truth[:, t] for t in range(T)] if V == T else [])
    return fvd(torch.stack(gen), torch.stack(real), weights.get("i3d", ""))


def _lpips_set(samples: list[GridSample], weights: Mapping[str, str]) -> float:
    gen = torch.cat([s.gen[s.todo] for s in samples])
    real = torch.cat([s.truth[s.todo] for s in samples])
    return float(lpips(gen, real, weights.get("lpips", "")).mean())


METRICS: dict[str, Metric] = {
    "psnr": Metric(_psnr_generated, "PSNR (dB) ↑", 2),
    "ssim": Metric(_ssim_generated, "SSIM ↑", 4),
    "psnr_object": Metric(_psnr_object, "object PSNR (dB) ↑", 2),
    "temporal_consistency_error": Metric(lambda s: consistency_error(s.gen, s.truth, 1, s.given),
                                         "temporal err ↓", 4),
    "multiview_consistency_error": Metric(lambda s: consistency_error(s.gen, s.truth, 0, s.given),
                                          "multi-view err ↓", 4),
    "hf_energy_ratio": Metric(_hf_ratio, "HF energy / truth (→ 1)", 3),
    "fvd": Metric(_fvd_set, "FVD ↓", 1, per_grid=False),
    "lpips": Metric(_lpips_set, "LPIPS ↓", 4, per_grid=False),
}
"""Every reported metric, in table order: the per-grid report, the summaries, the markdown table and MLflow
all iterate this one dict, so a metric added here shows up everywhere."""


def grid_report(gen: torch.Tensor, truth: torch.Tensor, given: torch.Tensor,
                object_mask: torch.Tensor | None = None) -> dict[str, Any]:
    """Per-cell PSNR/SSIM and every per-grid metric of ``METRICS`` (means over generated cells)."""
    sample = GridSample(gen, truth, given, object_mask)
    report: dict[str, Any] = {"psnr_per_cell": sample.psnr_cells.tolist(),
                              "ssim_per_cell": sample.ssim_cells.tolist()}
    report.update({name: m.fn(sample) for name, m in METRICS.items() if m.per_grid})
    report["generated_cells"] = int(sample.todo.sum())
    return report


def spread(values: list[float]) -> dict[str, float]:
    """mean, std (sample, n - 1), min and max of the non-NaN values (NaN where undefined)."""
    vals = [v for v in values if not math.isnan(v)]
    nan = float("nan")
    if not vals:
        return {"mean": nan, "std": nan, "min": nan, "max": nan}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else nan
    return {"mean": mean, "std": std, "min": min(vals), "max": max(vals)}
