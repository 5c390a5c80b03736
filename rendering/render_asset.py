"""Render one asset: every action becomes a V x T grid sample (frames, cameras, meta).

Runs inside the Blender worker. Returns plain data (bytes and dicts) that the
Ray actor turns into shard samples.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import time
from typing import Any, NamedTuple

import bpy
import numpy as np

from rendering import scene as S
from rendering.cameras import CircleRig, cameras_json, fit_distance, start_azimuth
from rendering.settings import RenderSettings

PHASES = ("eval", "sync", "trace_denoise", "write")
_SAMPLE = re.compile(r"Sample (\d+)/(\d+)")


class PhaseClock:
    """Seconds of a grid's render calls split into phases, from the times Cycles reports its status.

    Cycles sends a status line to ``bpy.app.handlers.render_stats`` at every step of a render call
    ("Synchronizing object | Body", "Updating Images", "Updating Scene BVH | Building BVH", "Sample 0/16",
    ..., "Sample 16/16", "Finished"; once per view with multiview). Each call is cut at those times:

    * ``eval``: ``scene.frame_set`` before the call (the main depsgraph: actions, armature skinning);
    * ``sync``: from the call to the first view's "Sample 0/N" (the render depsgraph's evaluation, Cycles'
      object, mesh and attribute sync, image loading, the BVH build), plus the camera and film updates
      between views (each view's "Finished" to the next one's "Sample 0/N");
    * ``trace_denoise``: each view's "Sample 0/N" to its "Finished": path tracing, and the OpenImageDenoise
      pass, which Cycles runs inside the work item of the last samples (no status line separates the two;
      benchmarks/bench_render_real.py splits them by rendering with denoising off);
    * ``write``: the last "Finished" to the call's return (render result, PNG encoding and file writes of
      every view), plus reading the files back into memory.

    The phases sum to the grid's wall time up to the loop's own bookkeeping. A call whose status lines do
    not have that shape (another engine) counts whole under ``other``. The handler only appends a time
    and a string (microseconds, a few dozen times per call).
    """

    def __init__(self) -> None:
        self.seconds = {k: 0.0 for k in PHASES}
        self.seconds["other"] = 0.0
        self.region_retries = 0
        self._events: list[tuple[float, str]] = []

    def _on_stats(self, message, *_args) -> None:  # called from Cycles' render thread
        self._events.append((time.perf_counter(), str(message)))

    def __enter__(self) -> "PhaseClock":
        bpy.app.handlers.render_stats.append(self._on_stats)
        return self

    def __exit__(self, *exc) -> None:
        if self._on_stats in bpy.app.handlers.render_stats:
            bpy.app.handlers.render_stats.remove(self._on_stats)

    def render(self, write_still: bool = True) -> None:
        """``bpy.ops.render.render`` with its time split into sync, trace_denoise and write."""
        self._events = []
        t0 = time.perf_counter()
        bpy.ops.render.render(write_still=write_still)
        t1 = time.perf_counter()
        starts, finishes = [], []
        for t, msg in self._events:
            m = _SAMPLE.search(msg)
            if m is not None and m.group(1) == "0":
                starts.append(t)
            elif msg.rstrip().endswith("Finished") and len(finishes) < len(starts):
                finishes.append(t)
        if not starts or len(finishes) != len(starts):
            self.seconds["other"] += t1 - t0
            return
        trace = sum(f - s for s, f in zip(starts, finishes))
        self.seconds["trace_denoise"] += trace
        self.seconds["sync"] += finishes[-1] - t0 - trace
        self.seconds["write"] += t1 - finishes[-1]

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items() if v > 0 or k in PHASES}


def _edges_clear(png: bytes, border, width: int, height: int) -> bool:
    """Whether the outermost row and column of pixels inside ``border`` are fully transparent in ``png``.

    The border holds every projected vertex with 3.5 pixels to spare, and the pixel filter spreads coverage
    by 1.5 at most, so object pixels there mean geometry the boxes did not see (instances, objects hidden in
    the viewport but not in renders): the time step is then rendered again on the whole frame.
    """
    from PIL import Image
    alpha = np.asarray(Image.open(io.BytesIO(png)).getchannel("A"))
    def px(b: float, n: int) -> int:  # Blender's border edge in pixels: float32 product, truncated (measured)
        return int(np.float32(b) * np.float32(n))
    x0, x1 = px(border[0], width), px(border[1], width)
    r0, r1 = height - px(border[3], height), height - px(border[2], height)  # rows, from the top
    bands = []
    if x0 > 0:
        bands.append(alpha[r0:r1, x0])
    if x1 < width:
        bands.append(alpha[r0:r1, x1 - 1])
    if r0 > 0:
        bands.append(alpha[r0, x0:x1])
    if r1 < height:
        bands.append(alpha[r1 - 1, x0:x1])
    return not any(band.any() for band in bands)


def _render_step(t: int, views: int, s: RenderSettings, cams: list, tmp: str, clock: PhaseClock,
                 border) -> dict[int, bytes]:
    """One time step: every view's PNG bytes (``border``: one for all views with multiview, else per view)."""
    scene = bpy.context.scene
    if s.multiview:
        S.set_border(border)
        scene.render.filepath = os.path.join(tmp, f"t{t:02d}.png")
        clock.render()
        written = {v: os.path.join(tmp, f"t{t:02d}_v{v:02d}.png") for v in range(views)}
    else:
        written = {}
        for v, cam in enumerate(cams):
            scene.camera = cam
            S.set_border(border[v] if border else None)
            scene.render.filepath = os.path.join(tmp, f"t{t:02d}_v{v:02d}.png")
            clock.render()
            written[v] = scene.render.filepath
    t0 = time.perf_counter()
    out = {}
    for v, path in written.items():
        if not os.path.isfile(path):
            raise S.SceneError("render", f"Blender wrote no image for view {v} time {t}")
        with open(path, "rb") as fh:
            out[v] = fh.read()
        os.unlink(path)
    clock.add("write", time.perf_counter() - t0)
    return out


