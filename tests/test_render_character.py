"""The character test asset (rendering/character.py) through the job's render path, with its per-phase times.

Real Blender: one build of the ``tiny`` variant (same structure as the benchmark's characters, fewer
triangles and 256 px textures), one render request to the job's warm Blender child, one Blender process for
the import-side checks and the render region's fallback.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rendering.render_asset import PHASES
from rendering.settings import MIN_THREADS, RenderSettings
from rendering.worker import BlenderWorker

ROOT = Path(__file__).resolve().parents[1]


def _build(out: Path, seed: int = 0) -> dict:
    proc = subprocess.run([sys.executable, "-m", "rendering.character", "--out", str(out), "--variant", "tiny",
                           "--seed", str(seed)], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def character(tmp_path_factory) -> dict:
    return _build(tmp_path_factory.mktemp("character"))


def _glb_json(path: str) -> dict:
    data = Path(path).read_bytes()
    magic, version, length = struct.unpack_from("<4sII", data)
    assert magic == b"glTF" and version == 2 and length == len(data)
    chunk_len, chunk_type = struct.unpack_from("<I4s", data, 12)
    assert chunk_type == b"JSON"
    return json.loads(data[20:20 + chunk_len])


def test_character_glb_is_skinned_textured_with_several_actions(character, tmp_path):
    g = _glb_json(character["path"])
    assert len(g["skins"]) == 1 and len(g["skins"][0]["joints"]) >= 20
    anims = {a["name"]: a for a in g["animations"]}
    assert sorted(anims) == ["idle", "walk", "wave"]
    assert len(set(character["actions"].values())) == 3, "actions should differ in length"
    meshes = g["meshes"]
    assert len(meshes) >= 4
    for mesh in meshes:
        for prim in mesh["primitives"]:
            assert {"POSITION", "NORMAL", "TEXCOORD_0", "JOINTS_0", "WEIGHTS_0"} <= set(prim["attributes"])
    skinned_nodes = [n for n in g["nodes"] if "mesh" in n]
    assert all("skin" in n for n in skinned_nodes)
    # Packed images (in the GLB's binary chunk), PBR materials with base colour, normal and metallic-roughness.
    assert len(g["images"]) == 9 and all("bufferView" in im for im in g["images"])
    assert {im["mimeType"] for im in g["images"]} == {"image/jpeg", "image/png"}
    textured = [m for m in g["materials"] if "normalTexture" in m
                and {"baseColorTexture", "metallicRoughnessTexture"} <= set(m["pbrMetallicRoughness"])]
    assert len(textured) == 3
    # Deterministic from the seed; another seed is another asset.
    again = _build(tmp_path / "again")
    assert Path(again["path"]).read_bytes() == Path(character["path"]).read_bytes()
    other = _build(tmp_path / "other", seed=1)
    assert Path(other["path"]).read_bytes() != Path(character["path"]).read_bytes()


def test_character_renders_through_the_job_path_with_phase_times(character, tmp_path):
    settings = RenderSettings(views=2, frames=2, height=64, width=64, samples=4, denoise=True, max_actions=4)
    worker = BlenderWorker(log_dir=str(tmp_path))
    try:
        result = worker.call({"op": "render", "path": character["path"], "uid": "char", "source": "local",
                              "settings": settings.to_dict()}, timeout=300)
    finally:
        worker.close()
    assert [s["action"] for s in result["samples"]] == ["idle", "walk", "wave"]
    for sample in result["samples"]:
        meta = sample["meta"]
        sec = meta["seconds"]
        assert sec["import"] > 0 and sec["normalize"] > 0
        phases = sec["phases"]
        assert set(PHASES) <= set(phases) and all(phases[k] > 0 for k in PHASES), phases
        assert "other" not in phases, "every render call should split on Cycles' status lines"
        # The phases are the grid's wall time, cut into pieces: they add up to it.
        assert abs(sum(phases.values()) - sec["render"]) <= 0.05 * sec["render"] + 0.02, sec
        assert 0.0 < meta["render"]["region"] < 1.0 and meta["render"]["region_retries"] == 0
        pngs = [k for k in sample["files"] if k.endswith(".png")]
        assert len(pngs) == 4
        for name in pngs:
            alpha = np.asarray(Image.open(io.BytesIO(sample["files"][name])).getchannel("A"))
            assert alpha.shape == (64, 64) and alpha.max() == 255


SCRIPT = r"""
import io, json, sys
import numpy as np
import bpy
from PIL import Image
from rendering import scene as S
from rendering.render_asset import render_asset
from rendering.settings import MIN_THREADS, RenderSettings

