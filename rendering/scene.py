"""Blender scene building: import, animation selection, normalization, lights, cameras, engine.

Runs only inside the Blender worker process (rendering/worker.py), where ``bpy``
is loaded once and reused for many assets.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

import bpy
import mathutils

from rendering.cameras import CircleRig, blender_c2w, intrinsics, opencv_w2c, project
from rendering.errors import StageError
from rendering.settings import MIN_THREADS, RenderSettings

IMPORTERS = {
    ".glb": lambda p: bpy.ops.import_scene.gltf(filepath=p),
    ".gltf": lambda p: bpy.ops.import_scene.gltf(filepath=p),
    ".fbx": lambda p: bpy.ops.import_scene.fbx(filepath=p, use_anim=True),
    ".obj": lambda p: bpy.ops.wm.obj_import(filepath=p),
}
GEOMETRY_TYPES = {"MESH", "CURVE", "SURFACE", "META", "FONT", "CURVES", "POINTCLOUD"}
ROOT_NAME = "__normalize_root__"


class SceneError(StageError):
    """An asset-level problem found while building the scene."""


def reset() -> None:
    bpy.ops.wm.read_factory_settings(use_empty=True)


def import_asset(path: str) -> None:
    ext = Path(path).suffix.lower()
    if ext not in IMPORTERS:
        raise SceneError("import", f"unsupported file type '{ext}'; use one of {', '.join(IMPORTERS)}")
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise SceneError("import", f"asset file {path} is missing or empty")
    try:
        result = IMPORTERS[ext](path)
    except Exception as exc:  # importers raise RuntimeError with multi-line reports
        first = str(exc).strip().splitlines()
        raise SceneError("import", f"{ext[1:]} importer failed: {first[-1] if first else type(exc).__name__}") from None
    if "FINISHED" not in result:
        raise SceneError("import", f"{ext[1:]} importer returned {sorted(result)}")
    # Lights that ship inside an asset (glTF punctual lights) would make its brightness depend on the
    # exporter; every asset is lit by the configured rig alone. Imported cameras are harmless and stay.
    for obj in bpy.context.scene.objects:
        if obj.type == "LIGHT":
            obj.hide_render = True
    if not geometry_objects():
        raise SceneError("import", "asset has no visible geometry")


def geometry_objects() -> list:
    scene = bpy.context.scene
    return [o for o in scene.objects if o.type in GEOMETRY_TYPES and not o.hide_render and o.visible_get()]


def _animated_ids() -> list:
    ids = list(bpy.context.scene.objects) + [k for k in bpy.data.shape_keys]
    return [i for i in ids if i.animation_data is not None]


def list_actions() -> list:
    """Actions that drive something in this scene (active or in NLA tracks), by name."""
    found: dict[str, Any] = {}
    for id_block in _animated_ids():
        ad = id_block.animation_data
        if ad.action is not None:
            found[ad.action.name] = ad.action
        for track in ad.nla_tracks:
            for strip in track.strips:
                if strip.action is not None:
                    found[strip.action.name] = strip.action
    return [found[name] for name in sorted(found)]


class RestPose:
    """Transforms, bone poses and shape-key values as imported, restored before each action.

    Without this, an object that action B does not animate would keep wherever
    action A left it.
    """

    def __init__(self) -> None:
        scene = bpy.context.scene
        self.objects = {o.name: o.matrix_basis.copy() for o in scene.objects}
        self.bones = {(o.name, b.name): b.matrix_basis.copy() for o in scene.objects if o.pose for b in o.pose.bones}
        self.keys = {(k.name, kb.name): kb.value for k in bpy.data.shape_keys for kb in k.key_blocks}

    def restore(self) -> None:
        scene = bpy.context.scene
        for o in scene.objects:
            if o.name in self.objects:
                o.matrix_basis = self.objects[o.name]
            if o.pose:
                for b in o.pose.bones:
                    if (o.name, b.name) in self.bones:
                        b.matrix_basis = self.bones[(o.name, b.name)]
        for k in bpy.data.shape_keys:
            for kb in k.key_blocks:
                if (k.name, kb.name) in self.keys:
                    kb.value = self.keys[(k.name, kb.name)]


def _slot_for(action, id_block):
    for slot in action.slots:
        if slot.identifier == slot.target_id_type[:2] + id_block.name or slot.identifier[2:] == id_block.name:
            return slot
    return None


def apply_action(action, rest: RestPose) -> tuple[float, float, list[str]]:
    """Make ``action`` the only animation playing; returns its frame range and the names it drives.

    A glTF animation over several nodes imports as one action with a slot per
    object (or shape-key block); each animated ID gets the action with its own slot.
    """
    for id_block in _animated_ids():
        ad = id_block.animation_data
        for track in ad.nla_tracks:
            track.mute = True
        ad.action = None
    rest.restore()
    bound: list[str] = []
    for id_block in _animated_ids():
        slot = _slot_for(action, id_block)
        if slot is not None:
            ad = id_block.animation_data
            ad.action = action
            ad.action_slot = slot
            bound.append(id_block.name)
    if not bound:  # slot names that match nothing (renamed objects): give it to whoever used it
        for id_block in _animated_ids():
            for track in id_block.animation_data.nla_tracks:
                if any(s.action == action for s in track.strips):
                    id_block.animation_data.action = action
                    bound.append(id_block.name)
    start, end = action.frame_range
    return float(start), float(end), sorted(bound)


def sample_frames(start: float, end: float, count: int, scene_fps: float, target_fps: float) -> list[float]:
    """``count`` frame numbers from ``start`` at ``target_fps``, squeezed to fit actions shorter than that."""
    step = scene_fps / target_fps
    if count > 1 and (count - 1) * step > end - start:
        step = (end - start) / (count - 1)
    return [round(start + i * step, 4) for i in range(count)]


def set_frame(frame: float) -> None:
    whole = math.floor(frame)
    bpy.context.scene.frame_set(int(whole), subframe=float(frame - whole))


# Vertices kept per action for the render borders (all sampled frames together): ~24 MB of float32.
BORDER_POINTS_MAX = 2_000_000


def frame_bboxes(frames: list[float], points: list | None = None) -> np.ndarray:
    """Axis-aligned world bounds (T x 2 x 3: lo, hi) of all evaluated geometry (modifiers, skinning, shape
    keys) at each of ``frames``.

    With a ``points`` list, also appends each frame's evaluated world vertices (float32, N x 3) to it, unless
    they pass ``BORDER_POINTS_MAX`` in all; then the list is cleared (callers fall back to the boxes).
    """
    boxes = np.empty((len(frames), 2, 3))
    kept = 0
    for t, frame in enumerate(frames):
        lo = np.full(3, np.inf)
        hi = np.full(3, -np.inf)
        frame_pts = []
        set_frame(frame)
        depsgraph = bpy.context.evaluated_depsgraph_get()
        for obj in geometry_objects():
            ev = obj.evaluated_get(depsgraph)
            try:
                mesh = ev.to_mesh()
            except RuntimeError:
                mesh = None
            if mesh is None or len(mesh.vertices) == 0:
                if mesh is not None:
                    ev.to_mesh_clear()
                pts = np.array([list(c) for c in ev.bound_box], dtype=np.float64)
            else:
                pts = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
                mesh.vertices.foreach_get("co", pts)
                pts = pts.reshape(-1, 3).astype(np.float64)
                ev.to_mesh_clear()
            mw = np.array(ev.matrix_world)
            world = pts @ mw[:3, :3].T + mw[:3, 3]
            lo = np.minimum(lo, world.min(0))
            hi = np.maximum(hi, world.max(0))
            kept += len(world)
            if points is not None and kept <= BORDER_POINTS_MAX:
                frame_pts.append(world.astype(np.float32))
        boxes[t, 0], boxes[t, 1] = lo, hi
        if points is not None and kept <= BORDER_POINTS_MAX:
            points.append(np.concatenate(frame_pts) if frame_pts else np.empty((0, 3), np.float32))
    if points is not None and kept > BORDER_POINTS_MAX:
        points.clear()
    return boxes


def world_bbox(frames: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned bounds of all evaluated geometry (modifiers, skinning, shape keys) over ``frames``."""
    return bbox_union(frame_bboxes(frames))