def _render_grid(frames: list[float], views: int, s: RenderSettings, cams: list, tmp: str,
                 suffix: str = "png", clock: PhaseClock | None = None, borders: list | None = None) -> dict[str, bytes]:
    """Render every (view, time) of the grid; members are named ``v{VV}t{TT}.<suffix>``.

    ``borders``: per time step, the render border (``S.render_borders``; per view without multiview) or
    None for the whole frame. A time step whose picture reaches a border's edge is rendered again on the
    whole frame (counted in ``clock.region_retries``).
    """
    clock = clock or PhaseClock()
    files: dict[str, bytes] = {}
    for t, frame in enumerate(frames):
        t0 = time.perf_counter()
        S.set_frame(frame)
        clock.add("eval", time.perf_counter() - t0)
        border = borders[t] if borders else None
        got = _render_step(t, views, s, cams, tmp, clock, border)
        if border is not None:
            t0 = time.perf_counter()
            per_view = [border] * views if s.multiview else border
            clear = all(b is None or _edges_clear(got[v], b, s.width, s.height) for v, b in enumerate(per_view))
            clock.add("write", time.perf_counter() - t0)
            if not clear:
                clock.region_retries += 1
                got = _render_step(t, views, s, cams, tmp, clock, None if s.multiview else [None] * views)
        for v, data in got.items():
            files[f"v{v:02d}t{t:02d}.{suffix}"] = data
    return files


def _region_fraction(borders: list | None) -> float:
    """Mean share of the frame's pixels that were path traced (1.0: whole frames)."""
    if not borders:
        return 1.0
    flat = [b for x in borders for b in (x if isinstance(x, list) else [x])]
    return round(sum(1.0 if b is None else (b[1] - b[0]) * (b[3] - b[2]) for b in flat) / len(flat), 4)


class FramePlan(NamedTuple):
    """What an action renders: its range, the sampled frames, the normalization and the render regions."""
    start: float
    end: float
    animated: list[str]    # the names the action drives
    frames: list[float]
    norm: dict[str, Any]
    borders: list | None   # per time step (per view without multiview); None: whole frames
    seconds: float         # normalization and regions (meta's seconds.normalize)


class StagedScene(NamedTuple):
    """A scene ready to render: what stage_scene set up."""
    actions: list         # the actions that move (more than one frame long), in the asset's order
    rest: Any             # the rest pose, restored before each action
    rig: CircleRig
    cameras: list
    import_seconds: float  # reset and import (meta's seconds.import)


def stage_scene(path: str, s: RenderSettings, start_azimuth_deg: float) -> StagedScene:
    """A fresh scene holding ``path`` under the job's engine, lighting and camera circle, or SceneError
    ("static") before any set-up when nothing in it moves. The job's set-up, shared with the benchmarks that
    take its render calls apart (benchmarks/measure_render_costs.py), so they measure the scene the job renders."""
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
    rest = S.RestPose()
    S.configure_engine(s)
    S.setup_lighting(s)
    distance = s.distance if s.distance > 0 else fit_distance(s.fov, s.width, s.height)
    rig = CircleRig(views=s.views, elevation_deg=s.elevation, distance=distance, fov_deg=s.fov,
                    start_azimuth_deg=start_azimuth_deg, arc_deg=s.arc)
    return StagedScene(moving, rest, rig, S.setup_cameras(rig, s), t_import)