path = sys.argv[1]
S.reset()
S.import_asset(path)
out = {"actions": [a.name for a in S.list_actions()],
       "skinned": sorted(o.name for o in S.geometry_objects() if any(m.type == "ARMATURE" and m.object for m in o.modifiers)),
       "bones": max(len(o.data.bones) for o in bpy.data.objects if o.type == "ARMATURE"),
       "images": sorted(i.name for i in bpy.data.images if i.packed_file is not None and i.size[0] > 0),
       "triangles": 0}
for o in S.geometry_objects():
    o.data.calc_loop_triangles()
    out["triangles"] += len(o.data.loop_triangles)

def grid(**kw):
    s = RenderSettings(views=2, frames=2, height=48, width=48, samples=2, denoise=False, max_actions=1, **kw)
    smp = render_asset(path, "char", "local", s)["samples"][0]
    return {k: np.asarray(Image.open(io.BytesIO(v))) for k, v in smp["files"].items()}, smp["meta"]["render"]

full, meta_full = grid(render_region=False)
region, meta_region = grid()
# A border that cuts the object (as geometry the bounding boxes miss would): each time step is rendered again.
real = S.render_borders
S.render_borders = lambda *a, **k: [(0.45, 0.55, 0.45, 0.55) for _ in real(*a, **k)]
cut, meta_cut = grid()
# A border that cuts the object on its right side only, whose edge falls at 24.96 pixels (Blender truncates
# to 24: the edge check must look at column 23, the last one rendered, not at a rounded 25th).
S.render_borders = lambda *a, **k: [(0.0, 0.52, 0.0, 1.0) for _ in real(*a, **k)]
right, meta_right = grid()
S.render_borders = real
# An object hidden in the viewport but not in renders is not in the boxes: no region is cut at all.
original = S.import_asset
def import_with_hidden(path):
    original(path)
    bpy.ops.mesh.primitive_cube_add(size=0.2, location=(3.0, 0.0, 0.0))
    bpy.context.active_object.hide_set(True)
