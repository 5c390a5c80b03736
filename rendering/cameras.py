"""Camera rigs on a circle around the normalized object, in Blender and OpenCV conventions.

Pure numpy, so the math is testable without Blender. World space is Blender's
(Z up). The object is normalized to fit the unit sphere at the origin over all
sampled frames, so a camera at ``distance >= 1 / sin(narrower fov / 2)`` keeps it
in frame whatever the animation does.

``fov_deg`` is the *vertical* field of view (Blender ``sensor_fit = "VERTICAL"``):
the frame's height spans it whatever the aspect ratio, and the horizontal one
follows from ``width / height``. For the landscape frames the model trains on
(9:16) the vertical one is the narrower, so it is the one that bounds the object.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

# Blender cameras look down -Z with +Y up; OpenCV cameras look down +Z with +Y down.
BLENDER_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass(frozen=True)
class CircleRig:
    """Where the V cameras sit: a circle at ``elevation`` around the origin; ``fov_deg`` is vertical."""

    views: int
    elevation_deg: float
    distance: float
    fov_deg: float
    start_azimuth_deg: float = 0.0
    arc_deg: float = 360.0

    def azimuths_deg(self) -> list[float]:
        """Evenly spaced azimuths; a full circle never repeats its start, a partial arc includes both ends."""
        if self.views == 1:
            return [self.start_azimuth_deg]
        if self.arc_deg >= 360.0:
            step = 360.0 / self.views
        else:
            step = self.arc_deg / (self.views - 1)
        return [self.start_azimuth_deg + i * step for i in range(self.views)]


def start_azimuth(uid: str, seed: int, random: bool) -> float:
    """A random but reproducible start azimuth per asset (same uid and seed, same cameras); 0 unless ``random``."""
    if not random:
        return 0.0
    digest = hashlib.sha256(f"{seed}:{uid}".encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 * 360.0


def fields_of_view(fov_deg: float, width: int, height: int) -> tuple[float, float]:
    """(horizontal, vertical) field of view in degrees of a ``width`` x ``height`` frame, vertical = ``fov_deg``."""
    half_y = math.radians(fov_deg) / 2.0
    half_x = math.atan(math.tan(half_y) * width / height)
    return math.degrees(2.0 * half_x), fov_deg


def fit_distance(fov_deg: float, width: int, height: int, radius: float = 1.0, margin: float = 1.05) -> float:
    """Smallest distance at which a sphere of ``radius`` at the origin stays inside the frame (times ``margin``).

    A sphere on the optical axis touches the frustum's side planes first where the
    half-angle is smallest, so the narrower of the two fields of view decides
    (the frame's corners reach further out, never less).
    """
    narrow = min(fields_of_view(fov_deg, width, height))
    return margin * radius / math.sin(math.radians(narrow) / 2.0)


def look_at_c2w(position: np.ndarray, target: np.ndarray = np.zeros(3)) -> np.ndarray:
    """Blender camera-to-world matrix (camera -Z towards target, +Y towards world +Z)."""
    forward = target - position
    forward = forward / np.linalg.norm(forward)
    world_up = np.array([0.0, 0.0, 1.0])
    if abs(float(forward @ world_up)) > 0.999:  # straight above or below: any horizontal up works
        world_up = np.array([0.0, 1.0, 0.0])
    right = np.cross(forward, world_up)
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -forward, position
    return c2w


def camera_positions(rig: CircleRig) -> np.ndarray:
    el = math.radians(rig.elevation_deg)
    out = []
    for az_deg in rig.azimuths_deg():
        az = math.radians(az_deg)
        out.append([rig.distance * math.cos(el) * math.cos(az), rig.distance * math.cos(el) * math.sin(az),
                    rig.distance * math.sin(el)])
    return np.array(out)


def blender_c2w(rig: CircleRig) -> list[np.ndarray]:
    """One camera-to-world matrix per view, Blender convention (what the scene's cameras get)."""
    return [look_at_c2w(p) for p in camera_positions(rig)]


def opencv_w2c(c2w_blender: np.ndarray) -> np.ndarray:
    """World-to-camera in OpenCV convention (x right, y down, z forward) from a Blender camera matrix."""
    return BLENDER_TO_OPENCV @ np.linalg.inv(c2w_blender)


def intrinsics(fov_deg: float, width: int, height: int) -> np.ndarray:
    """Pinhole K in pixels; ``fov_deg`` spans the image height (Blender's VERTICAL sensor fit), square pixels."""
    f = (height / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def project(K: np.ndarray, w2c: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Pixel coordinates (N x 2) of world points (N x 3)."""
    homo = np.c_[points, np.ones(len(points))] @ w2c.T
    uvw = homo[:, :3] @ K.T
    return uvw[:, :2] / uvw[:, 2:3]


def cameras_json(rig: CircleRig, width: int, height: int) -> dict:
    """The ``cameras.json`` member of a render sample (docs/data_format.md)."""
    K = intrinsics(rig.fov_deg, width, height)
    return {"type": "perspective", "convention": "opencv", "width": width, "height": height,
            "K": [K.tolist() for _ in range(rig.views)],
            "w2c": [opencv_w2c(c).tolist() for c in blender_c2w(rig)],
            "azimuth_deg": rig.azimuths_deg(), "elevation_deg": rig.elevation_deg, "distance": rig.distance,
            "fov_deg": rig.fov_deg, "fov_x_deg": fields_of_view(rig.fov_deg, width, height)[0]}
