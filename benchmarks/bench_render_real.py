"""Render speed on real-weight assets, phase by phase (issue 15, item 3).

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_render_real.py

Assets: three characters from rendering/character.py, built first (not timed): ``light`` (seed 0, 28k
triangles, 1k textures, 3 actions), ``medium`` (seed 1, 42k, 1k, 4 actions, a tail) and ``heavy`` (seed 2,
60k, 2k textures, 3 actions, a tail and a staff); each a skinned mesh in 4 parts over a 28-31 bone
armature with packed base-colour, normal and metallic-roughness images, as animated Objaverse characters
are. Workload (the issue's): 256x256, Cycles on CPU, 16 samples with OpenImageDenoise, 4 views x 8 frames,
every action of every asset (10 grids, 320 frames).

Each run is the job path: one request per asset to a warm Blender child (rendering/worker.py's protocol and
render_asset), then the parent turns the result into shard samples and writes the tar (pipelines' own
to_samples and write_tar). Seconds per frame, per phase:

* import: glTF import into a fresh scene (once per asset, spread over its frames);
* normalize: evaluating every sampled frame for the bounds (and the render regions);
* eval: scene.frame_set before each render call;
* sync, trace_denoise, write: rendering/render_asset.py's PhaseClock (Cycles' status lines: sync is the
  render depsgraph, Cycles' object/mesh/image sync and the BVH build; write is PNG encoding and reading the
  files back);
* path tracing and denoise: trace_denoise of the same configuration run with denoising off is the path
  tracing; the difference is the denoise (Cycles runs both in one work item, with no status between);
* shard: to_samples + write_tar in the parent;
* other: the rest of the wall time (request pickling, pipe, scene set-up, actions).

Configurations, each in its own warm Blender: ``before`` (the job's settings before this item), one per
change alone, and ``after`` (the new defaults). They alternate asset by asset, --reps times; each keeps its
best run per asset. Before every run the script waits until no other process uses the CPU (ps), and it
counts the CPU time other processes took during the run (/proc/stat minus ours): a run where they took more
than 5% of the wall time is repeated. --quality renders two time steps per action at before, after and a
256-sample reference and reports PSNR over object pixels, with a contact sheet.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VIEWS, FRAMES, RES, SAMPLES = 4, 8, 256, 16
SIZE = {"height": RES, "width": RES}  # --height/--width change it (the job's default frame is 144 x 256)
ASSETS = (("light", 0), ("medium", 1), ("heavy", 2))

# Each configuration: RenderSettings overrides and Cycles/scene property overrides applied after the job's
# configure_engine ("cycles.max_bounces": 2, ...). "before" reproduces the job before issue 15 item 3.
CONFIGS: dict[str, dict] = {
    "before": {"settings": {"render_region": False}, "engine": {}},
    "after": {"settings": {}, "engine": {}},
}
# Each change alone on top of before (--singles).
SINGLES: dict[str, dict] = {
    "region": {"settings": {"render_region": True}, "engine": {}},
}
# Changes tried and not kept (docs/performance.md says why); --candidates NAME,... runs them beside before/after.
CANDIDATES: dict[str, dict] = {
    "bounces0": {"settings": {}, "engine": {"cycles.max_bounces": 0}},
    "bounces1": {"settings": {}, "engine": {"cycles.max_bounces": 1}},
    "bounces2": {"settings": {}, "engine": {"cycles.max_bounces": 2}},
    "adaptive": {"settings": {}, "engine": {"cycles.use_adaptive_sampling": True, "cycles.adaptive_threshold": 0.05,
                                            "cycles.adaptive_min_samples": 8}},
    # Cycles' texture limit acts only with Simplify on (without it, the images do not change).
    "texture_limit_512": {"settings": {}, "engine": {"render.use_simplify": True, "cycles.texture_limit_render": "512"}},
    "texture_limit_1024": {"settings": {}, "engine": {"render.use_simplify": True,
                                                      "cycles.texture_limit_render": "1024"}},
    "texture_limit_256": {"settings": {}, "engine": {"render.use_simplify": True, "cycles.texture_limit_render": "256"}},
    "fast_gi": {"settings": {}, "engine": {"cycles.use_fast_gi": True}},
    "denoise_rgb_albedo": {"settings": {}, "engine": {"cycles.denoising_input_passes": "RGB_ALBEDO"}},
    "static_bvh": {"settings": {}, "engine": {"cycles.debug_bvh_type": "STATIC_BVH"}},
    "spatial_splits": {"settings": {}, "engine": {"cycles.debug_use_spatial_splits": True}},
    # Three Cycles threads on two cores: the third fills the cores while one thread syncs or writes.
    "threads3": {"settings": {}, "engine": {"render.threads_mode": "FIXED", "render.threads": 3}},
    "full_frame_adaptive": {"settings": {"render_region": False},
                            "engine": {"cycles.use_adaptive_sampling": True, "cycles.adaptive_threshold": 0.01,
                                       "cycles.adaptive_min_samples": 4}},
}


def _set_path(root, dotted: str, value) -> None:
    obj = root
    parts = dotted.split(".")
    for p in parts[:-1]:
        obj = getattr(obj, p)
    setattr(obj, parts[-1], value)


def serve() -> None:
    """Child: the job's worker loop, with BENCH_ENGINE's overrides applied after configure_engine."""
    import bpy

    import rendering.scene as S
    from rendering import worker
    overrides = json.loads(os.environ.get("BENCH_ENGINE") or "{}")
    original = S.configure_engine

    def configure(s) -> None:
        original(s)
        for key, value in overrides.items():
            _set_path(bpy.context.scene, key, value)
    S.configure_engine = configure
    worker.serve()


def _worker(engine: dict, threads: int):
    """The job's BlenderWorker, whose child runs serve() above (the job's request loop, plus ``engine``)."""
    from rendering.worker import BlenderWorker, _scratch_root

    class BenchWorker(BlenderWorker):
        def _start(self) -> None:  # BlenderWorker._start with this script as the child's program
            self.log_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f"blender-worker-{os.getpid()}-", suffix=".log", dir=self.log_dir)
            os.close(fd)
            self.log_path = Path(name)
            self.scratch = Path(tempfile.mkdtemp(prefix=f"blender-scratch-{os.getpid()}-", dir=_scratch_root()))
            env = dict(os.environ, RENDER_SCRATCH=str(self.scratch), BENCH_ENGINE=json.dumps(engine),
                       PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen([sys.executable, "-u", str(Path(__file__).resolve()), "--serve"],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                                             cwd=ROOT, start_new_session=True)

    return BenchWorker(threads=threads)


# ----------------------------------------------------------------------------------------- machine noise

def _busy_seconds() -> float:
    """CPU seconds spent by the whole machine (all cores, all processes) since boot."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def wait_quiet(limit_s: float = 1800.0) -> str:
    """Wait until the machine is idle: under 0.1 core busy over 3 s while this script waits (our Blender
    children are idle then). Returns the load average seen, or what kept it busy after ``limit_s``."""
    t0 = time.time()
    while True:
        b0 = _busy_seconds()
        time.sleep(3.0)
        rate = (_busy_seconds() - b0) / 3.0
        if rate < 0.1:
            return f"idle ({rate:.2f} cores busy), load {open('/proc/loadavg').read().split()[0]}"
        if time.time() - t0 > limit_s:
            ps = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu", "--no-headers"], capture_output=True,
                                text=True).stdout.splitlines()
            return f"busy ({rate:.2f} cores): {ps[0][:100] if ps else ''}"
        time.sleep(15)


