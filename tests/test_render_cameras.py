"""Camera math of the render job: K and world-to-camera extrinsics on the circle, and Blender's agreement."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rendering.cameras import (CircleRig, blender_c2w, cameras_json, fields_of_view, fit_distance, intrinsics,
                               opencv_w2c, project)

ROOT = Path(__file__).resolve().parents[1]


def _centers(cams: dict) -> np.ndarray:
    out = []
    for w2c in cams["w2c"]:
        w2c = np.array(w2c)
        out.append(-w2c[:3, :3].T @ w2c[:3, 3])
    return np.array(out)


@pytest.mark.parametrize("views,elevation,fov,start,arc", [(8, 20.0, 40.0, 0.0, 360.0), (4, -15.0, 60.0, 33.0, 360.0),
                                                           (5, 45.0, 30.0, 10.0, 120.0), (1, 0.0, 50.0, 0.0, 360.0)])
def test_every_view_projects_origin_to_image_center(views, elevation, fov, start, arc):
    rig = CircleRig(views, elevation, fit_distance(fov, 64, 48), fov, start, arc)
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


def _unit_sphere(n: int = 4000) -> np.ndarray:
    pts = np.random.default_rng(0).normal(size=(n, 3))
    return pts / np.linalg.norm(pts, axis=1, keepdims=True)  # points on the unit sphere: the worst case


@pytest.mark.parametrize("width,height", [(100, 100), (256, 144), (144, 256), (32, 18)])
def test_unit_sphere_stays_in_frame_at_fit_distance(width, height):
    fov = 40.0
    rig = CircleRig(6, 30.0, fit_distance(fov, width, height), fov)
    K = intrinsics(fov, width, height)
    pts = _unit_sphere()
    narrow = 0 if width < height else 1  # the image axis the sphere must fit along
    for c2w in blender_c2w(rig):
        uv = project(K, opencv_w2c(c2w), pts)
        assert uv[:, 0].min() >= 0.0 and uv[:, 0].max() <= width
        assert uv[:, 1].min() >= 0.0 and uv[:, 1].max() <= height
        # ... and the fit is tight along the narrow side (the 5% margin), not a loose square fit.
        size = (width, height)[narrow]
        extent = np.abs(uv[:, narrow] - size / 2.0).max() / (size / 2.0)
        assert 0.9 < extent < 0.97


def test_focal_matches_field_of_view():
    K = intrinsics(90.0, 200, 100)
    # The vertical field of view: tan(45) * f = height / 2.
    assert K[0, 0] == pytest.approx(50.0) and K[1, 1] == pytest.approx(50.0)
    assert K[0, 2] == 100.0 and K[1, 2] == 50.0
    assert fields_of_view(90.0, 200, 100) == pytest.approx((math.degrees(2 * math.atan(2.0)), 90.0))
    assert fit_distance(60.0, 100, 100, margin=1.0) == pytest.approx(1.0 / math.sin(math.radians(30.0)))
    # Landscape: the vertical field of view is the narrower one and decides.
    assert fit_distance(60.0, 256, 144, margin=1.0) == pytest.approx(2.0)
    # Portrait: the horizontal one is narrower (tan(half) = tan(30) * 144 / 256).
    half = math.atan(math.tan(math.radians(30.0)) * 144 / 256)
    assert fit_distance(60.0, 144, 256, margin=1.0) == pytest.approx(1.0 / math.sin(half))


# Runs in a child process: bpy is one Blender per process, and the test process stays free of it.
_BLENDER_PROJECTION = """
import json, sys
import numpy as np
import bpy
from bpy_extras.object_utils import world_to_camera_view
import mathutils
from rendering import scene as S
from rendering.cameras import CircleRig, fit_distance
from rendering.settings import RenderSettings
width, height, fov, points = json.loads(sys.argv[1])
s = RenderSettings(views=3, width=width, height=height, fov=fov, multiview=False)
S.reset()
S.configure_engine(s)
rig = CircleRig(3, 25.0, fit_distance(fov, width, height), fov, 10.0, 60.0)
cams = S.setup_cameras(rig, s)
bpy.context.view_layer.update()
scene = bpy.context.scene
out = []
for cam in cams:
    ndc = [world_to_camera_view(scene, cam, mathutils.Vector(p)) for p in points]
    # Blender's view coordinates: x from the left, y from the bottom, both 0..1 over the frame.
    out.append([[c.x * width, (1.0 - c.y) * height] for c in ndc])
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize("width,height", [(256, 144), (144, 256), (64, 64)])
def test_cameras_json_matches_blender_projection(width, height):
    """What Blender's cameras (scene.setup_cameras) project is what cameras.json's K and w2c say, non-square too."""
    fov = 40.0
    pts = np.concatenate([np.random.default_rng(1).uniform(-1, 1, size=(50, 3)), _unit_sphere(400)])
    proc = subprocess.run([sys.executable, "-c", _BLENDER_PROJECTION, json.dumps([width, height, fov, pts.tolist()])],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-2000:]
    blender = np.array(json.loads(lines[-1][7:]))
    rig = CircleRig(3, 25.0, fit_distance(fov, width, height), fov, 10.0, 60.0)
    cams = cameras_json(rig, width, height)
    assert (cams["width"], cams["height"]) == (width, height)
    for v in range(3):
        ours = project(np.array(cams["K"][v]), np.array(cams["w2c"][v]), pts)
        np.testing.assert_allclose(ours, blender[v], atol=2e-3 * max(width, height))
    # In Blender's own projection the unit sphere fills the narrow side of the frame, inside the margin.
    sphere = blender[:, 50:]
    assert sphere[..., 0].min() > 0 and sphere[..., 0].max() < width
    assert sphere[..., 1].min() > 0 and sphere[..., 1].max() < height
    narrow = 0 if width < height else 1
    size = (width, height)[narrow]
    assert np.abs(sphere[..., narrow] - size / 2.0).max() > 0.9 * size / 2.0