def bbox_union(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bounds over all frames of ``frame_bboxes``' boxes."""
    lo, hi = boxes[:, 0].min(0), boxes[:, 1].max(0)
    if not np.all(np.isfinite(lo)) or not np.all(np.isfinite(hi)):
        raise SceneError("normalize", "could not measure the asset's bounds (no vertices in any sampled frame)")
    return lo, hi


def region_unsafe() -> bool:
    """Whether the scene renders geometry that ``frame_bboxes`` does not measure, so that no render region may
    be cut from its boxes: instances (geometry-nodes or glTF GPU instancing, particles, dupli collections), or
    objects hidden in the viewport but not in renders (``geometry_objects`` leaves them out; wholly outside
    a region, the edge check would not see them either)."""
    depsgraph = bpy.context.evaluated_depsgraph_get()
    if any(inst.is_instance for inst in depsgraph.object_instances):
        return True
    # Collections hidden in renders hide what is in them and in their children (the glTF importer puts its
    # bone shapes in one); excluded collections' objects are not in the view layer at all.
    hidden: set = set()

    def walk(coll, parent_hidden: bool) -> None:
        h = parent_hidden or coll.hide_render
        if h:
            hidden.add(coll.name)
        for child in coll.children:
            walk(child, h)
    for child in bpy.context.scene.collection.children:
        walk(child, False)
    return any(o.type in GEOMETRY_TYPES and not o.hide_render and not o.visible_get()
               and not any(c.name in hidden for c in o.users_collection)
               for o in bpy.context.view_layer.objects)


Border = tuple[float, float, float, float]


def render_borders(boxes: np.ndarray, norm: dict[str, Any], rig: CircleRig, width: int, height: int,
                   points: list | None = None, per_view: bool = False,
                   margin_px: float = 3.5) -> list:
    """The part of the frame the object can cover, as Blender's render border (min_x, max_x, min_y, max_y in
    0..1, y up; None for the whole frame): per time step the union over the views (what one multiview
    render call can use), or with ``per_view`` a list per time step with one border per view.

    Each frame's evaluated vertices (``points``, from ``frame_bboxes``; else the 8 corners of its bounding
    box, a looser bound) are normalized and projected into the cameras; their pixel box is grown by
    ``margin_px``: Cycles' Blackman-Harris pixel filter (width 1.5) spreads coverage up to 1.5 pixels past
    the projected geometry (1.4 measured), Blender truncates the border to whole pixels, and one more pixel
    stays clear for render_asset's check. Everything outside is background, which on a transparent film
    renders to exact zeros: without denoising, the region gives the very same pixels as the whole frame.
    """
    K = intrinsics(rig.fov_deg, width, height)
    w2cs = [opencv_w2c(c) for c in blender_c2w(rig)]
    center, scale = np.asarray(norm["center"]), float(norm["scale"])

    def to_border(x0: float, x1: float, y0: float, y1: float) -> Border | None:
        x0, x1 = max(0.0, x0 - margin_px) / width, min(float(width), x1 + margin_px) / width
        y0, y1 = max(0.0, y0 - margin_px) / height, min(float(height), y1 + margin_px) / height
        if x1 <= x0 or y1 <= y0:
            return None
        return (x0, x1, 1.0 - y1, 1.0 - y0)  # OpenCV rows run down; Blender's border y runs up

    out: list = []
    for t, (lo, hi) in enumerate(boxes):
        if points:
            pts = (points[t].astype(np.float64) - center) * scale
        else:
            pts = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
            pts = (pts - center) * scale
        views: list[tuple[float, float, float, float] | None] = []
        for w2c in w2cs:
            depth = pts @ w2c[2, :3] + w2c[2, 3]
            if len(pts) == 0 or np.any(depth <= 1e-3):  # a point at or behind the camera: no safe box
                views.append(None)
                continue
            uv = project(K, w2c, pts)
            views.append((uv[:, 0].min(), uv[:, 0].max(), uv[:, 1].min(), uv[:, 1].max()))
        if per_view:
            out.append([None if v is None else to_border(*v) for v in views])
        elif any(v is None for v in views):
            out.append(None)
        else:
            a = np.array(views)
            out.append(to_border(a[:, 0].min(), a[:, 1].max(), a[:, 2].min(), a[:, 3].max()))
    return out


def set_border(border: tuple[float, float, float, float] | None) -> None:
    """Render only ``border`` of the frame (full-size output, zeros outside), or the whole frame (None)."""
    r = bpy.context.scene.render
    if border is None:
        r.use_border = False
        return
    r.use_border = True
    r.use_crop_to_border = False
    r.border_min_x, r.border_max_x, r.border_min_y, r.border_max_y = border


def normalize(lo: np.ndarray, hi: np.ndarray) -> dict[str, Any]:
    """Put everything under a root that maps the box's centre to the origin and its half-diagonal to 1."""
    center = (lo + hi) / 2.0
    radius = float(np.linalg.norm(hi - lo) / 2.0)
    if radius < 1e-8:
        raise SceneError("normalize", "asset has zero size over the sampled frames")
    scale = 1.0 / radius
    root = bpy.data.objects.get(ROOT_NAME)
    if root is None:
        root = bpy.data.objects.new(ROOT_NAME, None)
        bpy.context.scene.collection.objects.link(root)
        for obj in list(bpy.context.scene.objects):
            if obj.parent is None and obj is not root and obj.type != "CAMERA" and obj.type != "LIGHT":
                obj.parent = root
                obj.matrix_parent_inverse = mathutils.Matrix.Identity(4)
    root.scale = (scale, scale, scale)
    root.location = tuple(-center * scale)
    return {"center": center.tolist(), "scale": scale}


def clear_normalization() -> None:
    root = bpy.data.objects.get(ROOT_NAME)
    if root is not None:
        root.scale = (1, 1, 1)
        root.location = (0, 0, 0)


def setup_lighting(s: RenderSettings) -> None:
    scene = bpy.context.scene
    world = bpy.data.worlds.new("render_world")
    world.use_nodes = True
    bg = world.node_tree.nodes.get("Background")
    bg.inputs["Color"].default_value = (1.0, 1.0, 1.0, 1.0)
    bg.inputs["Strength"].default_value = s.ambient if s.lighting != "ambient" else max(s.ambient, 1.0)
    scene.world = world
    if s.lighting == "ambient":
        return
    # Lights are fixed in the world (not per camera) so shading is consistent across views.
    if s.lighting == "sun":
        rigs = [("key", (0.6, 0.3, 0.0), 3.0)]
    else:
        rigs = [("key", (0.8, 0.0, 0.6), 3.0), ("fill", (1.0, 0.0, -2.0), 1.2), ("rim", (-0.5, 0.0, 2.6), 1.5)]
    for name, (pitch, roll, yaw), strength in rigs:
        data = bpy.data.lights.new(f"light_{name}", "SUN")
        data.energy = strength * s.light_strength
        data.angle = math.radians(10)
        obj = bpy.data.objects.new(f"light_{name}", data)
        obj.rotation_euler = (pitch, roll, yaw)
        scene.collection.objects.link(obj)


def setup_cameras(rig: CircleRig, s: RenderSettings) -> list:
    """Create one camera per view; with multiview they render together from one scene sync."""
    scene = bpy.context.scene
    cams = []
    for v, c2w in enumerate(blender_c2w(rig)):
        data = bpy.data.cameras.new(f"cam_v{v:02d}")
        # VERTICAL: ``angle`` is the frame height's field of view whatever the aspect ratio, which is what
        # cameras.intrinsics assumes (AUTO would give it to the larger side, the width of a landscape frame).
        data.sensor_fit = "VERTICAL"
        data.angle = math.radians(rig.fov_deg)
        data.clip_start = max(0.01, rig.distance - 2.0)
        data.clip_end = rig.distance + 2.0
        obj = bpy.data.objects.new(f"Cam_v{v:02d}", data)
        obj.matrix_world = mathutils.Matrix(c2w.tolist())
        scene.collection.objects.link(obj)
        cams.append(obj)
    scene.camera = cams[0]
    r = scene.render
    r.use_multiview = s.multiview
    if s.multiview:
        r.views_format = "MULTIVIEW"
        for view in list(r.views):
            if view.name in ("left", "right"):
                view.use = False
        for v in range(len(cams)):
            view = r.views.new(f"v{v:02d}")
            view.camera_suffix = f"_v{v:02d}"
            view.use = True
        r.image_settings.views_format = "INDIVIDUAL"
    return cams


def configure_engine(s: RenderSettings) -> None:
    scene = bpy.context.scene
    r = scene.render
    r.resolution_x, r.resolution_y = s.width, s.height
    r.pixel_aspect_x = r.pixel_aspect_y = 1.0  # square pixels: K has fx == fy
    r.resolution_percentage = 100
    r.film_transparent = True
    r.use_persistent_data = s.persistent_data
    r.image_settings.file_format = "PNG"
    r.image_settings.color_mode = "RGBA"
    r.image_settings.color_depth = "8"
    r.image_settings.compression = s.png_compression
    scene.view_settings.view_transform = "Standard"
    if s.threads > 0:
        r.threads_mode = "FIXED"
        r.threads = max(s.threads, MIN_THREADS)  # one thread would keep a second core spinning (settings.py)
    if s.engine == "eevee":
        r.engine = "BLENDER_EEVEE"
        scene.eevee.taa_render_samples = s.samples
        return
    r.engine = "CYCLES"
    c = scene.cycles
    c.samples = s.samples
    c.use_adaptive_sampling = False
    c.use_denoising = s.denoise
    c.denoiser = "OPENIMAGEDENOISE"
    c.denoising_quality = s.denoise_quality
    c.denoising_prefilter = s.denoise_prefilter
    c.denoising_use_gpu = s.engine == "cycles-gpu"
    # Object renders on a transparent background: caustics and the light tree (built for
    # scenes with many lights) cost path-tracing time without visible benefit here.
    c.max_bounces = 4
    c.caustics_reflective = False
    c.caustics_refractive = False
    c.use_light_tree = False
    c.use_auto_tile = False
    # Path guiding is off by default in Blender 5.0; set here so that another default cannot change every
    # render's cost and look (it learns over many samples; 16 are few).
    c.use_guiding = False
    if s.engine == "cycles-gpu":
        prefs = bpy.context.preferences.addons["cycles"].preferences
        for backend in ("OPTIX", "CUDA", "HIP", "METAL", "ONEAPI"):
            try:
                prefs.compute_device_type = backend
            except TypeError:
                continue
            prefs.get_devices()
            gpus = [d for d in prefs.devices if d.type != "CPU"]
            if gpus:
                for d in prefs.devices:
                    d.use = d.type != "CPU"
                c.device = "GPU"
                return
        raise SceneError("render", "engine cycles-gpu asked for a GPU but Cycles found none; use --engine cycles")
    c.device = "CPU"


def _emission_override(name: str, build) -> Any:
    """A material that emits a geometric quantity (set as the view layer's material override)."""
    mat = bpy.data.materials.get(name)
    if mat is not None:
        return mat
    mat = bpy.data.materials.new(name)
    mat.use_nodes = True
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    nodes.clear()
    emit = nodes.new("ShaderNodeEmission")
    out = nodes.new("ShaderNodeOutputMaterial")
    links.new(emit.outputs["Emission"], out.inputs["Surface"])
    build(nodes, links, emit.inputs["Color"])
    return mat


def depth_material(max_depth: float):
    """Emits camera-space z / max_depth, so a 16-bit PNG step is max_depth / 65535 scene units."""
    def build(nodes, links, color):
        cam = nodes.new("ShaderNodeCameraData")
        div = nodes.new("ShaderNodeMath")
        div.operation = "DIVIDE"
        div.inputs[1].default_value = max_depth
        links.new(cam.outputs["View Z Depth"], div.inputs[0])
        links.new(div.outputs[0], color)
    mat = _emission_override(f"__depth_{max_depth:.6f}", build)
    return mat


def normal_material():
    """Emits the world-space shading normal as (n + 1) / 2."""
    def build(nodes, links, color):
        geo = nodes.new("ShaderNodeNewGeometry")
        add = nodes.new("ShaderNodeVectorMath")
        add.operation = "MULTIPLY_ADD"
        add.inputs[1].default_value = (0.5, 0.5, 0.5)
        add.inputs[2].default_value = (0.5, 0.5, 0.5)
        links.new(geo.outputs["Normal"], add.inputs[0])
        links.new(add.outputs["Vector"], color)
    return _emission_override("__normal", build)


class AuxPass:
    """Switch the scene to render a data pass (depth or normal) with exact values, then back.

    One sample, no denoising, box filter, raw colour management and no dithering,
    so the PNG holds the emitted value of the surface under each pixel centre.
    """

    def __init__(self, material, color_mode: str, color_depth: str) -> None:
        self.material, self.color_mode, self.color_depth = material, color_mode, color_depth

    def __enter__(self) -> "AuxPass":
        scene = bpy.context.scene
        r, c, img = scene.render, scene.cycles, scene.render.image_settings
        self.saved = (r.engine, c.samples, c.use_denoising, c.pixel_filter_type, c.filter_width,
                      scene.view_settings.view_transform, scene.view_settings.look, r.dither_intensity,
                      img.color_mode, img.color_depth, r.film_transparent)
        r.engine = "CYCLES"
        c.samples = 1
        c.use_denoising = False
        c.pixel_filter_type = "BOX"
        c.filter_width = 0.01
        scene.view_settings.view_transform = "Raw"
        scene.view_settings.look = "None"
        r.dither_intensity = 0.0
        img.color_mode, img.color_depth = self.color_mode, self.color_depth
        r.film_transparent = True
        bpy.context.view_layer.material_override = self.material
        return self

    def __exit__(self, *exc) -> None:
        scene = bpy.context.scene
        r, c, img = scene.render, scene.cycles, scene.render.image_settings
        (r.engine, c.samples, c.use_denoising, c.pixel_filter_type, c.filter_width,
         scene.view_settings.view_transform, scene.view_settings.look, r.dither_intensity,
         img.color_mode, img.color_depth, r.film_transparent) = self.saved
        bpy.context.view_layer.material_override = None