# ----------------------------------------------------------------------------------------- runs

def build_assets(out: Path) -> list[dict]:
    from rendering.character import VERSION
    infos = []
    for variant, seed in ASSETS:
        path = out / f"char-{variant}-{seed}-v{VERSION}.glb"
        info_path = path.with_suffix(".json")
        if not path.exists() or not info_path.exists():
            proc = subprocess.run([sys.executable, "-c", "import json, sys; from rendering.character import export_glb; "
                                   f"print('INFO ' + json.dumps(export_glb({str(path)!r}, {seed}, {variant!r})))"],
                                  cwd=ROOT, capture_output=True, text=True)
            line = [l for l in proc.stdout.splitlines() if l.startswith("INFO ")]
            if proc.returncode or not line:
                raise SystemExit(f"building {variant} failed:\n{proc.stderr[-2000:]}")
            info_path.write_text(line[-1][5:])
        infos.append(json.loads(info_path.read_text()))
    return infos


def settings_for(cfg: dict, denoise: bool = True, **extra):
    from rendering.settings import RenderSettings
    fields = dict(views=VIEWS, frames=FRAMES, samples=SAMPLES, denoise=denoise, max_actions=4, **SIZE)
    return RenderSettings(**{**fields, **cfg["settings"], **extra})


def run_once(worker, glb: str, uid: str, settings, scratch: Path) -> dict:
    """One asset through the job path; per-phase seconds (totals over its frames) and the noise check."""
    from pipelines.common.shards import write_tar
    from pipelines.render_objaverse import to_samples
    b0, c0, p0 = _busy_seconds(), _proc_cpu(worker.proc.pid), time.process_time()
    t0 = time.perf_counter()
    result = worker.call({"op": "render", "path": glb, "uid": uid, "source": "local",
                          "settings": settings.to_dict()}, timeout=3600)
    t1 = time.perf_counter()
    samples = to_samples(uid, result)
    write_tar(scratch / "shards" / f"{uid}.tar", samples)
    wall = time.perf_counter() - t0
    blender_cpu = _proc_cpu(worker.proc.pid) - c0
    others = (_busy_seconds() - b0) - blender_cpu - (time.process_time() - p0)
    metas = [s["meta"] for s in result["samples"]]
    ph = {"import": metas[0]["seconds"]["import"], "normalize": sum(m["seconds"]["normalize"] for m in metas)}
    for k in ("eval", "sync", "trace_denoise", "write"):
        ph[k] = sum(m["seconds"]["phases"].get(k, 0.0) for m in metas)
    ph["shard"] = wall - (t1 - t0)
    ph["other"] = wall - sum(ph.values())
    frames = sum(m["views"] * m["frames"] for m in metas)
    # blender_cores: how many of the machine's cores the Blender child kept busy over the asset. Near the core
    # count, a second actor overlapping one actor's single-threaded phases (sync, PNG writes) has nothing to win.
    return {"wall": wall, "frames": frames, "phases": ph, "others_cpu_share": others / wall,
            "blender_cores": blender_cpu / wall,
            "region": [m["render"].get("region", 1.0) for m in metas], "actions": len(metas)}


