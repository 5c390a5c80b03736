"""Camera math of the render job: K and world-to-camera extrinsics on the circle (no Blender needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rendering.cameras import CircleRig, blender_c2w, cameras_json, fit_distance, intrinsics, opencv_w2c, project


def _centers(cams: dict) -> np.ndarray:
    out = []
    for w2c in cams["w2c"]:
        w2c = np.array(w2c)
        out.append(-w2c[:3, :3].T @ w2c[:3, 3])
    return np.array(out)


@pytest.mark.parametrize("views,elevation,fov,start,arc", [(8, 20.0, 40.0, 0.0, 360.0), (4, -15.0, 60.0, 33.0, 360.0),
                                                           (5, 45.0, 30.0, 10.0, 120.0), (1, 0.0, 50.0, 0.0, 360.0)])
def test_every_view_projects_origin_to_image_center(views, elevation, fov, start, arc):
    rig = CircleRig(views, elevation, fit_distance(fov), fov, start, arc)
    cams = cameras_json(rig, 64, 48)
    assert len(cams["K"]) == len(cams["w2c"]) == views
    for K, w2c in zip(cams["K"], cams["w2c"]):
        uv = project(np.array(K), np.array(w2c), np.zeros((1, 3)))[0]
        np.testing.assert_allclose(uv, [32.0, 24.0], atol=1e-9)
        R = np.array(w2c)[:3, :3]
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-9)
        assert np.linalg.det(R) == pytest.approx(1.0)
        # OpenCV: the origin is in front of the camera (z > 0) ...
        assert (np.array(w2c) @ [0, 0, 0, 1])[2] == pytest.approx(rig.distance)
        # ... and world up (+Z, Blender) maps to image up (smaller v, since y points down).
        above = project(np.array(K), np.array(w2c), np.array([[0.0, 0.0, 0.3]]))[0]
        assert above[1] < 24.0


def test_views_evenly_spaced_on_the_circle():
    rig = CircleRig(8, 20.0, 3.0, 40.0, 15.0, 360.0)
    centers = _centers(cameras_json(rig, 32, 32))
    np.testing.assert_allclose(np.linalg.norm(centers, axis=1), 3.0, atol=1e-9)
    np.testing.assert_allclose(np.degrees(np.arcsin(centers[:, 2] / 3.0)), 20.0, atol=1e-9)
    az = np.degrees(np.arctan2(centers[:, 1], centers[:, 0]))
    steps = np.diff(np.unwrap(np.radians(az)))
    np.testing.assert_allclose(np.degrees(steps), 45.0, atol=1e-9)
    assert az[0] == pytest.approx(15.0)
    # The closing step back to view 0 is also 45 degrees: a full circle never repeats a view.
    assert ((az[0] - az[-1]) % 360.0) == pytest.approx(45.0)


def test_partial_arc_includes_both_ends():
    rig = CircleRig(4, 0.0, 3.0, 40.0, -30.0, 90.0)
    assert rig.azimuths_deg() == pytest.approx([-30.0, 0.0, 30.0, 60.0])


def test_unit_sphere_stays_in_frame_at_fit_distance():
    fov = 40.0
    rig = CircleRig(6, 30.0, fit_distance(fov), fov)
    K = intrinsics(fov, 100, 100)
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(2000, 3))
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)  # points on the unit sphere: the worst case
    for c2w in blender_c2w(rig):
        uv = project(K, opencv_w2c(c2w), pts)
        assert uv.min() >= 0.0 and uv.max() <= 100.0


def test_focal_matches_field_of_view():
    K = intrinsics(90.0, 200, 100)
    assert K[0, 0] == pytest.approx(100.0) and K[1, 1] == pytest.approx(100.0)
    assert K[0, 2] == 100.0 and K[1, 2] == 50.0
    assert fit_distance(60.0, margin=1.0) == pytest.approx(1.0 / math.sin(math.radians(30.0)))
