"""Render one asset: every action becomes a V x T grid sample (frames, cameras, meta).

Runs inside the Blender worker. Returns plain data (bytes and dicts) that the
Ray actor turns into shard samples.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import bpy

from rendering import scene as S
from rendering.cameras import CircleRig, cameras_json, fit_distance, start_azimuth
from rendering.settings import RenderSettings


def _render_grid(frames: list[float], views: int, s: RenderSettings, cams: list, tmp: str,
                 suffix: str = "png") -> dict[str, bytes]:
    """Render every (view, time) of the grid; members are named ``v{VV}t{TT}.<suffix>``."""
    scene = bpy.context.scene
    files: dict[str, bytes] = {}
    for t, frame in enumerate(frames):
        S.set_frame(frame)
        if s.multiview:
            scene.render.filepath = os.path.join(tmp, f"t{t:02d}.png")
            bpy.ops.render.render(write_still=True)
            written = {v: os.path.join(tmp, f"t{t:02d}_v{v:02d}.png") for v in range(views)}
        else:
            written = {}
            for v, cam in enumerate(cams):
                scene.camera = cam
                scene.render.filepath = os.path.join(tmp, f"t{t:02d}_v{v:02d}.png")
                bpy.ops.render.render(write_still=True)
                written[v] = scene.render.filepath
        for v, path in written.items():
            if not os.path.isfile(path):
                raise S.SceneError("render", f"Blender wrote no image for view {v} time {t}")
            with open(path, "rb") as fh:
                files[f"v{v:02d}t{t:02d}.{suffix}"] = fh.read()
            os.unlink(path)
    return files


def render_asset(path: str, uid: str, source: str, s: RenderSettings) -> dict[str, Any]:
    """Import ``path`` into a fresh scene and render up to ``s.max_actions`` actions of it."""
    t0 = time.time()
    S.reset()
    S.import_asset(path)
    t_import = time.time() - t0
    actions = S.list_actions()
    # A single-frame action is a pose, not motion: it cannot make a 4D sample.
    moving = [a for a in actions if a.frame_range[1] - a.frame_range[0] >= 1.0]
    if not moving:
        what = "no actions" if not actions else f"only single-frame actions ({', '.join(a.name for a in actions[:3])})"
        raise S.SceneError("static", f"asset has no animation ({what}); it cannot make a 4D sample")
    actions = moving
    rest = S.RestPose()
    scene = bpy.context.scene
    scene_fps = scene.render.fps / scene.render.fps_base
    S.configure_engine(s)
    S.setup_lighting(s)
    distance = s.distance if s.distance > 0 else fit_distance(s.fov, s.width, s.height)
    rig = CircleRig(views=s.views, elevation_deg=s.elevation, distance=distance, fov_deg=s.fov,
                    start_azimuth_deg=start_azimuth(uid, s.seed, s.random_azimuth), arc_deg=s.arc)
    cams = S.setup_cameras(rig, s)
    cameras = cameras_json(rig, s.width, s.height)
    samples = []
    tmp = tempfile.mkdtemp(prefix="render-", dir=os.environ.get("RENDER_SCRATCH") or None)
    try:
        for action in actions[: s.max_actions]:
            start, end, animated = S.apply_action(action, rest)
            frames = S.sample_frames(start, end, s.frames, scene_fps, s.fps)
            S.clear_normalization()
            lo, hi = S.world_bbox(frames)
            norm = S.normalize(lo, hi)
            t1 = time.time()
            files = _render_grid(frames, s.views, s, cams, tmp)
            extra: dict[str, Any] = {}
            if s.depth:
                max_depth = distance + 2.0  # the unit-radius object lies within distance + 1 of every camera
                with S.AuxPass(S.depth_material(max_depth), "BW", "16"):
                    files.update(_render_grid(frames, s.views, s, cams, tmp, "depth.png"))
                extra["depth_scale"] = max_depth / 65535.0
            if s.normals:
                with S.AuxPass(S.normal_material(), "RGB", "8"):
                    files.update(_render_grid(frames, s.views, s, cams, tmp, "normal.png"))
                extra["normal_space"] = "world"
            meta = {"kind": "render", "item_id": uid, "uid": uid, "source": source, "action": action.name,
                    "views": s.views, "frames": s.frames, "height": s.height, "width": s.width,
                    "fps": s.fps, "scene_fps": scene_fps, "frame_indices": frames,
                    "action_range": [start, end], "animated": animated, "normalization": norm,
                    "render": {"engine": s.engine, "samples": s.samples, "denoise": s.denoise,
                               "denoiser": "OPENIMAGEDENOISE" if s.denoise else "none",
                               "denoise_quality": s.denoise_quality, "denoise_prefilter": s.denoise_prefilter,
                               "elevation_deg": s.elevation, "distance": distance, "fov_deg": s.fov,
                               "start_azimuth_deg": rig.start_azimuth_deg, "arc_deg": s.arc,
                               "lighting": s.lighting, "light_strength": s.light_strength, "ambient": s.ambient,
                               "multiview": s.multiview, "blender": bpy.app.version_string},
                    "seconds": {"import": round(t_import, 3), "render": round(time.time() - t1, 3)}, **extra}
            samples.append({"action": action.name, "files": files, "cameras": cameras, "meta": meta})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"samples": samples, "actions_total": len(actions), "seconds": time.time() - t0}
