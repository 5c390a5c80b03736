"""Pseudo-4D job throughput: output grid frames per second per core, split into decode, warp, encode, write.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_pseudo4d.py             # stage split, 1 core
    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_pseudo4d.py --ray       # + the real Ray job

Source videos are synthetic (pipelines/procedural_video.py) H.264 files, made
before timing starts. The stage split runs the job's own item processor and
shard commit in this process on one core (torch and the decoder pinned to one
thread) over 8 x 8 grids at 256x256, and counts CPU time as well as wall time.
``--ray`` then runs the whole job (make_pseudo4d.main) with one worker per core
on a fresh output, Ray start-up included. The goal (issue 4) is >= 150 grid
frames/s per core end to end; clips are not counted, they reuse the grid's
encoded frames. In the same run it times the three frame encoders on the same
warped frames, since encoding is the largest stage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# One core per worker, as Ray gives its workers (OMP_NUM_THREADS=1): no BLAS/OpenMP helper threads.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402


def make_sources(folder: Path, count: int, width: int, height: int, frames: int, fps: float) -> list[Path]:
    from pipelines.procedural_video import make_video
    from pipelines.common.video import encode_video
    paths = []
    for i in range(count):
        p = folder / f"video{i:03d}.mp4"
        if not p.exists():
            encode_video(p, make_video(i, width, height, frames), fps)
        paths.append(p)
    return paths


def stage_split(cfg, paths: list[Path], output: Path, items_per_part: int) -> dict:
    """The processor and shard commit of the job, in this process, one core."""
    from pipelines.common.shards import commit_part
    from pipelines.make_pseudo4d import Pseudo4DProcessor

    proc = Pseudo4DProcessor(cfg, pin_threads=True)
    proc({"item_id": "warmup", "path": str(paths[0])})          # first-call costs (imports, allocator)
    proc.timings = {k: 0.0 for k in proc.timings}
    write = 0.0
    grid_frames = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for part, start in enumerate(range(0, len(paths), items_per_part)):
        samples = []
        for p in paths[start:start + items_per_part]:
            samples += proc({"item_id": p.name, "path": str(p)})
        t0 = time.perf_counter()
        commit_part(output, part, samples, [])
        write += time.perf_counter() - t0
        grid_frames += sum(s.views * s.frames for s in samples if s.stream == "grids")
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    stages = {**{k: v for k, v in proc.timings.items() if k != "generate"}, "write": write}
    other = wall - sum(stages.values())
    return {
        "grid_frames": grid_frames, "wall_s": wall, "cpu_s": cpu,
        "frames_per_s_per_core_wall": grid_frames / wall, "frames_per_s_per_core_cpu": grid_frames / cpu,
        "ms_per_frame": {**{k: 1000 * v / grid_frames for k, v in stages.items()}, "other": 1000 * other / grid_frames},
    }


def encoder_comparison(cfg, path: Path) -> dict:
    """Encode the same warped 8 x 8 grid with each encoder; ms per frame and KiB per frame."""
    from pipelines.frame_codec import encode_jpeg, encode_png_fast, encode_png_pillow
    from pipelines.make_pseudo4d import Pseudo4DProcessor
    from PIL import Image
    import io

    samples = Pseudo4DProcessor(cfg, pin_threads=True)({"item_id": "enc", "path": str(path)})
    frames = [np.asarray(Image.open(io.BytesIO(b))) for k, b in sorted(samples[0].files.items()) if k.endswith(".png")]
    out = {}
    encoders = (("png_fast", encode_png_fast), ("png_pillow_level1", lambda a: encode_png_pillow(a, 1)),
                ("png_pillow_level6", lambda a: encode_png_pillow(a, 6)), ("jpeg_q95", lambda a: encode_jpeg(a, 95)))
    for name, fn in encoders:
        t0 = time.perf_counter()
        sizes = [len(fn(f)) for _ in range(3) for f in frames]
        out[name] = {"ms_per_frame": 1000 * (time.perf_counter() - t0) / len(sizes),
                     "kib_per_frame": float(np.mean(sizes)) / 1024}
    return out


def ray_job(cfg_args: list[str], workers: int) -> dict:
    import pyarrow.parquet as pq
    from pipelines.make_pseudo4d import main
    out = Path(cfg_args[cfg_args.index("--output") + 1])
    t0 = time.perf_counter()
    main(cfg_args + ["--concurrency", str(workers), "--num-cpus", "1"])
    wall = time.perf_counter() - t0
    index = pq.read_table(out / "index.parquet").to_pandas()
    grids = index[index.stream == "grids"]
    frames = int((grids.views * grids.frames).sum())
    summary = json.loads((out / "summary.json").read_text())
    # Steady state, Ray start-up excluded: each part's commit record is written when the part is done, so
    # the frames of the parts after the first round, over the time from the first round to the last commit.
    per_part = grids.groupby("part").apply(lambda g: int((g.views * g.frames).sum())).to_dict()
    done_at = sorted((f.stat().st_mtime, int(f.name[5:11])) for f in (out / "_parts").glob("part-*.index.parquet"))
    steady = None
    if len(done_at) > workers:
        t_first_round = done_at[workers - 1][0]
        later = sum(per_part.get(p, 0) for _, p in done_at[workers:])
        steady = later / max(done_at[-1][0] - t_first_round, 1e-9)
    return {"workers": workers, "grid_frames": frames, "wall_s": wall,
            "frames_per_s": frames / wall, "frames_per_s_per_core": frames / wall / workers,
            "steady_frames_per_s": steady, "steady_frames_per_s_per_core": steady / workers if steady else None,
            "failures": summary["failures_total"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=24, help="source videos")
    ap.add_argument("--source-size", default="640x360", help="source video WxH")
    ap.add_argument("--size", type=int, default=256, help="output frame size (square)")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--image-format", default="png", choices=["png", "jpg"])
    ap.add_argument("--png-mode", default="fast", choices=["fast", "pillow"])
    ap.add_argument("--ray", action="store_true", help="also run the whole job through Ray, one worker per core")
    ap.add_argument("--ray-videos", type=int, default=96, help="source videos for the Ray run (start-up amortised)")
    ap.add_argument("--workdir", default="", help="keep sources and outputs here (default: a temp folder)")
    ap.add_argument("--json", default="", help="also write the results to this file")
    args = ap.parse_args()

    from pipelines.make_pseudo4d import PRESETS
    sw, sh = (int(x) for x in args.source_size.split("x"))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_pseudo4d_"))
    src_dir = work / "sources"
    src_dir.mkdir(parents=True, exist_ok=True)
    n_src = max(args.videos, args.ray_videos if args.ray else 0)
    t0 = time.perf_counter()
    paths = make_sources(src_dir, n_src, sw, sh, frames=48, fps=24.0)
    print(f"[bench] {n_src} source videos {sw}x{sh}, 48 frames, H.264: ready in {time.perf_counter() - t0:.1f}s",
          flush=True)

    cfg = PRESETS["paper"]()
    cfg.views, cfg.frames, cfg.height, cfg.width = args.views, args.frames, args.size, args.size
    cfg.image_format, cfg.png_mode, cfg.num_cpus = args.image_format, args.png_mode, 1.0
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                f"{platform.python_implementation()} {platform.python_version()}",
                     "config": {"views": cfg.views, "frames": cfg.frames, "size": args.size, "source": args.source_size,
                                "image_format": cfg.image_format, "png_mode": cfg.png_mode, "fps": cfg.fps,
                                "transform": cfg.transform.family},
                     "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}

    split = stage_split(cfg, paths[:args.videos], work / "out_split", items_per_part=8)
    results["stage_split_1core"] = split
    ms = split["ms_per_frame"]
    print(f"[bench] 1 core, {split['grid_frames']} grid frames: {split['frames_per_s_per_core_wall']:.0f} frames/s "
          f"(wall), {split['frames_per_s_per_core_cpu']:.0f} frames per CPU-second | ms/frame: "
          + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()), flush=True)

    results["encoders"] = encoder_comparison(cfg, paths[0])
    print("[bench] encoders (ms/frame, KiB/frame): " + ", ".join(
        f"{k} {v['ms_per_frame']:.2f} / {v['kib_per_frame']:.0f}" for k, v in results["encoders"].items()), flush=True)

    if args.ray:
        workers = os.cpu_count() or 1
        out = work / "out_ray"
        if out.exists():
            import shutil
            shutil.rmtree(out)
        cfg_args = ["--preset", "paper", "--input", str(src_dir), "--output", str(out), "--limit", str(args.ray_videos),
                    "--views", str(args.views), "--frames", str(args.frames), "--height", str(args.size),
                    "--width", str(args.size), "--image-format", args.image_format, "--png-mode", args.png_mode,
                    "--items-per-part", "8"]
        results["ray_job"] = ray_job(cfg_args, workers)
        r = results["ray_job"]
        print(f"[bench] Ray job, {workers} workers, {r['grid_frames']} grid frames in {r['wall_s']:.1f}s "
              f"(start-up included): {r['frames_per_s']:.0f} frames/s = {r['frames_per_s_per_core']:.0f} per core; "
              f"steady state after the first round of parts: {r['steady_frames_per_s'] or 0:.0f} frames/s = "
              f"{r['steady_frames_per_s_per_core'] or 0:.0f} per core", flush=True)

    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
