"""Downloads overlapping renders: the render job on a loopback Objaverse mirror with an injected per-file
latency, with and without ``--prefetch``, in one run.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_prefetch.py [--assets 8 --latency 1.5]

Builds procedural animated GLBs, serves them in the hub's layout (object-paths.json.gz, metadata/, glbs/) from
a threaded HTTP server that waits ``--latency`` seconds before each GLB (a far-away hub), and renders them
with the real job (Blender, the tiny preset, one actor) twice: ``--prefetch 0`` (each download waits for the
render before it) and ``--prefetch 2``, alternated after an untimed warm-up, each into a fresh output and an
empty cache. Reports the best wall time of each, the gain, and writes benchmarks/results/bench_prefetch_cpu.json.
"""

from __future__ import annotations

import argparse
import gzip
import http.server
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def serve(root: Path, latency: float) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def do_GET(self):  # noqa: N802
            if self.path.startswith("/glbs/"):
                time.sleep(latency)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=int, default=8)
    ap.add_argument("--latency", type=float, default=1.5, help="seconds before each GLB starts arriving")
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each setting, alternated")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_prefetch_cpu.json"))
    args = ap.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    from pipelines.render_objaverse import main as job_main

    tmp = Path(tempfile.mkdtemp(prefix="prefetch-"))
    glbs = tmp / "glbs_src"
    subprocess.run([sys.executable, "-m", "rendering.procedural", "--out", str(glbs), "--count", str(args.assets),
                    "--actions", "1"], cwd=ROOT, check=True, capture_output=True)
    hub = tmp / "hub"
    paths, annotations = {}, {}
    for i, src in enumerate(sorted(glbs.glob("*.glb"))):
        uid = f"{i:032x}"
        rel = f"glbs/000-000/{uid}.glb"
        (hub / rel).parent.mkdir(parents=True, exist_ok=True)
        (hub / rel).write_bytes(src.read_bytes())
        paths[uid] = rel
        annotations[uid] = {"uid": uid, "name": src.stem, "animationCount": 1, "license": "by"}
    (hub / "metadata").mkdir()
    with gzip.open(hub / "object-paths.json.gz", "wt") as fh:
        json.dump(paths, fh)
    with gzip.open(hub / "metadata" / "000-000.json.gz", "wt") as fh:
        json.dump(annotations, fh)
    server, url = serve(hub, args.latency)
    walls: dict[int, list[float]] = {0: [], args.prefetch: []}
    try:
        # an untimed warm-up (Ray, the actor, Blender's first start), then the two settings alternated, each
        # into a fresh output and an empty cache; the best of each is reported
        for n, prefetch in enumerate([args.prefetch] + [0, args.prefetch] * args.repeats):
            out = tmp / f"out_{n}"
            argv = ["--preset", "tiny", "--source", "objaverse", "--input", "annotations", "--base-url", url,
                    "--cache-dir", str(tmp / f"cache_{n}"), "--output", str(out), "--concurrency", "1",
                    "--items-per-part", str(args.assets), "--max-actions", "1", "--prefetch", str(prefetch)]
            t0 = time.perf_counter()
            job_main(argv)
            wall = time.perf_counter() - t0
            summary = json.loads((out / "summary.json").read_text())
            assert summary["items_ok_this_run"] == args.assets, summary
            if n:
                walls[prefetch].append(wall)
            print(f"[bench_prefetch] --prefetch {prefetch}: {wall:.1f} s for {args.assets} assets"
                  f"{'' if n else ' (warm-up)'}", flush=True)
    finally:
        server.shutdown()
    walls = {k: min(v) for k, v in walls.items()}
    result = {"assets": args.assets, "latency_s": args.latency, "prefetch": args.prefetch, "repeats": args.repeats,
              "wall_s_no_prefetch": round(walls[0], 2), "wall_s_prefetch": round(walls[args.prefetch], 2),
              "saved_s": round(walls[0] - walls[args.prefetch], 2),
              "speedup": round(walls[0] / walls[args.prefetch], 3),
              "download_wait_s_serial": round(args.assets * args.latency, 2),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
              "command": "benchmarks/bench_prefetch.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