def plan_frames(action: Any, rest: Any, rig: CircleRig, s: RenderSettings, scene_fps: float) -> FramePlan:
    """Apply ``action``, sample its frames, normalize the object over them and find the render regions."""
    start, end, animated = S.apply_action(action, rest)
    frames = S.sample_frames(start, end, s.frames, scene_fps, s.fps)
    t1 = time.time()
    S.clear_normalization()
    points: list = []
    boxes = S.frame_bboxes(frames, points if s.render_region else None)
    norm = S.normalize(*S.bbox_union(boxes))
    borders = None
    if s.render_region and not S.region_unsafe():  # geometry the boxes do not measure: whole frames
        borders = S.render_borders(boxes, norm, rig, s.width, s.height, points, per_view=not s.multiview)
    return FramePlan(start, end, animated, frames, norm, borders, time.time() - t1)


def render_asset(path: str, uid: str, source: str, s: RenderSettings) -> dict[str, Any]:
    """Import ``path`` into a fresh scene and render up to ``s.max_actions`` actions of it."""
    t0 = time.time()
    actions, rest, rig, cams, t_import = stage_scene(path, s, start_azimuth(uid, s.seed, s.random_azimuth))
    scene = bpy.context.scene
    scene_fps = scene.render.fps / scene.render.fps_base
    cameras = cameras_json(rig, s.width, s.height)
    samples = []
    tmp = tempfile.mkdtemp(prefix="render-", dir=os.environ.get("RENDER_SCRATCH") or None)
    try:
        for action in actions[: s.max_actions]:
            start, end, animated, frames, norm, borders, t_norm = plan_frames(action, rest, rig, s, scene_fps)
            t1 = time.time()
            try:
                with PhaseClock() as clock:
                    files = _render_grid(frames, s.views, s, cams, tmp, clock=clock, borders=borders)
            finally:
                S.set_border(None)
            t_render = time.time() - t1
            extra: dict[str, Any] = {}
            aux_seconds: dict[str, float] = {}
            if s.depth:
                t2 = time.time()
                max_depth = rig.distance + 2.0  # the unit-radius object lies within distance + 1 of every camera
                with S.AuxPass(S.depth_material(max_depth), "BW", "16"):
                    files.update(_render_grid(frames, s.views, s, cams, tmp, "depth.png"))
                extra["depth_scale"] = max_depth / 65535.0
                aux_seconds["depth"] = round(time.time() - t2, 3)
            if s.normals:
                t2 = time.time()
                with S.AuxPass(S.normal_material(), "RGB", "8"):
                    files.update(_render_grid(frames, s.views, s, cams, tmp, "normal.png"))
                extra["normal_space"] = "world"
                aux_seconds["normals"] = round(time.time() - t2, 3)
            meta = {"kind": "render", "item_id": uid, "uid": uid, "source": source, "action": action.name,
                    "views": s.views, "frames": s.frames, "height": s.height, "width": s.width,
                    "fps": s.fps, "scene_fps": scene_fps, "frame_indices": frames,
                    "action_range": [start, end], "animated": animated, "normalization": norm,
                    "render": {"engine": s.engine, "samples": s.samples, "denoise": s.denoise,
                               "denoiser": "OPENIMAGEDENOISE" if s.denoise else "none",
                               "denoise_quality": s.denoise_quality, "denoise_prefilter": s.denoise_prefilter,
                               "elevation_deg": s.elevation, "distance": rig.distance, "fov_deg": s.fov,
                               "start_azimuth_deg": rig.start_azimuth_deg, "arc_deg": s.arc,
                               "lighting": s.lighting, "light_strength": s.light_strength, "ambient": s.ambient,
                               "multiview": s.multiview, "blender": bpy.app.version_string,
                               "region": _region_fraction(borders), "region_retries": clock.region_retries},
                    # import: once per asset (every sample of it carries the same figure); render: this grid's
                    # wall time, split into PhaseClock's phases under "phases" (they sum to it).
                    "seconds": {"import": round(t_import, 3), "normalize": round(t_norm, 3),
                                "render": round(t_render, 3), "phases": clock.rounded(), **aux_seconds},
                    **extra}
            samples.append({"action": action.name, "files": files, "cameras": cameras, "meta": meta})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"samples": samples, "actions_total": len(actions), "seconds": time.time() - t0}
