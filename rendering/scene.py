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

from rendering.cameras import CircleRig, blender_c2w
from rendering.errors import StageError
from rendering.settings import RenderSettings

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


def world_bbox(frames: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned bounds of all evaluated geometry (modifiers, skinning, shape keys) over ``frames``."""
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    for frame in frames:
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
    if not np.all(np.isfinite(lo)) or not np.all(np.isfinite(hi)):
        raise SceneError("normalize", "could not measure the asset's bounds (no vertices in any sampled frame)")
    return lo, hi


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
        r.threads = s.threads
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
