"""How far image content moves between neighbouring views: the render rig vs the pseudo-4D camera.

The 4D model learns view-to-view motion first from pseudo-4D grids (2D affine
camera paths, pipelines/affine.py) and then from renders on a circle
(rendering/cameras.py). A render rig whose neighbouring views are further apart
than anything the pseudo-4D data shows asks the model for a jump it has never
seen, so the render job's default arc is chosen with these measurements
(benchmarks/measure_render_arc.py prints the table; docs/rendering.md has the figures).

Every step is the mean image-space displacement of content between view v and
v + 1, as a fraction of the frame width, averaged over the V - 1 neighbouring
pairs. Pure numpy (plus pipelines.affine for the pseudo-4D family).
"""

from __future__ import annotations

import math

import numpy as np

from rendering.cameras import CircleRig, blender_c2w, fit_distance, intrinsics, opencv_w2c, project

ARC_CANDIDATES = (360.0, 180.0, 120.0, 90.0, 60.0, 45.0)
# The range the model has seen: the middle 90% of per-grid steps of the pseudo-4D family.
PSEUDO4D_QUANTILES = (0.05, 0.95)


def sphere_surface(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points on the unit sphere and their outward normals (the normalised object's bound)."""
    pts = np.random.default_rng(seed).normal(size=(n, 3))
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    return pts, pts.copy()


def box_surface(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points on a cube whose half-diagonal is 1 (what normalisation makes of a boxy object), with normals."""
    rng = np.random.default_rng(seed)
    half = 1.0 / math.sqrt(3.0)
    axis = rng.integers(0, 3, size=n)
    sign = rng.choice([-1.0, 1.0], size=n)
    pts = rng.uniform(-half, half, size=(n, 3))
    pts[np.arange(n), axis] = sign * half
    normals = np.zeros((n, 3))
    normals[np.arange(n), axis] = sign
    return pts, normals


def rig_steps(rig: CircleRig, width: int, height: int, points: np.ndarray,
              normals: np.ndarray | None = None) -> np.ndarray:
    """Mean displacement (fraction of ``width``) of ``points`` between each pair of neighbouring views.

    With ``normals``, only points facing both cameras count (a convex surface's
    visible part); without, every point does.
    """
    K = intrinsics(rig.fov_deg, width, height)
    c2ws = blender_c2w(rig)
    uvs = [project(K, opencv_w2c(c), points) for c in c2ws]
    centres = [c[:3, 3] for c in c2ws]
    out = []
    for v in range(len(c2ws) - 1):
        keep = np.ones(len(points), dtype=bool)
        if normals is not None:
            for c in (centres[v], centres[v + 1]):
                keep &= np.einsum("ij,ij->i", normals, c - points) > 0
        d = np.linalg.norm(uvs[v + 1][keep] - uvs[v][keep], axis=1)
        out.append(float(d.mean()) / width)
    return np.array(out)


def rig_step(arc_deg: float, views: int = 8, elevation_deg: float = 20.0, fov_deg: float = 40.0,
             width: int = 256, height: int = 144, surface: str = "sphere") -> float:
    """Mean neighbouring-view step of the default rig at ``arc_deg`` for a ``surface`` ("sphere" | "box")."""
    pts, normals = {"sphere": sphere_surface, "box": box_surface}[surface]()
    rig = CircleRig(views, elevation_deg, fit_distance(fov_deg, width, height), fov_deg, 0.0, arc_deg)
    return float(rig_steps(rig, width, height, pts, normals).mean())


def pseudo4d_steps(views: int = 8, width: int = 256, height: int = 144, draws: int = 2000, seed: int = 0,
                   transform=None) -> np.ndarray:
    """Per-grid mean neighbouring-view step of the pseudo-4D camera family, one value per drawn path.

    Paths are drawn exactly as the pseudo-4D job draws them (``draw_path`` with
    the default TransformConfig unless ``transform`` is given). A pixel ``p`` of
    view v shows source point ``A_v^-1 p``, which view v + 1 shows at
    ``A_{v+1} A_v^-1 p``; the step is that displacement averaged over a grid of
    pixels covering the frame.
    """
    from pipelines.affine import TransformConfig, draw_path
    cfg = transform if transform is not None else TransformConfig()
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.linspace(0.5, width - 0.5, 32), np.linspace(0.5, height - 0.5, 18))
    pix = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    out = np.empty(draws)
    for i in range(draws):
        mats = draw_path(cfg, rng, width, height).matrices(views)
        steps = [np.linalg.norm((mats[v + 1] @ np.linalg.inv(mats[v]) @ pix - pix)[:2], axis=0).mean()
                 for v in range(views - 1)]
        out[i] = float(np.mean(steps)) / width
    return out


def pseudo4d_range(views: int = 8, width: int = 256, height: int = 144) -> tuple[float, float]:
    """The band of per-view steps the pseudo-4D data covers (``PSEUDO4D_QUANTILES`` of its grids)."""
    steps = pseudo4d_steps(views, width, height)
    lo, hi = np.quantile(steps, PSEUDO4D_QUANTILES)
    return float(lo), float(hi)


def choose_arc(steps: dict[float, float], lo: float, hi: float) -> float:
    """The widest arc whose step lies in [lo, hi]: as much of the object as the model can follow."""
    inside = [arc for arc, step in steps.items() if lo <= step <= hi]
    if not inside:
        raise ValueError(f"no arc in {sorted(steps)} has a per-view step in [{lo:.4f}, {hi:.4f}]")
    return max(inside)
