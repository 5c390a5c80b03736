"""Rectified flow (paper section 3.3): x_t = (1 - t) x0 + t noise, the model predicts v = noise - x0.

t = 0 is data, t = 1 is noise; samplers integrate dx/dt = v from t = 1 down to t = 0.
Frames marked given (mask = 1) are clean conditioning: they are reset to their clean
value before every model call and after every step, and the loss ignores them.
Masks are per frame and may have any number of frame dims ([B, F] for clips,
[B, V, T] for 4D grids); the last three dims of every video tensor are C, H, W.

A ``model_fn`` is called as ``model_fn(x_t, t, cond, mask)`` with t of shape [B].
"""

from __future__ import annotations

from typing import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3's resolution shift of flow times, s t / (1 + (s - 1) t): s > 1 moves every t toward the noise end.

    The more pixels a sample has, the longer its signal survives the noise: a 64 x 64 x 8 clip is still
    readable at t = 0.98, so a model trained on unshifted times barely learns what to do from pure noise, where
    every sampler starts (docs/results.md, "run 4"). Training and sampling must use the same shift.
    """
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def sample_t(batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None,
             mean: float = 0.0, std: float = 1.0, shift: float = 1.0) -> torch.Tensor:
    """Logit-normal flow times (SD3): sigmoid of N(mean, std), then ``shift_time``; concentrates training on mid
    noise levels (shifted toward noise for s > 1)."""
    return shift_time(torch.sigmoid(torch.randn(batch, generator=generator, device=device) * std + mean), shift)


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _frame_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, ...frame dims] -> broadcastable over [B, ...frame dims, C, H, W]."""
    if tuple(mask.shape) != tuple(like.shape[:-3]):
        raise ValueError(f"mask must have the frame dims {tuple(like.shape[:-3])} of the video, got {tuple(mask.shape)}")
    return mask.to(like.dtype)[..., None, None, None]


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = _per_sample(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, min_t: float = 0.0) -> torch.Tensor:
    """The velocity (x_t - x0) / t that a predicted clean sample x0 implies at x_t (noise = (x_t - (1-t) x0) / t).

    t is clamped at ``min_t`` so the velocity stays bounded near the data end; computed in fp32, since x_t and
    x0 nearly cancel at small t and bf16 would turn the difference into noise.
    """
    return (x_t.float() - x0.float()) / _per_sample(t.float().clamp_min(min_t), x_t.float())


def keep_given(x: torch.Tensor, cond: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    """x with the given frames replaced by their clean values."""
    if cond is None or mask is None:
        return x
    return torch.where(_frame_mask(mask, x) > 0, cond.to(x.dtype), x)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
               per_sample: bool = False) -> torch.Tensor:
    """Mean squared error over the frames NOT given (mask = 1 marks given frames): over the batch, or with
    ``per_sample`` one value per sample, [B] (held-out evaluation pairs checkpoints clip by clip)."""
    sq = (pred.float() - target.float()).pow(2)
    if mask is None:
        return sq.flatten(1).mean(1) if per_sample else sq.mean()
    unknown = 1 - _frame_mask(mask, sq)
    per_frame = sq.shape[-3] * sq.shape[-2] * sq.shape[-1]
    if per_sample:
        return (sq * unknown).flatten(1).sum(1) / (unknown.flatten(1).sum(1) * per_frame).clamp_min(1)
    # clamp: a batch where every frame is given contributes zero loss, not NaN.
    return (sq * unknown).sum() / (unknown.sum() * per_frame).clamp_min(1)


def training_loss(model_fn: ModelFn, x0: torch.Tensor, mask: torch.Tensor | None,
                  generator: torch.Generator | None = None,
                  shift: float = 1.0, per_sample: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Velocity-matching loss on the unknown frames of a batch of clips or grids (flow times shifted by
    ``shift``: the model's ``flow_shift``); ``per_sample``: one loss per sample, [B], from the same draws."""
    B = x0.shape[0]
    t = sample_t(B, generator=generator, device=x0.device, shift=shift)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    cond = None if mask is None else x0 * _frame_mask(mask, x0)
    x_t = keep_given(add_noise(x0, noise, t), cond, mask)
    pred = model_fn(x_t, t, cond, mask)
    loss = masked_mse(pred, velocity_target(x0, noise), mask, per_sample)
    aux = {"t_mean": t.mean().detach(),
           "given_fraction": (mask.float().mean() if mask is not None else torch.zeros(())).detach()}
    return loss, aux


SAMPLER_METHODS = ("euler", "heun")
"""Integrators of ``sample``: Euler (one model call per step) or Heun (two, second order; the last step, which
ends at t = 0, is Euler)."""


def timesteps(steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """steps+1 flow times from 1 to 0; shift > 1 spends more steps at high noise (SD3's resolution shift)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64), shift)


@torch.no_grad()
def sample(model_fn: ModelFn, noise: torch.Tensor, steps: int, method: str = "euler",
           cond: torch.Tensor | None = None, mask: torch.Tensor | None = None, guidance: float = 1.0,
           uncond_fn: ModelFn | None = None, shift: float = 1.0,
           progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Integrate from noise (t = 1) to data (t = 0) with Euler or Heun steps.

    Classifier-free guidance: v = v_u + guidance (v_c - v_u), with v_u from ``uncond_fn``
    (for example the same model without text, or with the context dropped).
    """
    if method not in SAMPLER_METHODS:
        raise ValueError(f"method must be one of {SAMPLER_METHODS}, got {method!r}")
    if guidance != 1.0 and uncond_fn is None:
        raise ValueError("guidance != 1 needs uncond_fn (the unconditional model)")
    B = noise.shape[0]

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        tb = torch.full((B,), t, device=x.device, dtype=torch.float32)
        v = model_fn(x, tb, cond, mask)
        if guidance != 1.0:
            v_u = uncond_fn(x, tb, cond, mask)
            v = v_u + guidance * (v - v_u)
        return v.to(x.dtype)

    ts = timesteps(steps, shift).tolist()
    x = keep_given(noise, cond, mask)
    for i in range(steps):
        t_cur, t_next = ts[i], ts[i + 1]
        dt = t_next - t_cur
        v = velocity(x, t_cur)
        x_next = keep_given(x + dt * v, cond, mask)
        # Heun's correction evaluates the model at t_next; the last step ends at t = 0, where training never
        # draws a time (logit-normal), so that step stays Euler, as in EDM's sampler (Karras et al. 2022, Alg. 1).
        # Evaluating there cost 3 dB on the proof's validation renders (docs/results.md, run 7).
        if method == "heun" and t_next > 0:
            v_next = velocity(x_next, t_next)
            x_next = keep_given(x + dt * 0.5 * (v + v_next), cond, mask)
        x = x_next
        if progress is not None:
            progress(i + 1, steps)
    return x
