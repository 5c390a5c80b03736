"""The pseudo-4D camera family and the warp: identity at view 0, smooth, invertible, no borders, exact geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.affine import FAMILIES, CameraPath, TransformConfig, draw_path, sampling_grid, source_extent, warp_views
from pipelines.make_pseudo4d import plan_crop

W, H = 48, 40


def _paths(n: int = 20, **kw):
    for fam in FAMILIES + ("mixed",):
        cfg = TransformConfig(family=fam, **kw)
        rng = np.random.default_rng(7)
        for _ in range(n):
            yield draw_path(cfg, rng, W, H)


def test_view0_is_identity_and_every_view_is_invertible():
    for path in _paths():
        mats = path.matrices(8)
        assert np.array_equal(mats[0], np.eye(3))
        for m in mats:
            assert np.linalg.det(m[:2, :2]) > 0.5           # orientation kept, never degenerate
            assert np.linalg.cond(m[:2, :2]) < 1.0001        # similarity: no shear, no anisotropy
            assert np.allclose(np.linalg.inv(m) @ m, np.eye(3), atol=1e-12)


def test_family_is_continuous_in_the_view_parameter():
    for path in _paths(5):
        s = np.linspace(0, 1, 201)
        mats = np.stack([path.matrix(x) for x in s])
        step = np.abs(np.diff(mats, axis=0)).max()
        # Linear parameters: a step of 1/200 in s moves any entry by a bounded, small amount (pixels for t).
        assert step < 0.02 * max(W, H)
        # Corners move smoothly too: second differences are tiny compared to first differences.
        corner = mats @ np.array([W, H, 1.0])
        assert np.abs(np.diff(corner, 2, axis=0)).max() < 0.05 * np.abs(np.diff(corner, axis=0)).max() + 1e-9


def test_magnitudes_reach_their_configured_size_at_the_last_view():
    cfg = TransformConfig(family="all", pan=0.2, zoom=0.25, rotate=10.0, min_strength=1.0)
    path = draw_path(cfg, np.random.default_rng(0), W, H)
    last = path.matrix(1.0)
    centre = np.array([W / 2, H / 2, 1.0])
    assert math.isclose(np.hypot(*(last @ centre - centre)[:2]), 0.2 * W, rel_tol=1e-9)   # pan about the centre
    assert math.isclose(math.sqrt(np.linalg.det(last[:2, :2])) ** (1 if path.log_scale > 0 else -1), 1.25, rel_tol=1e-9)
    assert math.isclose(abs(math.degrees(math.atan2(last[1, 0], last[0, 0]))), 10.0, rel_tol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_crop_mode_never_samples_outside_the_source(family):
    """Every view of every grid is filled with real pixels: none of the black the padding would give."""
    cfg = TransformConfig(family=family, pan=0.3, zoom=0.3, rotate=15.0, min_strength=1.0)
    rng = np.random.default_rng(1)
    for trial in range(10):
        src_w, src_h = [(160, 90), (90, 160), (64, 64), (300, 100)][trial % 4]
        path = draw_path(cfg, rng, W, H)
        mats = path.matrices(5)
        plan = plan_crop(source_extent(mats, W, H, slack=2.0), src_w, src_h, rng, random_position=trial % 2 == 1)
        rw, rh = plan.resized
        assert rw >= src_w * min(rw / src_w, rh / src_h) - 1 and abs(rw / src_w - rh / src_h) < 0.05  # aspect kept
        x0, y0, x1, y1 = plan.box
        assert 0 <= x0 < x1 <= rw and 0 <= y0 < y1 <= rh
        frames = rng.integers(100, 201, size=(3, y1 - y0, x1 - x0, 3), dtype=np.uint8)
        grid = sampling_grid(mats, W, H, (plan.offset[0] - x0, plan.offset[1] - y0), (x1 - x0, y1 - y0))
        assert float(grid.abs().max()) <= 1.0                # every tap inside the crop
        out, mask = warp_views(frames, grid, 5, pad=True)    # pad mode would expose any out-of-crop tap as black
        assert mask.min() == 255 and out.min() >= 100
        # View 0 is the window itself, pixel for pixel.
        ox, oy = plan.offset[0] - x0, plan.offset[1] - y0
        assert np.array_equal(out[0], frames[:, oy:oy + H, ox:ox + W])


def test_pad_mode_marks_the_empty_border():
    path = CameraPath("pan", pan_x=0.25 * W, pan_y=0.0, log_scale=0.0, angle=0.0, width=W, height=H)
    mats = path.matrices(3)
    frames = np.full((2, H, W, 3), 180, np.uint8)
    out, mask = warp_views(frames, sampling_grid(mats, W, H, (0, 0), (W, H)), 3, pad=True)
    assert mask[0].min() == 255
    # The last view is shifted right by 12 px: its left 12 columns have no source.
    assert (mask[2][:, :11] == 0).all() and (mask[2][:, 13:] == 255).all()
    assert (out[2][:, :, :11] == 0).all() and (out[2][:, :, 13:] == 180).all()


def _centroid(img: np.ndarray) -> np.ndarray:
    w = np.clip(img.astype(np.float64) - 60.0, 0, None)
    ys, xs = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    return np.array([(w * (xs + 0.5)).sum() / w.sum(), (w * (ys + 0.5)).sum() / w.sum()])


def test_a_marked_point_lands_where_the_matrix_says():
    rng = np.random.default_rng(3)
    cfg = TransformConfig(family="all", pan=0.2, zoom=0.2, rotate=10.0, min_strength=1.0)
    for _ in range(5):
        path = draw_path(cfg, rng, W, H)
        mats = path.matrices(6)
        x0, y0, x1, y1 = source_extent(mats, W, H, slack=2.0)
        cw, ch = math.ceil(x1 - x0), math.ceil(y1 - y0)
        origin = (-x0, -y0)
        dot = np.array([W / 2 + rng.uniform(-5, 5), H / 2 + rng.uniform(-5, 5)])   # view-0 coordinates
        ys, xs = np.mgrid[0:ch, 0:cw] + 0.5
        img = 40 + 215 * np.exp(-((xs - dot[0] - origin[0]) ** 2 + (ys - dot[1] - origin[1]) ** 2) / (2 * 1.5 ** 2))
        frames = np.repeat(np.round(img).astype(np.uint8)[None, :, :, None], 3, axis=-1)
        out, _ = warp_views(frames, sampling_grid(mats, W, H, origin, (cw, ch)), 6)
        for v in range(6):
            expected = (mats[v] @ np.array([dot[0], dot[1], 1.0]))[:2]
            assert np.linalg.norm(_centroid(out[v, 0, :, :, 0]) - expected) < 0.35, v
