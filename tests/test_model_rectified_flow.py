"""Rectified flow: interpolation, logit-normal times, masked loss, samplers, guidance."""

from __future__ import annotations

import pytest
import torch

from model import rectified_flow as rf


def test_add_noise_endpoints_and_velocity_target():
    x0, noise = torch.randn(3, 2, 3, 4, 4), torch.randn(3, 2, 3, 4, 4)
    torch.testing.assert_close(rf.add_noise(x0, noise, torch.zeros(3)), x0)
    torch.testing.assert_close(rf.add_noise(x0, noise, torch.ones(3)), noise)
    t = torch.tensor([0.25, 0.5, 0.75])
    x_t = rf.add_noise(x0, noise, t)
    # d x_t / dt is the velocity target.
    dt = 1e-3
    torch.testing.assert_close((rf.add_noise(x0, noise, t + dt) - x_t) / dt, rf.velocity_target(x0, noise),
                               atol=1e-3, rtol=1e-3)


def test_sample_t_is_logit_normal():
    g = torch.Generator().manual_seed(0)
    t = rf.sample_t(20000, generator=g)
    assert t.min() > 0 and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1) < 0.03


def test_masked_mse_ignores_given_frames_for_clips_and_grids():
    for frame_dims in [(2, 4), (2, 3, 3)]:
        target = torch.randn(*frame_dims, 3, 4, 4)
        mask = (torch.rand(frame_dims) < 0.5).float()
        mask.view(-1)[0], mask.view(-1)[1] = 1.0, 0.0
        pred = target + 0.1 * torch.randn_like(target)
        ref = rf.masked_mse(pred, target, mask)
        garbage = torch.where(mask[..., None, None, None] > 0, torch.full_like(pred, 1e3), pred)
        torch.testing.assert_close(rf.masked_mse(garbage, target, mask), ref)
        unknown = mask == 0
        torch.testing.assert_close(ref, (pred - target)[unknown].pow(2).mean())
    all_given = rf.masked_mse(torch.randn(1, 2, 3, 4, 4), torch.randn(1, 2, 3, 4, 4), torch.ones(1, 2))
    assert all_given.item() == 0.0



def test_per_sample_masked_mse_is_each_samples_own_loss():
    target = torch.randn(3, 4, 3, 4, 4)
    pred = target + torch.randn_like(target) * torch.tensor([0.1, 0.5, 1.0]).view(3, 1, 1, 1, 1)
    mask = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    per = rf.masked_mse(pred, target, mask, per_sample=True)
    assert per.shape == (3,)
    for i in range(3):
        torch.testing.assert_close(per[i], rf.masked_mse(pred[i:i + 1], target[i:i + 1], mask[i:i + 1]))
    assert per[0] < per[1] < per[2]  # the noise levels, unmixed by the other samples
    all_given = rf.masked_mse(pred, target, torch.tensor([[1.0] * 4, [0.0] * 4, [1.0] * 4]), per_sample=True)
    assert all_given[0] == 0 and all_given[2] == 0 and all_given[1] > 0  # zero, not NaN, for a sample all given
    torch.testing.assert_close(rf.masked_mse(pred, target, None, per_sample=True),
                               (pred - target).pow(2).flatten(1).mean(1))
    # the same draws as the batch loss: per-sample losses weighted by their unknown frames give it back
    loss, _ = rf.training_loss(lambda x, t, c, m: x, target, mask, torch.Generator().manual_seed(3))
    per_loss, _ = rf.training_loss(lambda x, t, c, m: x, target, mask, torch.Generator().manual_seed(3),
                                   per_sample=True)
    unknown = (1 - mask).sum(1)
    torch.testing.assert_close((per_loss * unknown).sum() / unknown.sum(), loss)


