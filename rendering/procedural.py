"""Procedural animated assets for the demo and the tests, exported to GLB through Blender.

Three kinds cover the animation types Objaverse assets carry:

* ``rigid``: a few parts with materials whose object transforms are keyframed;
* ``skinned``: a segmented tube deformed by an armature (vertex-group skinning);
* ``shapekey``: a mesh whose shape-key (morph target) weights are keyframed.

Each asset holds several named actions, so it exercises "one sample per action".
Everything is seeded, so the same (kind, seed) always gives the same GLB.

Four more kinds (``FLAWED_KINDS``) are built to render badly, one way each, so the render job's filters can
be tested on real renders; they are asked for by name, never part of the cycle ``kind_for`` draws from:

* ``idle``: a ball and its head, an action moving the head by a hair (a thousandth of its size): nothing
  visible changes;
* ``flicker``: a ball torn apart on every other animation frame, its vertices thrown up to 4 radii away
  (what a broken rig looks like);
* ``vanish``: the object shrinks to a speck in the middle of the action, then comes back;
* ``pole``: a thin upright pole bobbing up and down. Normalization fits the action's bounding box into a unit
  sphere, so nothing leaves the frame at the automatic camera distance; the pole's top, though, sits on that
  sphere straight above the centre, which is where the frame's top edge meets it at the closest distance the
  job accepts when the camera's elevation is half the field of view (the defaults: 20 and 40 degrees).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

KINDS = ("rigid", "skinned", "shapekey")
FLAWED_KINDS = ("idle", "flicker", "vanish", "pole")
"""Kinds that render badly on purpose (see the module's doc); built only when asked for by name."""
ALL_KINDS = KINDS + FLAWED_KINDS
# Bumped whenever the generators change, so cached GLBs of an older generator are not reused.
VERSION = 2


def _bpy():
    import bpy  # imported lazily: only a Blender process (the worker, an asset builder) loads Blender
    return bpy


def _material(name: str, rng: random.Random | None = None, *,
              color: tuple[float, float, float, float] | None = None, roughness: float | None = None):
    """A Principled BSDF material called ``name``: base colour and roughness drawn from ``rng``, else
    ``color`` and ``roughness`` where given (Blender's defaults where not: a caller that links textures)."""
    bpy = _bpy()
    mat = bpy.data.materials.new(name)
    if mat.node_tree is None:  # Blender < 5 makes node-less materials
        mat.use_nodes = True
    bsdf = mat.node_tree.nodes.get("Principled BSDF")
    if rng is not None:
        color = (rng.uniform(0.1, 1), rng.uniform(0.1, 1), rng.uniform(0.1, 1), 1.0)
        roughness = rng.uniform(0.2, 0.8)
    if color is not None:
        bsdf.inputs["Base Color"].default_value = color
    if roughness is not None:
        bsdf.inputs["Roughness"].default_value = roughness
    return mat


def _armature(bones: list[tuple[str, tuple, tuple, str | None]], name: str = "rig", connect: bool = False):
    """An armature object (and its data) called ``name``, linked to the active collection, with ``bones``:
    (name, head, tail, parent's name or None), parents before their children. ``connect`` joins each child's
    head to its parent's tail."""
    bpy = _bpy()
    data = bpy.data.armatures.new(name)
    rig = bpy.data.objects.new(name, data)
    bpy.context.collection.objects.link(rig)
    bpy.context.view_layer.objects.active = rig
    bpy.ops.object.mode_set(mode="EDIT")
    made = {}
    for bone, head, tail, parent in bones:
        b = data.edit_bones.new(bone)
        b.head, b.tail = head, tail
        b.roll = 0.0
        if parent is not None:
            b.parent = made[parent]
            b.use_connect = connect
        made[bone] = b
    bpy.ops.object.mode_set(mode="OBJECT")
    return rig


def _bind(obj, rig) -> None:
    """Deform ``obj`` by ``rig`` through its vertex groups (named after the bones): the skinning glTF exports."""
    obj.parent = rig
    mod = obj.modifiers.new("Armature", "ARMATURE")
    mod.object = rig


def _start_action(id_block, name: str):
    """Give ``id_block`` a fresh action called ``name``; keyframes inserted next go into it."""
    bpy = _bpy()
    if id_block.animation_data is None:
        id_block.animation_data_create()
    action = bpy.data.actions.new(name)
    action.use_fake_user = True
    id_block.animation_data.action = action
    return action


def _stash(id_block) -> None:
    """Move the active action into its own muted NLA track, so the glTF exporter sees every action."""
    ad = id_block.animation_data
    action = ad.action
    track = ad.nla_tracks.new()
    track.name = action.name
    track.strips.new(action.name, int(action.frame_range[0]), action)
    track.mute = True
    ad.action = None


def _body_and_head(rng: random.Random, round_body: bool = False):
    """A unit cube body (an ico sphere with ``round_body``) with a sphere head parented to it, each with its
    own drawn material (body's first): the rigid, idle and vanish kinds' figure. Returns (body, head)."""
    bpy = _bpy()
    if round_body:
        bpy.ops.mesh.primitive_ico_sphere_add(subdivisions=3, radius=0.5)
    else:
        bpy.ops.mesh.primitive_cube_add(size=1.0)
    body = bpy.context.object
    body.name = "body"
    body.data.materials.append(_material("body_mat", rng))
    bpy.ops.mesh.primitive_uv_sphere_add(radius=0.35, location=(0, 0, 0.8), segments=16, ring_count=8)
    head = bpy.context.object
    head.name = "head"
    head.data.materials.append(_material("head_mat", rng))
    head.parent = body
    return body, head


def _rigid(rng: random.Random, n_actions: int, frames: int) -> None:
    body, head = _body_and_head(rng)
    motions = ["spin", "hop", "sway", "slide"]
    for a in range(n_actions):
        name = motions[a % len(motions)] + (f"_{a}" if a >= len(motions) else "")
        action = _start_action(body, name)
        # The head moves in the same action (a second slot): one glTF animation over two nodes,
        # as most multi-part Objaverse animations are.
        if head.animation_data is None:
            head.animation_data_create()
        head.animation_data.action = action
        amp = rng.uniform(0.5, 1.5)
        for f in range(0, frames + 1, max(1, frames // 4)):
            ph = 2 * math.pi * f / frames
            body.location = (0, 0, 0)
            body.rotation_euler = (0, 0, 0)
            if name.startswith("spin"):
                body.rotation_euler = (0, 0, ph)
            elif name.startswith("hop"):
                body.location = (0, 0, amp * abs(math.sin(ph)))
            elif name.startswith("sway"):
                body.rotation_euler = (0.4 * math.sin(ph), 0, 0)
            else:
                body.location = (amp * math.sin(ph), 0, 0)
            body.keyframe_insert("location", frame=f + 1)
            body.keyframe_insert("rotation_euler", frame=f + 1)
            head.location = (0, 0, 0.8 + 0.15 * math.sin(2 * ph))
            head.keyframe_insert("location", frame=f + 1)
        _stash(body)
        _stash(head)


def _skinned(rng: random.Random, n_actions: int, frames: int) -> None:
    bpy = _bpy()
    n_bones = 3
    bpy.ops.mesh.primitive_cylinder_add(vertices=12, radius=0.25, depth=3.0, location=(0, 0, 1.5))
    tube = bpy.context.object
    tube.name = "tube"
    tube.data.materials.append(_material("tube_mat", rng))
    # Loop cuts so the tube can bend between bones.
    bpy.ops.object.mode_set(mode="EDIT")
    bpy.ops.mesh.select_all(action="SELECT")
    bpy.ops.mesh.subdivide(number_cuts=8)
    bpy.ops.object.mode_set(mode="OBJECT")
    bpy.ops.object.transform_apply(location=True, rotation=False, scale=False)

    rig = _armature([(f"bone{i}", (0, 0, i * 1.0), (0, 0, (i + 1) * 1.0), f"bone{i - 1}" if i else None)
                     for i in range(n_bones)], connect=True)

    # Linear blend weights along the tube's height.
    groups = [tube.vertex_groups.new(name=f"bone{i}") for i in range(n_bones)]
    for v in tube.data.vertices:
        z = v.co.z
        for i, g in enumerate(groups):
            w = max(0.0, 1.0 - abs(z - (i + 0.5)) / 1.0)
            if w > 0:
                g.add([v.index], w, "REPLACE")
    _bind(tube, rig)

    motions = ["wave", "bend", "twist"]
    for a in range(n_actions):
        name = motions[a % len(motions)] + (f"_{a}" if a >= len(motions) else "")
        _start_action(rig, name)
        amp = rng.uniform(0.3, 0.7)
        for f in range(0, frames + 1, max(1, frames // 4)):
            ph = 2 * math.pi * f / frames
            for i, pb in enumerate(rig.pose.bones):
                pb.rotation_mode = "XYZ"
                if name.startswith("wave"):
                    pb.rotation_euler = (amp * math.sin(ph + i), 0, 0)
                elif name.startswith("bend"):
                    pb.rotation_euler = (0, 0, amp * math.sin(ph))
                else:
                    pb.rotation_euler = (0, amp * math.sin(ph) * 0.5, amp * math.sin(ph) * 2)
                pb.keyframe_insert("rotation_euler", frame=f + 1)
        _stash(rig)


def _blob(rng: random.Random, subdivisions: int):
    """A unit ico-sphere named "blob" with a random material and a Basis shape key (shape-key kinds build on it)."""
    bpy = _bpy()
    bpy.ops.mesh.primitive_ico_sphere_add(subdivisions=subdivisions, radius=1.0)
    blob = bpy.context.object
    blob.name = "blob"
    blob.data.materials.append(_material("blob_mat", rng))
    blob.shape_key_add(name="Basis")
    return blob


def _shapekey(rng: random.Random, n_actions: int, frames: int) -> None:
    blob = _blob(rng, subdivisions=3)
    shapes = ["stretch", "squash", "bulge"]
    for s in shapes:
        key = blob.shape_key_add(name=s)
        for i, v in enumerate(blob.data.vertices):
            x, y, z = v.co
            if s == "stretch":
                key.data[i].co = (x * 0.7, y * 0.7, z * 1.8)
            elif s == "squash":
                key.data[i].co = (x * 1.5, y * 1.5, z * 0.5)
            else:
                k = 1.0 + 0.6 * max(0.0, x)
                key.data[i].co = (x * k, y * k, z * k)
    key_block = blob.data.shape_keys
    for a in range(n_actions):
        target = shapes[a % len(shapes)]
        name = f"morph_{target}" + (f"_{a}" if a >= len(shapes) else "")
        _start_action(key_block, name)
        for f in range(0, frames + 1, max(1, frames // 4)):
            ph = 2 * math.pi * f / frames
            for s in shapes:
                kb = key_block.key_blocks[s]
                kb.value = 0.5 - 0.5 * math.cos(ph) if s == target else 0.0
                kb.keyframe_insert("value", frame=f + 1)
        _stash(key_block)


def _action_name(base: str, a: int) -> str:
    return base if a == 0 else f"{base}_{a}"


def _idle(rng: random.Random, n_actions: int, frames: int) -> None:
    # Round, so no corner reaches the unit sphere normalization fits into view: it stays clear of the frame's
    # edge even at the closest camera distance (where the pole kind reaches it).
    body, head = _body_and_head(rng, round_body=True)
    for a in range(n_actions):
        _start_action(head, _action_name("idle", a))
        for f in range(0, frames + 1, max(1, frames // 4)):
            # A thousandth of the head's size: keyframed motion (so the exporter keeps the animation) that
            # moves no pixel, as the "animated" assets whose animation holds one pose.
            head.location = (0, 0, 0.8 + 0.0007 * math.sin(2 * math.pi * f / frames))
            head.keyframe_insert("location", frame=f + 1)
        _stash(head)


def _flicker(rng: random.Random, n_actions: int, frames: int) -> None:
    blob = _blob(rng, subdivisions=2)
    # A torn mesh, as a broken rig gives: every vertex thrown up to 4 radii away.
    torn = blob.shape_key_add(name="torn")
    for i in range(len(blob.data.vertices)):
        torn.data[i].co = tuple(rng.uniform(-4.0, 4.0) for _ in range(3))
    keys = blob.data.shape_keys
    # Four times the other kinds' length: the job samples 8 fps from 24 fps actions, every third frame, and
    # squeezes that step to fit a short action (to 1.6 frames for 16 frames of 24), landing between frames
    # where whole and torn would blend. Long enough, every sampled time is a whole frame, torn and whole in turn.
    for a in range(n_actions):
        _start_action(keys, _action_name("flicker", a))
        for f in range(4 * frames + 1):  # whole and torn on alternate animation frames
            torn.value = float(f % 2)
            torn.keyframe_insert("value", frame=f + 1)
        _stash(keys)


def _vanish(rng: random.Random, n_actions: int, frames: int) -> None:
    body, head = _body_and_head(rng)
    # (share of the action, scale): full size, a speck from a fifth to past the half, full size again. At the
    # job's 8 fps over a 24-frame action the sampled times 6, 9 and 12 fall in the speck.
    profile = [(0.0, 1.0), (0.125, 1.0), (0.21, 0.002), (0.54, 0.002), (0.62, 1.0), (1.0, 1.0)]
    for a in range(n_actions):
        _start_action(body, _action_name("vanish", a))
        for share, scale in profile:
            f = round(share * frames)
            body.rotation_euler = (0, 0, 0.5 * math.pi * share)  # a slow turn: motion besides the shrinking
            body.scale = (scale,) * 3
            body.keyframe_insert("rotation_euler", frame=f + 1)
            body.keyframe_insert("scale", frame=f + 1)
        _stash(body)


def _pole(rng: random.Random, n_actions: int, frames: int) -> None:
    bpy = _bpy()
    bpy.ops.mesh.primitive_cube_add(size=1.0)
    pole = bpy.context.object
    pole.name = "pole"
    pole.scale = (0.15, 0.15, 2.0)
    bpy.ops.object.transform_apply(location=False, rotation=False, scale=True)
    pole.data.materials.append(_material("pole_mat", rng))
    for a in range(n_actions):
        _start_action(pole, _action_name("bob", a))
        for f in range(0, frames + 1, max(1, frames // 4)):
            pole.location = (0, 0, 0.25 * math.sin(2 * math.pi * f / frames))
            pole.keyframe_insert("location", frame=f + 1)
        _stash(pole)


BUILDERS = {"rigid": _rigid, "skinned": _skinned, "shapekey": _shapekey,
            "idle": _idle, "flicker": _flicker, "vanish": _vanish, "pole": _pole}


def build(kind: str, seed: int, n_actions: int = 2, frames: int = 24) -> None:
    """Build one animated asset into the (empty) current scene."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown procedural kind {kind!r}; choose one of {', '.join(ALL_KINDS)}")
    rng = random.Random(seed)
    BUILDERS[kind](rng, n_actions, frames)
    bpy = _bpy()
    bpy.context.scene.frame_start = 1
    bpy.context.scene.frame_end = frames + 1


def export_glb(kind: str, seed: int, path: str | Path, n_actions: int = 2, frames: int = 24) -> Path:
    """Build an asset in a fresh scene and export it (every action as its own animation) to ``path``."""
    _bpy().ops.wm.read_factory_settings(use_empty=True)
    build(kind, seed, n_actions, frames)
    return write_glb(path, export_morph=True)


def write_glb(path: str | Path, **options) -> Path:
    """Export the current scene to ``path`` as GLB, every action (each in its own NLA track, see ``_stash``) as
    its own animation, sampled at every frame; ``options``: further ``export_scene.gltf`` arguments.

    Written to a temporary name first and renamed, so that a reader never sees half a file.
    """
    bpy = _bpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.glb")
    bpy.ops.export_scene.gltf(filepath=str(tmp), export_format="GLB", export_animations=True,
                              export_animation_mode="ACTIONS", export_force_sampling=True, export_skins=True,
                              export_apply=False, **options)
    tmp.replace(path)
    return path


def kind_for(seed: int) -> str:
    """The kind of the procedural asset built from ``seed``.

    A function of the seed alone, so an asset id (which names the seed) means one
    asset under any job --seed; consecutive seeds cycle through the kinds, so any
    3 in a row cover all of them.
    """
    return KINDS[seed % len(KINDS)]


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Export procedural animated GLBs")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--actions", type=int, default=2)
    a = p.parse_args()
    for i in range(a.count):
        print(export_glb(kind_for(i), i, Path(a.out) / f"proc-{i:06d}.glb", a.actions))
