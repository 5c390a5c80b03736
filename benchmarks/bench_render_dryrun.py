"""The render job's dry run at cluster scale: listing, scheduling, sharding and resume for 15,000 assets.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_render_dryrun.py [--assets 15000]

Builds a Parquet manifest of N assets (paths only; nothing is downloaded or
rendered), runs pipelines/render_objaverse.py --dry-run on a private local Ray
with the default grid (8 views x 16 frames of 8x8 PNGs), then runs it again into
the same output to time a resume that finds everything done. Reports wall time,
peak driver RSS (from the job summary) and the output size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=int, default=15000)
    ap.add_argument("--items-per-part", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--keep", default="", help="keep the output here instead of a temp dir")
    args = ap.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    import pyarrow as pa
    import ray

    # A private Ray even when another local cluster is up (ray.init would attach to it).
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)
    import pyarrow.parquet as pq

    from pipelines.render_objaverse import main as job_main

    tmp = Path(tempfile.mkdtemp(prefix="dryrun-"))
    try:
        manifest = tmp / "manifest.parquet"
        pq.write_table(pa.table({"path": [f"objaverse/glbs/{i // 1000:03d}/{i:032x}.glb" for i in range(args.assets)],
                                 "uid": [f"{i:032x}" for i in range(args.assets)]}), manifest)
        out = Path(args.keep) if args.keep else tmp / "out"
        argv = ["--preset", "paper", "--source", "local", "--input", str(manifest), "--output", str(out),
                "--dry-run", "true", "--items-per-part", str(args.items_per_part),
                "--concurrency", str(args.concurrency), "--cpus-per-worker", "1"]
        runs = {}
        for label in ("first", "resume"):
            t0 = time.perf_counter()
            try:
                job_main(argv)
            except SystemExit:
                pass
            summary = json.loads((out / "summary.json").read_text())
            runs[label] = {"wall_s": round(time.perf_counter() - t0, 1),
                           "driver_peak_rss_mb": round(summary["driver_peak_rss_mb"], 1),
                           "items_ok_this_run": summary["items_ok_this_run"],
                           "items_skipped": summary["items_skipped"], "samples_total": summary["samples_total"],
                           "frames_this_run": summary["frames_this_run"]}
        size = sum(f.stat().st_size for f in (out / "shards").glob("*.tar"))
        report = {"machine": f"{os.cpu_count()} cores, {platform.machine()}", "assets": args.assets,
                  "parts": (args.assets + args.items_per_part - 1) // args.items_per_part,
                  "grid": "8 views x 16 frames, 8x8 PNG", "shards_gb": round(size / 1e9, 2), **runs}
        print(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