S.import_asset = import_with_hidden
_, meta_hidden = grid()
S.import_asset = original
out["region"] = meta_region["region"]
out["full_region"] = meta_full["region"]
out["region_same"] = all(np.array_equal(full[k], region[k]) for k in full)
out["cut_retries"] = meta_cut["region_retries"]
out["cut_same"] = all(np.array_equal(full[k], cut[k]) for k in full)
out["right_retries"] = meta_right["region_retries"]
out["right_same"] = all(np.array_equal(full[k], right[k]) for k in full)
out["hidden_region"] = meta_hidden["region"]
print("RESULT " + json.dumps(out))
"""


def test_import_side_and_render_region(character):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, character["path"]], cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][7:])
    # The job's importer sees the GLB as Objaverse characters come: separate actions, skinned textured parts.
    assert out["actions"] == ["idle", "walk", "wave"]
    assert out["skinned"] == ["Body", "Gear", "Head", "Outfit"] and out["bones"] >= 20
    assert len(out["images"]) == 9
    assert out["triangles"] == character["triangles_total"]
    # Without denoising, rendering only the object's region gives the very same pixels as the whole frame;
    # a border that cuts the object is caught and the time step rendered again on the whole frame.
    assert out["full_region"] == 1.0 and 0.0 < out["region"] < 1.0
    assert out["region_same"]
    assert out["cut_retries"] == 2 and out["cut_same"]
    assert out["right_retries"] == 2 and out["right_same"]
    assert out["hidden_region"] == 1.0


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def test_one_cpu_actor_leaves_no_core_spinning(character, tmp_path):
    """An actor that reserves one CPU still gets two Cycles threads: with one, oneTBB kept a second thread
    spinning at 100% of a core for as long as the Blender session lived (persistent data), while rendering and
    while idle. The job's thread choice, then a real render with one thread asked, and the idle child's CPU."""
    from pipelines.common.config import ConfigError
    from pipelines.render_objaverse import RenderJobConfig
    cfg = RenderJobConfig(cpus_per_worker=1.0)
    assert cfg.blender_threads() == MIN_THREADS
    with pytest.raises(ConfigError, match="spinning"):
        RenderJobConfig(threads=1).validate()
    settings = RenderSettings(views=2, frames=2, height=48, width=48, samples=2, max_actions=1)
    assert settings.persistent_data
    # One thread asked of the worker directly: configure_engine still gives Cycles two.
    worker = BlenderWorker(threads=1, log_dir=str(tmp_path))
    try:
        worker.call({"op": "render", "path": character["path"], "uid": "char", "source": "local",
                     "settings": settings.to_dict()}, timeout=300)
        c0, t0 = _cpu_seconds(worker.proc.pid), time.monotonic()
        time.sleep(2.0)
        idle = (_cpu_seconds(worker.proc.pid) - c0) / (time.monotonic() - t0)
    finally:
        worker.close()
    assert idle < 0.3, f"the idle Blender child used {idle:.2f} cores"


def test_measure_render_costs_regions(character, tmp_path):
    """benchmarks/measure_render_costs.py regions (docs/performance.md, session 22): per action, the union of the
    views' boxes (the job's own plan) holds the common-size border, which holds each view's own box; then the
    cost of moving a rendered view back, on a real PNG the job's scene wrote."""
    import re
    proc = subprocess.run([sys.executable, "benchmarks/measure_render_costs.py", "regions", character["path"],
                           "--scratch", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = Path(character["path"]).stem
    rows = re.findall(rf"^{re.escape(stem)} (.+): union ([\d.]+), common size ([\d.]+), each view's own ([\d.]+) of",
                      proc.stdout, re.M)
    assert sorted(r[0] for r in rows) == sorted(character["actions"]), proc.stdout[-2000:]
    for _, union, common, each in rows:
        u, c, e = float(union), float(common), float(each)
        assert 0.0 < e <= c + 1e-4 and c <= u + 1e-4 and u <= 1.0, (u, c, e)
    # the views of a 60-degree arc see the figure differently: their own boxes are smaller than the union
    assert all(float(e) < float(u) - 1e-3 for _, u, _, e in rows), rows
    m = re.search(r"PNG \((\d+) bytes\): ([\d.]+) ms", proc.stdout)
    assert m and int(m.group(1)) > 1000 and float(m.group(2)) > 0.0, proc.stdout[-2000:]


def test_measure_render_costs_perview(character, tmp_path):
    """benchmarks/measure_render_costs.py perview (docs/performance.md, session 25): static snapshots of the skinned
    meshes render the animated scene's very pixels (no denoiser), each view's own box traces less of the frame
    than the union, and the three ways are timed."""
    import re
    proc = subprocess.run([sys.executable, "benchmarks/measure_render_costs.py", "perview", character["path"],
                           "--rounds", "1", "--scratch", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"largest pixel difference (\d+)", proc.stdout)
    assert m and int(m.group(1)) == 0, proc.stdout[-2000:]
    m = re.search(r"union ([\d.]+), each view's own ([\d.]+)", proc.stdout)
    assert m and 0.0 < float(m.group(2)) < float(m.group(1)) <= 1.0, proc.stdout[-2000:]
    best = re.search(r"ms a frame, best: +(\{.*\})", proc.stdout)
    assert best, proc.stdout[-2000:]
    times = __import__("ast").literal_eval(best.group(1))
    assert sorted(times) == ["animated", "multiview", "snapshots"] and all(v > 0 for v in times.values()), times
    # every way wrote its 4 views of the 8 time steps (the multiview call names its views itself)
    for way in ("snapshots", "animated"):
        assert len(list(tmp_path.glob(f"{way}_t*_v0*.png"))) == 32, way


def _perf_usable() -> bool:
    """Linux perf on PATH, allowed to record this user's own processes (perf_event_paranoid 2 or lower, or root)."""
    import shutil
    paranoid = Path("/proc/sys/kernel/perf_event_paranoid")
    return shutil.which("perf") is not None and paranoid.exists() and (
        os.geteuid() == 0 or int(paranoid.read_text()) <= 2)


@pytest.mark.skipif(not _perf_usable(), reason="needs Linux perf, allowed to profile this user's processes")
def test_measure_render_costs_profile(character, tmp_path):
    """benchmarks/measure_render_costs.py profile: perf's CPU samples of the job's render calls, grouped (Cycles'
    camera rays and escaping rays, Embree, OpenImageDenoise) and by function; the shares add up to about 100%."""
    import re
    proc = subprocess.run([sys.executable, "benchmarks/measure_render_costs.py", "profile", character["path"],
                           "--seconds", "3", "--scratch", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    head, _, funcs = proc.stdout.partition("largest functions:")
    groups = {name.strip(): float(p) for p, name in re.findall(r"^ +([\d.]+)%  (.+)$", head, re.M)}
    # perf prints each of hundreds of functions' shares rounded to 0.01%: their sum may pass 100 by a little
    assert 50.0 < sum(groups.values()) <= 103.0, groups
    for name in ("camera rays (integrator_init_from_camera)", "Embree (ray intersection, BVH builds)",
                 "OpenImageDenoise"):
        assert groups.get(name, 0.0) > 0.0, (name, groups)
    assert len(re.findall(r"^ +[\d.]+%  \S", funcs, re.M)) == 15, funcs
    m = re.search(r"(\d+) time steps of 4 views in ([\d.]+) s \(([\d.]+) ms a frame\)", proc.stdout)
    assert m and int(m.group(1)) >= 8 and float(m.group(3)) > 0, proc.stdout[-2000:]