def test_training_loss_covers_only_unknown_frames():
    x0 = torch.randn(4, 3, 3, 4, 4)
    mask = torch.tensor([[1.0, 0, 0]] * 4)

    def oracle(x_t, t, cond, m):
        # Exact velocity (x_t - x0) / t on unknown frames, garbage on the given ones.
        v = (x_t - x0) / t.view(-1, 1, 1, 1, 1)
        assert torch.equal(x_t[:, 0], x0[:, 0]) and torch.equal(cond[:, 0], x0[:, 0])
        return torch.where(m[..., None, None, None] > 0, torch.full_like(v, 1e3), v)

    loss, aux = rf.training_loss(oracle, x0, mask, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8
    assert aux["given_fraction"].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_samplers_integrate_a_constant_velocity_exactly(method, steps):
    noise = torch.randn(2, 3, 3, 4, 4, dtype=torch.float64)
    c = torch.randn_like(noise)
    out = rf.sample(lambda x, t, cond, mask: c, noise, steps, method)
    torch.testing.assert_close(out, noise - c)


def test_heun_is_exact_for_velocity_linear_in_time_until_its_last_step_which_is_euler():
    """Heun integrates a velocity linear in t exactly; its last step (to t = 0, where the model was never
    trained) is an Euler step, so the model is never called at t = 0 (run 7 of docs/results.md)."""
    noise = torch.randn(1, 1, 3, 2, 2, dtype=torch.float64)
    a, b = torch.randn_like(noise), torch.randn_like(noise)
    times = []

    def field(x, t, cond, mask):
        times.append(float(t[0]))
        return a + b * t.view(-1, 1, 1, 1, 1).to(x.dtype)
    t1 = 0.25  # the last time before 0 of 4 unshifted steps
    at_t1 = noise - (a * (1 - t1) + b * (1 - t1 ** 2) / 2)  # x(t1) = x(1) - integral_t1^1 v dt, exactly
    expect = at_t1 - t1 * (a + b * t1)  # then one Euler step to 0
    torch.testing.assert_close(rf.sample(field, noise, 4, "heun"), expect)
    assert len(times) == 2 * 4 - 1 and min(times) == t1
    assert not torch.allclose(rf.sample(field, noise, 4, "euler"), expect)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_sampler_keeps_given_frames_clean_at_every_step(method):
    noise = torch.randn(2, 3, 3, 4, 4)
    cond = torch.randn_like(noise)
    mask = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    given = mask[..., None, None, None].expand_as(noise) > 0
    calls = []

    def model(x, t, c, m):
        assert torch.equal(x[given], cond[given])
        calls.append(t[0].item())
        return torch.randn_like(x)

    out = rf.sample(model, noise, 3, method, cond=cond, mask=mask)
    assert torch.equal(out[given], cond[given])
    assert len(calls) == (3 if method == "euler" else 5) and calls[0] == 1.0 and min(calls) > 0


def test_classifier_free_guidance_combines_the_two_predictions():
    noise = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)
    vc, vu = torch.randn_like(noise), torch.randn_like(noise)
    out = rf.sample(lambda *a: vc, noise, 2, guidance=3.0, uncond_fn=lambda *a: vu)
    torch.testing.assert_close(out, noise - (vu + 3.0 * (vc - vu)))
    with pytest.raises(ValueError, match="uncond_fn"):
        rf.sample(lambda *a: vc, noise, 2, guidance=3.0)
    with pytest.raises(ValueError, match="euler"):
        rf.sample(lambda *a: vc, noise, 2, method="rk4")


def test_timestep_shift_keeps_endpoints():
    ts = rf.timesteps(8, shift=3.0)
    assert ts[0] == 1.0 and ts[-1] == 0.0 and (ts[1:] < ts[:-1]).all()
    assert ts[4] > 0.5  # more of the budget spent at high noise


def test_training_times_shift_toward_noise_with_the_models_flow_shift():
    t = torch.linspace(0, 1, 11)
    shifted = rf.shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > t[1:-1]).all()
    torch.testing.assert_close(rf.timesteps(10, shift=3.0).float(), rf.shift_time(t.flip(0).double(), 3.0).float())
    # same draws, shifted: every time moves toward noise, and far more of them land where sampling starts
    plain = rf.sample_t(20000, generator=torch.Generator().manual_seed(0))
    moved = rf.sample_t(20000, generator=torch.Generator().manual_seed(0), shift=3.0)
    torch.testing.assert_close(moved, rf.shift_time(plain, 3.0))
    assert (moved > 0.95).float().mean() > 5 * (plain > 0.95).float().mean()
    # training_loss draws its times with the shift it is given
    x0 = torch.zeros(4096, 1, 3, 2, 2)
    _, aux1 = rf.training_loss(lambda x, t, c, m: x, x0, None, torch.Generator().manual_seed(1))
    _, aux3 = rf.training_loss(lambda x, t, c, m: x, x0, None, torch.Generator().manual_seed(1), shift=3.0)
    assert aux3["t_mean"] > aux1["t_mean"] + 0.1
    from model.dit import VideoDiT, dit_config
    with pytest.raises(ValueError, match="flow_shift must be positive"):
        VideoDiT(dit_config("tiny", flow_shift=0.0))  # would draw every training time at t = 0
