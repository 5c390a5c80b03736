"""Where a render call's time goes on one asset, in one warm Blender (issue 15, item 3; docs/performance.md).

    flock /tmp/heavy.lock .venv/bin/python benchmarks/measure_render_costs.py sizes ASSET.glb
    flock /tmp/heavy.lock .venv/bin/python benchmarks/measure_render_costs.py settings ASSET.glb \\
        '{"scrambling_auto": {"cycles.auto_scrambling_distance": true}}'
    .venv/bin/python benchmarks/measure_render_costs.py regions ASSET.glb [ASSET.glb ...]
    flock /tmp/heavy.lock .venv/bin/python benchmarks/measure_render_costs.py perview ASSET.glb --rounds 4
    flock /tmp/heavy.lock .venv/bin/python benchmarks/measure_render_costs.py profile ASSET.glb --seconds 30

The scene is the job's (rendering/scene.py: engine, lighting, 4 cameras with multiview, the render region of
the first action's 8 sampled frames), at 256x256, 16 samples with OpenImageDenoise, 2 threads.

* ``sizes``: a square border of 16 to 256 pixels at the frame's centre, each rendered with and without the
  denoiser (best of 3): the denoiser's cost per view by image size, and the tracing cost of the same pixels.
* ``settings``: the job's settings ("base") and each named set of Cycles/scene property overrides, alternated
  over ``--rounds`` rounds; each renders 3 of the 8 time steps in their render regions (ms a frame = per view
  image, best and median round). A property path may index a collection: ``view_layers[0].cycles.x``.
* ``regions``: no rendering. For every action the job renders (up to 4 per asset) and every time step, the share
  of the frame that the render region covers in three ways: the union of the views' boxes (what the job
  renders: multiview gives all views of a call one border), one border size for all views (the widest box's
  width by the tallest box's height: the most that moving each view's box onto a common border with a shifted
  camera could reach, since multiview views share the border's size), and each view's own box (reachable only
  with one render call, and so one scene sync, per view). Then the cost of moving a view's pixels back after
  a shifted camera: decoding one PNG the job wrote, moving it and encoding it again.
* ``perview``: the first action's 8 time steps three ways, alternated over ``--rounds`` rounds: the job's one
  multiview call per time step in the union of the views' boxes; one call per view in that view's own box over
  *static snapshots* of the evaluated meshes (made once per time step, the skinned originals hidden, so the
  later calls of a time step find nothing to re-evaluate or re-sync); and one call per view on the animated
  scene (every call re-evaluates the armature and re-syncs the meshes). First, without the denoiser, the
  snapshots' pixels against the animated scene's.
* ``profile``: ``perf record`` of this process while it renders the first action's time steps as the job does
  (after one untimed pass), then the share of CPU samples by library and for the largest functions.

Assets: benchmarks/bench_render_real.py builds them (its ``/tmp/bench_render_real_assets``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _scene(asset: str):
    """The job's scene for ``asset`` at 256x256 (rendering/render_asset.py's own set-up): the frames and render
    regions (None: whole frames) of the first action the job would render."""
    import bpy

    from rendering.render_asset import plan_frames, stage_scene
    from rendering.settings import RenderSettings
    s = RenderSettings(width=256, height=256, views=4, frames=8, threads=2)  # fps: the job's default
    staged = stage_scene(asset, s, start_azimuth_deg=0.0)
    render = bpy.context.scene.render
    plan = plan_frames(staged.actions[0], staged.rest, staged.rig, s, render.fps / render.fps_base)
    return plan.frames, plan.borders


def sizes(asset: str, out: str) -> None:
    import bpy

    import rendering.scene as S
    from rendering.render_asset import PhaseClock
    frames, _ = _scene(asset)
    S.set_frame(frames[0])
    scene = bpy.context.scene
    scene.render.filepath = str(Path(out) / "t.png")

    def best_trace(border, denoise: bool) -> float:
        scene.cycles.use_denoising = denoise
        S.set_border(border)
        best = float("inf")
        for _ in range(3):
            with PhaseClock() as clock:
                clock.render()
            best = min(best, clock.seconds["trace_denoise"])
        return best

    best_trace(None, True)  # warm
    for px in (16, 48, 96, 128, 160, 192, 224, 256):
        h = px / 512
        border = (0.5 - h, 0.5 + h, 0.5 - h, 0.5 + h) if px < 256 else None
        on, off = best_trace(border, True), best_trace(border, False)
        per_view = (on - off) / 4
        print(f"{px:4d}px square: trace+denoise {on * 1000:6.1f} ms, trace {off * 1000:6.1f} ms (4 views); denoise "
              f"{per_view * 1000:6.2f} ms a view, {per_view / px ** 2 * 1e6:.3f} us a pixel", flush=True)


def settings(asset: str, variants: dict, rounds: int, out: str) -> None:
    import bpy

    import rendering.scene as S
    frames, borders = _scene(asset)
    scene = bpy.context.scene
    scene.render.filepath = str(Path(out) / "t.png")

    def swap(path: str, value):
        obj = scene
        parts = path.split(".")
        for p in parts[:-1]:
            name, _, index = p.partition("[")
            obj = getattr(obj, name)
            if index:
                obj = obj[int(index.rstrip("]"))]
        old = getattr(obj, parts[-1])
        setattr(obj, parts[-1], value)
        return old

    def steps(ts: list[int]) -> float:
        total = 0.0
        for t in ts:
            S.set_frame(frames[t])
            S.set_border(borders[t] if borders else None)
            t0 = time.perf_counter()
            bpy.ops.render.render(write_still=True)
            total += time.perf_counter() - t0
        return total

    variants = {"base": {}, **variants}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        for name, overrides in variants.items():
            old = {k: swap(k, v) for k, v in overrides.items()}
            steps([0])  # a settings change resets Cycles' session: not timed
            times[name].append(steps([0, 3, 6]) / 12)
            for k, v in old.items():
                swap(k, v)
        print(f"round {r}: " + ", ".join(f"{k} {min(v) * 1000:.1f}" for k, v in times.items()), flush=True)
    print("ms a frame, best:  ", {k: round(min(v) * 1000, 1) for k, v in times.items()})
    print("ms a frame, median:", {k: round(sorted(v)[len(v) // 2] * 1000, 1) for k, v in times.items()})


def regions(assets: list[str], out: str) -> None:
    import bpy
    import numpy as np

    import rendering.scene as S
    from rendering.render_asset import plan_frames, stage_scene
    from rendering.settings import RenderSettings
    s = RenderSettings(width=256, height=256, views=4, frames=8, threads=2)  # max_actions: the job's default

    def area(b) -> float:  # None: the whole frame (the job renders it so when no box is safe)
        return 1.0 if b is None else (b[1] - b[0]) * (b[3] - b[2])

    def side(b, i: int) -> float:
        return 1.0 if b is None else b[2 * i + 1] - b[2 * i]
    rows = []
    for asset in assets:
        staged = stage_scene(asset, s, start_azimuth_deg=0.0)
        render = bpy.context.scene.render
        for action in staged.actions[: s.max_actions]:
            plan = plan_frames(action, staged.rest, staged.rig, s, render.fps / render.fps_base)
            # The borders of the job's own plan (its union per time step), and per view from the same vertices.
            points: list = []
            boxes = S.frame_bboxes(plan.frames, points)  # evaluated after normalization: world = normalized
            ident = {"center": [0.0, 0.0, 0.0], "scale": 1.0}
            per_view = S.render_borders(boxes, ident, staged.rig, s.width, s.height, points, per_view=True)
            unions = plan.borders
            if unions is None:  # a scene the region is not safe for: the job renders whole frames
                unions, per_view = [None] * len(plan.frames), [[None] * s.views] * len(plan.frames)
            for union, views in zip(unions, per_view):
                common = max(side(b, 0) for b in views) * max(side(b, 1) for b in views)
                rows.append((area(union), common, float(np.mean([area(b) for b in views]))))
            a = np.array(rows[-len(plan.frames):])
            print(f"{Path(asset).stem} {action.name}: union {a[:, 0].mean():.4f}, common size {a[:, 1].mean():.4f}, "
                  f"each view's own {a[:, 2].mean():.4f} of the frame", flush=True)
    a = np.array(rows)
    u, c, e = a.mean(0)
    print(f"all {len(rows)} time steps: union {u:.4f}, common size {c:.4f} ({c / u - 1:+.1%}), each view's own "
          f"{e:.4f} ({e / u - 1:+.1%})")
    # What moving a shifted camera's pixels back would cost: decode a view the job wrote, move it, encode it
    # again at the level Blender's compression 15 uses (zlib 1).
    import io

    from PIL import Image
    S.set_frame(plan.frames[0])
    S.set_border(plan.borders[0] if plan.borders else None)
    bpy.context.scene.render.filepath = str(Path(out) / "t.png")
    bpy.ops.render.render(write_still=True)
    png = (Path(out) / "t_v00.png").read_bytes()

    def move_back() -> bytes:
        img = np.roll(np.asarray(Image.open(io.BytesIO(png))), (3, 5), (0, 1))
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    for _ in range(5):
        move_back()
    t0 = time.perf_counter()
    for _ in range(100):
        move_back()
    print(f"decode, move and encode one view's PNG ({len(png)} bytes): {(time.perf_counter() - t0) * 10:.2f} ms")


def _views_and_snapshots(scene):
    """The job's cameras in view order, and a function that replaces static copies of the skinned meshes by
    their evaluated state now (the originals and armatures are hidden from renders while ``use`` is on)."""
    import bpy
    cams = sorted((o for o in scene.objects if o.type == "CAMERA"), key=lambda o: o.name)
    skinned = [o for o in scene.objects if o.type == "MESH" and any(m.type == "ARMATURE" for m in o.modifiers)]
    arms = [o for o in scene.objects if o.type == "ARMATURE"]
    snaps: dict = {}

    def snapshot() -> None:
        dg = bpy.context.evaluated_depsgraph_get()
        for o in skinned:
            ev = o.evaluated_get(dg)
            mesh = bpy.data.meshes.new_from_object(ev, preserve_all_data_layers=True, depsgraph=dg)
            snap = snaps.get(o.name)
            if snap is None:
                snap = snaps[o.name] = bpy.data.objects.new(o.name + "_snapshot", mesh)
                scene.collection.objects.link(snap)
            else:
                old, snap.data = snap.data, mesh
                bpy.data.meshes.remove(old)
            snap.matrix_world = ev.matrix_world.copy()

    def use(on: bool) -> None:
        for o in skinned + arms:
            o.hide_render = on
        for snap in snaps.values():
            snap.hide_render = not on
    return cams, snapshot, use


def perview(asset: str, rounds: int, out: str) -> None:
    import bpy
    import numpy as np
    from PIL import Image

    import rendering.scene as S
    from rendering.render_asset import plan_frames, stage_scene
    from rendering.settings import RenderSettings
    s = RenderSettings(width=256, height=256, views=4, frames=8, threads=2)
    staged = stage_scene(asset, s, start_azimuth_deg=0.0)
    scene = bpy.context.scene
    plan = plan_frames(staged.actions[0], staged.rest, staged.rig, s, scene.render.fps / scene.render.fps_base)
    if plan.borders is None:
        raise SystemExit(f"{asset}: the job renders this asset on whole frames (no render region to split)")
    frames, unions, points = plan.frames, plan.borders, []
    boxes = S.frame_bboxes(frames, points)  # after normalization: world coordinates are normalized ones
    ident = {"center": [0.0, 0.0, 0.0], "scale": 1.0}
    own = S.render_borders(boxes, ident, staged.rig, s.width, s.height, points, per_view=True)
    cams, snapshot, use = _views_and_snapshots(scene)

    def step(way: str, t: int, tag: str, border_of=None) -> None:
        S.set_frame(frames[t])
        scene.render.filepath = str(Path(out) / f"{tag}_t{t}.png")
        if way == "multiview":
            S.set_border(unions[t])
            bpy.ops.render.render(write_still=True)
            return
        if way == "snapshots":
            snapshot()
        for v, cam in enumerate(cams):
            scene.camera = cam
            S.set_border((border_of or own)[t][v])
            scene.render.filepath = str(Path(out) / f"{tag}_t{t}_v{v:02d}.png")
            bpy.ops.render.render(write_still=True)

    def switch(way: str) -> None:
        scene.render.use_multiview = way == "multiview"
        use(way == "snapshots")

    # Without the denoiser a render region gives the whole frame's pixels: compare whole frames.
    scene.cycles.use_denoising = False
    whole = [[None] * len(cams) for _ in frames]
    for way in ("animated", "snapshots"):
        switch(way)
        step(way, 2, f"same_{way}", whole)
    diff = max(int(np.abs(np.asarray(Image.open(Path(out) / f"same_animated_t2_v{v:02d}.png"), np.int16)
                          - np.asarray(Image.open(Path(out) / f"same_snapshots_t2_v{v:02d}.png"), np.int16)).max())
               for v in range(len(cams)))
    print(f"snapshots against the animated scene, no denoiser, whole frames: largest pixel difference {diff}")
    scene.cycles.use_denoising = True
    ways = ("multiview", "snapshots", "animated")
    times: dict[str, list[float]] = {w: [] for w in ways}
    for r in range(rounds):
        for way in ways if r % 2 == 0 else ways[::-1]:
            switch(way)
            step(way, len(frames) - 1, "warm")  # a switch resets Cycles' session: not timed
            t0 = time.perf_counter()
            for t in range(len(frames)):
                step(way, t, way)
            times[way].append((time.perf_counter() - t0) / (len(frames) * len(cams)))
        print(f"round {r}: " + ", ".join(f"{w} {v[-1] * 1000:.1f}" for w, v in times.items()), flush=True)
    area = np.mean([(b[1] - b[0]) * (b[3] - b[2]) for b in unions])
    own_area = np.mean([(b[1] - b[0]) * (b[3] - b[2]) for bs in own for b in bs])
    print(f"traced share of the frame: union {area:.4f}, each view's own {own_area:.4f} ({own_area / area - 1:+.1%})")
    print("ms a frame, best:  ", {k: round(min(v) * 1000, 1) for k, v in times.items()})
    print("ms a frame, median:", {k: round(sorted(v)[len(v) // 2] * 1000, 1) for k, v in times.items()})


# perf's view of a render: the libraries, and the two Cycles functions that every sample passes through
_PROFILE_GROUPS = (("camera rays (integrator_init_from_camera)", "integrator_init_from_camera"),
                   ("rays leaving the scene (integrator_shade_background)", "integrator_shade_background"))


_PROFILE_LIBRARIES = (("__init__.so", "Blender and Cycles, the rest (shading, sampling, sync, image writes)"),
                      ("libembree", "Embree (ray intersection, BVH builds)"),
                      ("libOpenImageDenoise", "OpenImageDenoise"), ("[kernel", "Linux kernel"))


def profile(asset: str, seconds: float, out: str, top: int = 15) -> None:
    import os
    import shutil
    import subprocess

    import bpy

    import rendering.scene as S
    if shutil.which("perf") is None:
        raise SystemExit("profile needs Linux perf on PATH (apt install linux-perf)")
    frames, borders = _scene(asset)
    scene = bpy.context.scene
    scene.render.filepath = str(Path(out) / "t.png")

    def one_pass() -> None:
        for t, frame in enumerate(frames):
            S.set_frame(frame)
            S.set_border(borders[t] if borders else None)
            bpy.ops.render.render(write_still=True)
    one_pass()
    data = Path(out) / "perf.data"
    rec = subprocess.Popen(["perf", "record", "-F", "999", "-p", str(os.getpid()), "-o", str(data), "--",
                            "sleep", str(seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0, n = time.perf_counter(), 0
    while rec.poll() is None:
        one_pass()
        n += len(frames)
    wall = time.perf_counter() - t0
    err = rec.stderr.read()
    if rec.returncode != 0 or not data.exists():
        raise SystemExit(f"perf record failed ({rec.returncode}): {err.strip()[-500:]} (perf_event_paranoid: "
                         f"{Path('/proc/sys/kernel/perf_event_paranoid').read_text().strip()}; 2 or lower lets "
                         "a user profile their own processes)")
    rep = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,symbol", "-g", "none",
                          "--stdio", "--percent-limit", "0"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in rep.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].endswith("%") and parts[2].startswith("["):
            while parts[-1] == "-":  # perf's empty columns
                parts.pop()
            rows.append((float(parts[0][:-1]), parts[1], " ".join(parts[3:])))
    views = sum(v.use for v in scene.render.views)
    print(f"{asset}: {n} time steps of {views} views in {wall:.1f} s ({wall / (n * views) * 1000:.1f} ms a frame), "
          "share of perf's CPU samples:")
    by_dso: dict[str, float] = {}
    grouped = {name: 0.0 for name, _ in _PROFILE_GROUPS}
    for pct, dso, sym in rows:
        for name, key in _PROFILE_GROUPS:
            if key in sym:
                grouped[name] += pct
                break
        else:
            label = next((name for prefix, name in _PROFILE_LIBRARIES if dso.startswith(prefix)), dso)
            by_dso[label] = by_dso.get(label, 0.0) + pct
    for name, pct in sorted({**grouped, **by_dso}.items(), key=lambda kv: -kv[1]):
        if pct >= 0.5:
            print(f"  {pct:5.1f}%  {name}")
    print("largest functions:")
    for pct, dso, sym in sorted(rows, reverse=True)[:top]:
        print(f"  {pct:5.1f}%  {sym[:90]}  ({dso})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("sizes", "settings", "regions", "perview", "profile"))
    ap.add_argument("asset", help="a GLB (e.g. /tmp/bench_render_real_assets/char-medium-1-v1.glb)")
    ap.add_argument("rest", nargs="*", help="settings: JSON {name: {property path: value}}; regions: more GLBs")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=30.0, help="profile: how long perf records")
    ap.add_argument("--scratch", default="/tmp/measure_render_costs")
    args = ap.parse_args()
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    if args.mode == "sizes":
        sizes(args.asset, args.scratch)
    elif args.mode == "regions":
        regions([args.asset, *args.rest], args.scratch)
    elif args.mode == "perview":
        perview(args.asset, args.rounds, args.scratch)
    elif args.mode == "profile":
        profile(args.asset, args.seconds, args.scratch)
    else:
        if len(args.rest) > 1:
            ap.error("settings takes one JSON of variants (quote it)")
        settings(args.asset, json.loads(args.rest[0] if args.rest else "{}"), args.rounds, args.scratch)


if __name__ == "__main__":
    main()
