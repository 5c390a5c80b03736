"""Metrics against hand-computed values on synthetic inputs; weight-based metrics load from a path or say why not."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.eval_metrics import (METRICS, PSNR_CAP_DB, MissingWeights, consistency_error, frechet_distance, fvd,
                                    grid_report, high_frequency_energy, high_frequency_ratio, lpips, psnr, spread, ssim)


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


@pytest.mark.parametrize("shape", [(2, 3, 3, 32, 24), (4, 3, 7, 9), (2, 1, 12, 12)])  # 11, 7 and 11 taps
def test_ssim_equals_the_2d_gaussian_window(shape: tuple[int, ...]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_eval_metrics import ssim_2d
    torch.manual_seed(1)
    a = torch.rand(shape)
    b = (a + 0.2 * torch.randn(shape)).clamp(0, 1)
    got = ssim(a, b)
    assert got.shape == shape[:-3]
    want = ssim_2d(a, b)  # the 2-D window, as grouped convolutions
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert 0.05 < float(got.min()) < float(got.max()) < 0.99  # a real, non-degenerate comparison


def test_consistency_errors_see_flicker_and_view_jumps() -> None:
    truth = torch.zeros(2, 3, 3, 4, 4)
    gen = truth.clone()
    gen[:, 1] += 0.3  # one time step flickers in every view
    assert consistency_error(gen, truth, axis=1) == pytest.approx(0.3)  # |+0.3| and |-0.3| over 2 diffs
    assert consistency_error(gen, truth, axis=0) == pytest.approx(0.0)


def test_consistency_counts_only_pairs_with_a_generated_cell() -> None:
    # 2 views x 3 times, first row and column given (copied exactly); one generated cell is off by 0.3.
    truth = torch.zeros(2, 3, 3, 4, 4)
    gen = truth.clone()
    gen[1, 1] += 0.3
    given = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # time pairs with a generated cell: (1,0)-(1,1) and (1,1)-(1,2), both off by 0.3; the two pairs of given
    # cells in row 0 score 0 by construction and are not counted (the whole grid would average 0.15).
    assert consistency_error(gen, truth, axis=1, given=given) == pytest.approx(0.3)
    assert consistency_error(gen, truth, axis=1) == pytest.approx(0.15)
    # view pairs: (0,1)-(1,1) off by 0.3, (0,2)-(1,2) exact; the given pair (0,0)-(1,0) is not counted
    assert consistency_error(gen, truth, axis=0, given=given) == pytest.approx(0.15)
    rep = grid_report(gen, truth, given)
    assert rep["temporal_consistency_error"] == pytest.approx(0.3)
    assert rep["multiview_consistency_error"] == pytest.approx(0.15)


def test_high_frequency_energy_of_stripes_and_blur() -> None:
    stripes = torch.zeros(1, 3, 8, 8)
    stripes[..., ::2] = 1.0  # the Laplacian of alternating columns is +-2 everywhere: energy 4
    assert high_frequency_energy(stripes).item() == pytest.approx(4.0)
    assert high_frequency_energy(torch.full((2, 3, 8, 8), 0.7)).tolist() == pytest.approx([0.0, 0.0])
    torch.manual_seed(0)
    sharp = torch.rand(4, 3, 32, 32)
    blurred = torch.nn.functional.avg_pool2d(sharp, 3, stride=1, padding=1, count_include_pad=False)
    assert high_frequency_energy(blurred).shape == (4,)
    ratio = high_frequency_ratio(blurred, sharp)
    assert ratio < 0.2  # a 3x3 box blur of white noise keeps little energy above half Nyquist
    assert high_frequency_ratio(sharp, sharp) == pytest.approx(1.0)
    assert psnr(blurred, sharp).mean() > psnr(torch.rand(4, 3, 32, 32), sharp).mean()  # why PSNR is not enough


def test_object_psnr_counts_only_object_pixels() -> None:
    truth = torch.full((2, 2, 3, 8, 8), 0.5)
    gen = truth.clone()
    objects = torch.zeros(2, 2, 1, 8, 8, dtype=torch.bool)
    objects[..., 2:6, 2:6] = True
    gen[1, 1] += torch.where(objects[1, 1], 0.1, 0.3)  # 0.1 off on the object, 0.3 off on the background
    given = torch.tensor([[1, 1], [1, 0]])
    rep = grid_report(gen, truth, given, objects)
    assert rep["psnr_object"] == pytest.approx(20.0)  # mse 0.01 over the object
    assert rep["psnr"] < 13.0  # the background error dominates the whole-cell PSNR
    assert math.isnan(grid_report(gen, truth, given)["psnr_object"])  # no alpha: n/a, never a number


def test_registry_drives_the_grid_report() -> None:
    truth = torch.rand(2, 3, 3, 8, 8)
    rep = grid_report(truth.clone(), truth, torch.tensor([[1, 1, 1], [1, 0, 0]]))
    per_grid = {k for k, m in METRICS.items() if m.per_grid}
    assert {"psnr", "ssim", "psnr_object", "temporal_consistency_error", "multiview_consistency_error",
            "hf_energy_ratio"} == per_grid
    assert per_grid <= set(rep) and {"fvd", "lpips"} <= set(METRICS) - per_grid
    assert rep["hf_energy_ratio"] == pytest.approx(1.0) and rep["psnr"] == pytest.approx(PSNR_CAP_DB)


def test_cells_closer_than_one_8bit_level_count_at_the_cap() -> None:
    """An exact cell (a copy of a pose the truth repeats) counts 48.13 dB, not +inf or 100: the mean over a grid
    must not reward a baseline for what 8-bit truths cannot tell apart."""
    assert PSNR_CAP_DB == pytest.approx(48.1308, abs=1e-4)
    truth = torch.full((2, 2, 3, 8, 8), 0.5)
    gen = truth.clone()
    gen[1, 0] += 0.1     # 20 dB
    gen[1, 1] += 1e-4    # 80 dB: closer than one level, counted at the cap
    given = torch.tensor([[1, 0], [0, 0]])  # cell (0, 1) generated and exact
    rep = grid_report(gen, truth, given, torch.ones(2, 2, 1, 8, 8, dtype=torch.bool))
    assert math.isinf(rep["psnr_per_cell"][0][1]) and rep["psnr_per_cell"][1][1] == pytest.approx(80.0, abs=0.01)
    assert rep["psnr"] == pytest.approx((2 * PSNR_CAP_DB + 20.0) / 3)
    assert rep["psnr_object"] == pytest.approx((2 * PSNR_CAP_DB + 20.0) / 3)


def test_spread_of_per_grid_values() -> None:
    s = spread([20.0, 22.0, float("nan"), 24.0])
    assert (s["mean"], s["min"], s["max"]) == (22.0, 20.0, 24.0) and s["std"] == pytest.approx(2.0)
    assert math.isnan(spread([21.0])["std"]) and math.isnan(spread([float("nan")])["mean"])


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