def benchmark(assets: list[dict], configs: dict[str, dict], reps: int, threads: int, nodn: tuple[str, ...]) -> dict:
    """Best run per (config, asset); configs with a ``_nodn`` twin also run with denoising off."""
    runs = [(name, dn) for name in configs for dn in ((True, False) if name in nodn else (True,))]
    workers = {name: _worker(cfg["engine"], threads) for name, cfg in configs.items()}
    best: dict[str, dict] = {}
    log = []
    try:
        with tempfile.TemporaryDirectory() as d:
            scratch = Path(d)
            for name, w in workers.items():  # start and warm every Blender (kernels loaded), untimed
                w.call({"op": "ping"}, timeout=300)
                run_once(w, assets[0]["path"], "warm", settings_for(configs[name], frames=2, views=2), scratch)
            for rep in range(reps):
                for a in assets:
                    for name, dn in runs:
                        key = f"{name}{'' if dn else '_nodn'}|{a['variant']}"
                        for attempt in range(10):
                            seen = wait_quiet()
                            r = run_once(workers[name], a["path"], f"{a['variant']}-{a['seed']}",
                                         settings_for(configs[name], denoise=dn), scratch)
                            r["before_run"] = seen
                            if r["others_cpu_share"] < 0.05:
                                break
                            print(f"  {key}: other processes took {r['others_cpu_share']:.0%} of the CPU; again",
                                  flush=True)
                        log.append({"key": key, "rep": rep, **r})
                        per = r["wall"] / r["frames"]
                        print(f"rep {rep} {key:24s} {per:.3f} s/frame  "
                              + " ".join(f"{k} {v / r['frames'] * 1000:.1f}" for k, v in r["phases"].items())
                              + f"  (ms/frame; Blender {r['blender_cores']:.2f} cores, others {r['others_cpu_share']:.1%})",
                              flush=True)
                        if key not in best or r["wall"] < best[key]["wall"]:
                            best[key] = r
    finally:
        for w in workers.values():
            w.close()
    return {"best": best, "runs": log}


