"""Which arc should the render rig span? Per-view image motion of the rig vs the pseudo-4D camera.

    .venv/bin/python benchmarks/measure_render_arc.py             # camera math only, ~3 s
    .venv/bin/python benchmarks/measure_render_arc.py --assets 6  # + procedural assets in Blender, ~30 s

Prints, for 8 views on arcs of 360 ... 45 degrees at the render job's default
frame (144 x 256, vertical fov 40, elevation 20), the mean displacement of
visible content between neighbouring views as a fraction of the frame width
(pipelines/view_step.py), next to the same figure for the pseudo-4D camera
family the model is trained on first (pipelines/affine.py, default maxima,
2000 paths as the pseudo-4D job draws them). The default arc is the widest
whose step lies inside the pseudo-4D band; docs/rendering.md records the run.

With --assets N, the first N procedural assets (rendering/procedural.py) are
built in Blender, normalised and sampled exactly as the render job does
(16 frames at 8 fps, squeezed to the action), and their vertices (all of them,
hidden ones too) give the same per-view figure on real geometry plus the
frame-to-frame motion along time, seen from the 8 cameras of a full circle.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rendering.cameras import CircleRig, blender_c2w, fit_distance, intrinsics, opencv_w2c, project  # noqa: E402
from pipelines.view_step import (ARC_CANDIDATES, PSEUDO4D_QUANTILES, choose_arc, pseudo4d_steps,  # noqa: E402
                                 rig_step, rig_steps)

VIEWS, HEIGHT, WIDTH, FOV, ELEVATION, FRAMES, FPS = 8, 144, 256, 40.0, 20.0, 16, 8.0


@contextlib.contextmanager
def _quiet():
    """Blender and its glTF add-on print to the process's fds: send them to /dev/null while it works."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)


def _vertices(frame: float) -> np.ndarray:
    """World positions of every evaluated vertex at ``frame`` (same order at every frame)."""
    import bpy

    from rendering import scene as S
    S.set_frame(frame)
    depsgraph = bpy.context.evaluated_depsgraph_get()
    out = []
    for obj in S.geometry_objects():
        ev = obj.evaluated_get(depsgraph)
        mesh = ev.to_mesh()
        pts = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
        mesh.vertices.foreach_get("co", pts)
        ev.to_mesh_clear()
        mw = np.array(ev.matrix_world)
        out.append(pts.reshape(-1, 3).astype(np.float64) @ mw[:3, :3].T + mw[:3, 3])
    return np.concatenate(out)


def asset_steps(count: int) -> list[dict]:
    """Per action of the first ``count`` procedural assets: view steps per arc and the time step."""
    import bpy

    from rendering import scene as S
    from rendering.procedural import export_glb, kind_for
    distance = fit_distance(FOV, WIDTH, HEIGHT)
    K = intrinsics(FOV, WIDTH, HEIGHT)
    # Time steps are seen from every camera of the full circle, so no side of an asset is favoured.
    w2cs = [opencv_w2c(c) for c in blender_c2w(CircleRig(VIEWS, ELEVATION, distance, FOV, 0.0, 360.0))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        for seed in range(count):
            kind = kind_for(seed)
            glb = export_glb(kind, seed, Path(tmp) / f"proc-{seed:06d}.glb")
            S.reset()
            S.import_asset(str(glb))
            rest = S.RestPose()
            scene = bpy.context.scene
            scene_fps = scene.render.fps / scene.render.fps_base
            for action in S.list_actions():
                start, end, _ = S.apply_action(action, rest)
                frames = S.sample_frames(start, end, FRAMES, scene_fps, FPS)
                S.clear_normalization()
                S.normalize(*S.world_bbox(frames))
                pts = [_vertices(f) for f in frames]
                view = {arc: float(np.mean([rig_steps(CircleRig(VIEWS, ELEVATION, distance, FOV, 0.0, arc),
                                                      WIDTH, HEIGHT, p).mean() for p in pts]))
                        for arc in ARC_CANDIDATES}
                # Time: the same vertex in consecutive frames, through one fixed camera.
                time = []
                for w2c in w2cs:
                    uv = [project(K, w2c, p) for p in pts]
                    time.append(np.mean([np.linalg.norm(uv[t + 1] - uv[t], axis=1).mean()
                                         for t in range(len(pts) - 1)]) / WIDTH)
                rows.append({"asset": f"proc-{seed:06d}", "kind": kind, "action": action.name,
                             "view": view, "time": float(np.mean(time))})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--assets", type=int, default=0, help="also measure the first N procedural assets in Blender")
    p.add_argument("--json", default="", help="write the figures to this JSON file too")
    args = p.parse_args(argv)

    p4d = pseudo4d_steps(VIEWS, WIDTH, HEIGHT)
    lo, hi = (float(q) for q in np.quantile(p4d, PSEUDO4D_QUANTILES))
    sphere = {arc: rig_step(arc, VIEWS, ELEVATION, FOV, WIDTH, HEIGHT, "sphere") for arc in ARC_CANDIDATES}
    box = {arc: rig_step(arc, VIEWS, ELEVATION, FOV, WIDTH, HEIGHT, "box") for arc in ARC_CANDIDATES}
    rows = asset_steps(args.assets) if args.assets else []
    assets = {arc: float(np.mean([r["view"][arc] for r in rows])) for arc in ARC_CANDIDATES} if rows else {}

    print(f"per-view step, fraction of frame width ({VIEWS} views, {HEIGHT}x{WIDTH}, vertical fov {FOV:g}, "
          f"elevation {ELEVATION:g})")
    print(f"pseudo-4D family (2000 paths): mean {p4d.mean():.4f}  median {np.median(p4d):.4f}  "
          f"band p{PSEUDO4D_QUANTILES[0] * 100:g}-p{PSEUDO4D_QUANTILES[1] * 100:g} [{lo:.4f}, {hi:.4f}]  "
          f"max {p4d.max():.4f}")
    head = f"{'arc':>5} {'deg/step':>8} {'box':>7} {'sphere':>7}" + (f" {'assets':>7}" if assets else "") + "  in band"
    print(head)
    for arc in ARC_CANDIDATES:
        step_deg = arc / VIEWS if arc >= 360 else arc / (VIEWS - 1)
        line = f"{arc:5.0f} {step_deg:8.2f} {box[arc]:7.4f} {sphere[arc]:7.4f}"
        if assets:
            line += f" {assets[arc]:7.4f}"
        print(line + f"  {'yes' if lo <= box[arc] <= hi else 'no'}")
    chosen = choose_arc(box, lo, hi)
    print(f"chosen arc (widest whose box step is in the band): {chosen:g} degrees")
    if rows:
        print(f"time direction (procedural assets, {FRAMES} frames at {FPS:g} fps, squeezed to the action): "
              f"mean {np.mean([r['time'] for r in rows]):.4f} of the width per frame")
        for r in rows:
            print(f"  {r['asset']} {r['kind']:9s} {r['action']:14s} time {r['time']:.4f}  "
                  f"view@{chosen:g} {r['view'][chosen]:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"pseudo4d": {"mean": float(p4d.mean()), "band": [lo, hi],
                                                            "max": float(p4d.max())},
                                               "box": box, "sphere": sphere, "assets": rows, "chosen": chosen},
                                              indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
