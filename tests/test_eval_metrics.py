"""Metrics against hand-computed values on synthetic inputs; weight-based metrics load from a path or say why not."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.eval_metrics import (MissingWeights, consistency_error, frechet_distance, fvd, grid_report, lpips,
                                    psnr, ssim)


def test_psnr_matches_hand_computation() -> None:
    a = torch.zeros(3, 4, 4)
    b = torch.full((3, 4, 4), 0.1)
    assert psnr(a, b).item() == pytest.approx(20.0)  # mse 0.01 -> 10 log10(1/0.01)
    assert math.isinf(psnr(a, a).item())


def test_ssim_of_identical_and_of_a_constant_shift() -> None:
    torch.manual_seed(0)
    a = torch.rand(3, 16, 16)
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-9)
    # A constant offset d leaves the variances alone: SSIM = (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1) per window.
    flat = torch.full((1, 16, 16), 0.4)
    shifted = flat + 0.2
    c1 = 0.01 ** 2
    expected = (2 * 0.4 * 0.6 + c1) / (0.4 ** 2 + 0.6 ** 2 + c1)
    assert ssim(flat, shifted).item() == pytest.approx(expected, rel=1e-6)


def test_consistency_errors_see_flicker_and_view_jumps() -> None:
    truth = torch.zeros(2, 3, 3, 4, 4)
    gen = truth.clone()
    gen[:, 1] += 0.3  # one time step flickers in every view
    assert consistency_error(gen, truth, axis=1) == pytest.approx(0.3)  # |+0.3| and |-0.3| over 2 diffs
    assert consistency_error(gen, truth, axis=0) == pytest.approx(0.0)


def test_grid_report_averages_only_generated_cells() -> None:
    truth = torch.full((2, 2, 3, 8, 8), 0.5)
    gen = truth.clone()
    gen[1, 1] += 0.1
    given = torch.tensor([[1, 1], [1, 0]])
    rep = grid_report(gen, truth, given)
    assert rep["generated_cells"] == 1 and rep["psnr"] == pytest.approx(20.0)


def test_frechet_distance_of_shifted_gaussians() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 2.0) == pytest.approx(12.0, rel=1e-6)  # |mu1 - mu2|^2 = 3 * 4


def test_weight_based_metrics_load_from_a_path(tmp_path: Path) -> None:
    videos = torch.rand(6, 4, 3, 8, 8)
    with pytest.raises(MissingWeights, match="FVD not computed: no weights given"):
        fvd(videos, videos, "")
    with pytest.raises(MissingWeights, match="does not exist"):
        lpips(videos[:, 0], videos[:, 0], str(tmp_path / "lpips.pt"))

    class MeanFeatures(torch.nn.Module):  # a stand-in extractor with the I3D interface
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3, 4)).repeat(1, 4)

    path = tmp_path / "i3d.pt"
    torch.jit.script(MeanFeatures()).save(str(path))
    assert fvd(videos, videos, str(path)) == pytest.approx(0.0, abs=1e-6)
    assert fvd(videos, videos * 0.5, str(path)) > 0.01
