"""x4 video upsampler: shapes, conditioning on the low-res video, clip-wise sampling."""

from __future__ import annotations

import pytest
import torch

from model import UPSAMPLER_PRESETS, VideoUpsampler, upsampler_config
from tests.model_helpers import randomize_


def tiny_upsampler(**overrides) -> VideoUpsampler:
    torch.manual_seed(0)
    return randomize_(VideoUpsampler(upsampler_config("tiny", **overrides)))


def test_forward_shape_and_lowres_conditioning():
    model = tiny_upsampler()
    lowres = torch.rand(2, 3, 3, 2, 3) * 2 - 1
    x = torch.randn(2, 3, 3, 8, 12)
    t = torch.rand(2)
    out = model(x, t, lowres)
    assert out.shape == x.shape
    assert not torch.allclose(out, model(x, t, lowres + 0.5))
    with pytest.raises(ValueError, match="x4 smaller"):
        model(x, t, torch.rand(2, 3, 3, 4, 6))


def test_upsample_samples_clip_by_clip():
    model = tiny_upsampler()
    lowres = torch.rand(2, 6, 3, 2, 3) * 2 - 1  # 6 frames, clips of 4: one clip of 4 and one of 2 per video
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    hr = model.upsample(lowres, steps=2, generator=g())
    assert hr.shape == (2, 6, 3, 8, 12)
    assert hr.abs().max() <= 1 and torch.isfinite(hr).all()
    torch.testing.assert_close(model.upsample(lowres, steps=2, generator=g()), hr)


def test_training_loss_backpropagates():
    model = tiny_upsampler()
    loss, _ = model.training_loss(torch.randn(1, 2, 3, 8, 12), torch.randn(1, 2, 3, 2, 3))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_paper_preset_targets_288x512_grids():
    with torch.device("meta"):
        model = VideoUpsampler(UPSAMPLER_PRESETS["paper"])
    assert model.scale == 4 and model.cfg.clip_frames == 8
    assert 100e6 < model.num_parameters() < 250e6
    # An 8x8 grid at 288x512: 64 frames in 8 clips of 8.
    assert model.flops_per_sample(64, 288, 512) == pytest.approx(8 * model.flops_per_sample(8, 288, 512))
