"""Synthetic videos with real motion, for the demo, the tests and the benchmark.

A video is three layers composited back to front: a far textured backdrop that
drifts slowly, a mid layer of textured blobs that drifts faster in the same
direction (parallax), and a few textured discs that move along smooth paths and
spin (independent object motion). Everything is seeded, vectorised numpy; the
textures are tileable 1/f colour noise made in the Fourier domain, so layers can
scroll forever without seams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipelines.common.config import doc


@dataclass
class ProceduralConfig:
    """The ``procedural`` input: synthetic source videos made on the fly."""

    count: int = doc(4, "how many synthetic videos to make")
    width: int = doc(128, "source video width in pixels")
    height: int = doc(96, "source video height in pixels")
    frames: int = doc(24, "source video length in frames")
    fps: float = doc(24.0, "source video frame rate")
    objects: int = doc(3, "moving textured discs per video")
    seed: int = doc(0, "video i is made from seed + i")
    codec: str = doc("libx264", "encode each video with this codec in memory and decode it back, so synthetic "
                                "videos take the same decode path as files; 'none' hands the raw frames over")


def _noise_field(rng: np.random.Generator, height: int, width: int, beta: float) -> np.ndarray:
    """Tileable zero-mean unit-variance noise with a 1/f^beta power spectrum."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amp = f ** (-beta / 2.0)
    amp[0, 0] = 0.0
    field = np.real(np.fft.ifft2(amp * np.exp(1j * rng.uniform(0, 2 * np.pi, size=(height, width)))))
    return (field - field.mean()) / (field.std() + 1e-8)


def fractal_texture(rng: np.random.Generator, height: int, width: int, beta: float = 2.0) -> np.ndarray:
    """Tileable colour texture, float [H, W, 3] in [0, 1]: 1/f^beta detail over a smooth two-colour blend.

    Colour varies slowly and brightness carries the detail, like natural
    images (and so chroma subsampling in the codec loses little).
    """
    detail = _noise_field(rng, height, width, beta)
    blend = 1.0 / (1.0 + np.exp(-2.0 * _noise_field(rng, height, width, beta + 1.5)))
    c0, c1 = rng.uniform(0.15, 0.85, size=(2, 3))
    color = c0 * (1 - blend[..., None]) + c1 * blend[..., None]
    return np.clip(color * (1.0 + 0.35 * detail[..., None]), 0.0, 1.0)


def _scroll(texture: np.ndarray, ys: np.ndarray, xs: np.ndarray, dy: float, dx: float) -> np.ndarray:
    th, tw = texture.shape[:2]
    yi = (ys + int(round(dy))) % th
    xi = (xs + int(round(dx))) % tw
    return texture[yi[:, None], xi[None, :]]


def make_video(seed: int, width: int, height: int, frames: int, objects: int = 3, motion: float = 1.0
               ) -> np.ndarray:
    """A synthetic video, uint8 [T, H, W, 3]; ``motion=0`` gives a static one (for the static-video check)."""
    rng = np.random.default_rng(seed)
    tex_h, tex_w = 2 * height, 2 * width
    far = fractal_texture(rng, tex_h, tex_w, beta=2.6)
    mid = fractal_texture(rng, tex_h, tex_w, beta=2.2)
    # Mid-layer coverage: thresholded smooth noise -> tileable blobs ("foliage") with hard edges.
    blob = _noise_field(rng, tex_h, tex_w, beta=3.5)
    mid_alpha = (blob > np.quantile(blob, 0.55)).astype(np.float64)
    mid_rgba = np.concatenate([mid, mid_alpha[..., None]], axis=-1)

    direction = rng.uniform(0, 2 * math.pi)
    speed_far = rng.uniform(0.3, 0.8) * motion * width / 64      # pixels per frame
    speed_mid = speed_far * rng.uniform(2.0, 3.0)                 # nearer layer moves faster: parallax
    ux, uy = math.cos(direction), math.sin(direction)

    discs = []
    for _ in range(objects):
        r = rng.uniform(0.08, 0.16) * min(width, height)
        discs.append(dict(
            r=r, c=(rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height),
            a=(rng.uniform(0.1, 0.3) * width * motion, rng.uniform(0.1, 0.3) * height * motion),
            w=rng.uniform(0.5, 1.5, size=2) * 2 * math.pi / max(frames, 1),     # 0.5-1.5 cycles per video
            phase=rng.uniform(0, 2 * math.pi, size=2), spin=rng.uniform(-0.15, 0.15) * motion,
            cell=max(2.0, r / rng.uniform(1.5, 3.0)),
            colors=rng.uniform(0.05, 0.95, size=(2, 3)),
        ))

    ys, xs = np.arange(height), np.arange(width)
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        img = _scroll(far, ys, xs, uy * speed_far * t, ux * speed_far * t)
        layer = _scroll(mid_rgba, ys, xs, uy * speed_mid * t, ux * speed_mid * t)
        img = img * (1 - layer[..., 3:]) + layer[..., :3] * layer[..., 3:]
        for d in discs:
            cx = d["c"][0] + d["a"][0] * math.sin(d["w"][0] * t + d["phase"][0])
            cy = d["c"][1] + d["a"][1] * math.sin(d["w"][1] * t + d["phase"][1])
            r = d["r"]
            x0, x1 = max(0, int(cx - r) - 1), min(width, int(cx + r) + 2)
            y0, y1 = max(0, int(cy - r) - 1), min(height, int(cy + r) + 2)
            if x0 >= x1 or y0 >= y1:
                continue
            gy, gx = np.meshgrid(np.arange(y0, y1) + 0.5 - cy, np.arange(x0, x1) + 0.5 - cx, indexing="ij")
            inside = (gx * gx + gy * gy) <= r * r
            ang = d["spin"] * t
            u = math.cos(ang) * gx + math.sin(ang) * gy
            v = -math.sin(ang) * gx + math.cos(ang) * gy
            checker = (np.floor(u / d["cell"]) + np.floor(v / d["cell"])) % 2
            color = d["colors"][checker.astype(int)]
            region = img[y0:y1, x0:x1]
            region[inside] = color[inside]
        out[t] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out