def summarize(best: dict, configs: dict, nodn: tuple[str, ...], assets: list[dict]) -> dict:
    """Per config: seconds per frame by phase over all assets (sum of seconds / sum of frames)."""
    table = {}
    for name in configs:
        keys = [f"{name}|{a['variant']}" for a in assets]
        if not all(k in best for k in keys):
            continue
        frames = sum(best[k]["frames"] for k in keys)
        ph = {p: sum(best[k]["phases"][p] for k in keys) / frames for p in best[keys[0]]["phases"]}
        row = {"s_per_frame": sum(best[k]["wall"] for k in keys) / frames, "frames": frames, "phases": ph,
               "blender_cores": sum(best[k]["blender_cores"] * best[k]["wall"] for k in keys) / sum(best[k]["wall"] for k in keys),
               "per_asset": {a["variant"]: best[f"{name}|{a['variant']}"]["wall"] / best[f"{name}|{a['variant']}"]["frames"]
                             for a in assets}}
        if name in nodn and all(f"{name}_nodn|{a['variant']}" in best for a in assets):
            trace = sum(best[f"{name}_nodn|{a['variant']}"]["phases"]["trace_denoise"] for a in assets) / frames
            row["path_tracing"] = trace
            row["denoise"] = ph["trace_denoise"] - trace
        table[name] = row
    return table


def print_table(table: dict) -> None:
    cols = ["import", "normalize", "eval", "sync", "trace_denoise", "path_tracing", "denoise", "write", "shard", "other"]
    print("\nseconds per frame (sum over the assets of each one's best run / their frames)")
    print(f"{'config':10s} {'total':>7s} " + " ".join(f"{c:>13s}" for c in cols) + "  Blender cores")
    for name, row in table.items():
        vals = [row.get(c, row["phases"].get(c)) for c in cols]
        print(f"{name:10s} {row['s_per_frame']:7.4f} " + " ".join(f"{'-':>13s}" if v is None else f"{v:13.4f}"
                                                                  for v in vals) + f"  {row['blender_cores']:13.2f}")


# ----------------------------------------------------------------------------------------- quality

def quality(assets: list[dict], configs: dict, out_png: Path, threads: int, ref_samples: int = 256) -> dict:
    """PSNR over object pixels against a ``ref_samples`` reference (denoised), two time steps per action."""
    import numpy as np
    from PIL import Image
    names = list(configs) + ["reference"]
    images: dict[str, dict] = {}
    for name in names:
        cfg = configs.get(name, configs["before"])
        w = _worker(cfg["engine"], threads)
        try:
            for a in assets:
                extra = {"frames": 2}
                if name == "reference":
                    extra.update(samples=ref_samples, render_region=False)
                s = settings_for(cfg, **extra)
                wait_quiet()
                result = w.call({"op": "render", "path": a["path"], "uid": f"{a['variant']}-{a['seed']}",
                                 "source": "local", "settings": s.to_dict()}, timeout=3600)
                for smp in result["samples"]:
                    for member, data in smp["files"].items():
                        images.setdefault(name, {})[(a["variant"], smp["action"], member)] = \
                            np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"), dtype=np.float64) / 255.0
        finally:
            w.close()

    def over_white(x):
        return x[..., :3] * x[..., 3:4] + (1.0 - x[..., 3:4])

    def psnr(a, b, mask):
        mse = float(((over_white(a) - over_white(b)) ** 2)[mask].mean())
        return 10 * math.log10(1.0 / max(mse, 1e-12))

    report: dict = {"reference_samples": ref_samples, "psnr_vs_reference": {}, "psnr_vs_before": {}}
    keys = sorted(images["reference"])
    for name in configs:
        vals, vals_b = [], []
        for k in keys:
            ref = images["reference"][k]
            mask = ref[..., 3] > 0
            if not mask.any():
                continue
            vals.append(psnr(images[name][k], ref, mask))
            if name != "before":
                vals_b.append(psnr(images[name][k], images["before"][k], mask | (images["before"][k][..., 3] > 0)))
            # no object pixel may be lost outside the region: alpha where the reference has none is fine,
            # alpha missing where before had it is not
        report["psnr_vs_reference"][name] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)), "n": len(vals)}
        if vals_b:
            report["psnr_vs_before"][name] = {"mean": float(np.mean(vals_b)), "min": float(np.min(vals_b))}
        lost = sum(int(((images["before"][k][..., 3] > 0) & (images[name][k][..., 3] == 0)).sum()) for k in keys)
        report.setdefault("object_pixels_lost_vs_before", {})[name] = lost
    # contact sheet: per asset, view 0 at the last time step of its first action, cropped to the object: one
    # column per configuration, the reference last
    cols = list(configs) + ["reference"]
    rows = []
    for a in assets:
        first = min(k[1] for k in keys if k[0] == a["variant"])
        for member in ("v00t01.png",):
            k = (a["variant"], first, member)
            if k not in images["reference"]:
                continue
            ys, xs = np.nonzero(images["reference"][k][..., 3] > 0)
            y0, y1 = max(0, ys.min() - 4), min(RES, ys.max() + 5)
            x0, x1 = max(0, xs.min() - 4), min(RES, xs.max() + 5)
            rows.append(np.concatenate([over_white(images[n][k])[y0:y1, x0:x1] for n in cols], 1))
    h = max(r.shape[0] for r in rows)
    w = max(r.shape[1] for r in rows)
    sheet = np.ones((h * len(rows), w, 3))
    for i, r in enumerate(rows):
        sheet[i * h:i * h + r.shape[0], :r.shape[1]] = r
    Image.fromarray((np.clip(sheet, 0, 1) * 255).astype(np.uint8)).save(out_png, optimize=True)
    report["contact_sheet"] = str(out_png)
    report["contact_sheet_layout"] = ("rows: each asset's view 0 at the last of 2 time steps of its first action "
                                      "(alphabetical), cropped to the object; columns: " + " | ".join(cols))
    return report


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve()
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions; the best run of each is kept")
    ap.add_argument("--threads", type=int, default=0, help="Cycles threads (0 = all cores)")
    ap.add_argument("--assets-dir", default=str(Path(tempfile.gettempdir()) / "bench_render_real_assets"))
    ap.add_argument("--singles", action="store_true", help="also run each change alone on top of before")
    ap.add_argument("--candidates", default="", help="comma-separated CANDIDATES to time (and score) beside before/after")
    ap.add_argument("--quality", action="store_true", help="also measure PSNR against a 256-sample reference")
    ap.add_argument("--skip-timing", action="store_true", help="only the quality check")
    ap.add_argument("--height", type=int, default=RES, help="frame height (the issue's workload: 256)")
    ap.add_argument("--width", type=int, default=RES, help="frame width (the issue's workload: 256)")
    ap.add_argument("--only", default="", help="comma-separated asset variants (smoke runs)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_render_real_cpu.json"))
    args = ap.parse_args()
    SIZE.update(height=args.height, width=args.width)
    if args.quality and (args.height, args.width) != (RES, RES):
        raise SystemExit("--quality measures the issue's 256 x 256 frames only")
    assets_dir = Path(args.assets_dir)
    assets_dir.mkdir(parents=True, exist_ok=True)
    assets = build_assets(assets_dir)
    if args.only:
        assets = [a for a in assets if a["variant"] in args.only.split(",")]
    for a in assets:
        print(f"asset {a['variant']}: {a['triangles_total']} triangles, {a['bones']} bones, {a['images']} images of "
              f"{a['texture']}px, actions {a['actions']}, {a['bytes'] / 1e6:.1f} MB", flush=True)
    configs = dict(CONFIGS)
    if args.singles:
        configs = {"before": CONFIGS["before"], **SINGLES, "after": CONFIGS["after"]}
    for name in filter(None, args.candidates.split(",")):
        configs[name] = CANDIDATES[name]
    nodn = ("before", "after")
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    report: dict = {"date": date.today().isoformat(),
                    "machine": f"{platform.node()}: {os.cpu_count()} cores, {cpu}, {platform.machine()}",
                    "command": "flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_render_real.py "
                               + " ".join(sys.argv[1:]),
                    "workload": f"{args.width}x{args.height}, Cycles CPU, {SAMPLES} spp + OIDN, {VIEWS} views x {FRAMES} frames, "
                                "every action of 3 character assets",
                    "assets": assets, "configs": configs}
    report["table"] = {}
    if not args.skip_timing:
        t0 = time.time()
        res = benchmark(assets, configs, args.reps, args.threads, nodn)
        report["best"], report["runs"] = res["best"], res["runs"]
        report["table"] = summarize(res["best"], configs, nodn, assets)
        report["bench_seconds"] = time.time() - t0
    if args.quality:
        report["quality"] = quality(assets, configs, Path(args.out).with_suffix(".png"), args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    if report["table"]:
        print_table(report["table"])
    if "quality" in report:
        print(json.dumps(report["quality"], indent=1))
    b, a = report["table"].get("before"), report["table"].get("after")
    if a and b:
        print(f"\nafter: {a['s_per_frame']:.3f} s/frame, before: {b['s_per_frame']:.3f} ({b['s_per_frame'] / a['s_per_frame']:.2f}x)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
