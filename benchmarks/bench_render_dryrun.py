"""The render job's dry run at cluster scale: the shipped Objaverse list, end to end, through listing,
scheduling, sharding and resume.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_render_dryrun.py

Serves a loopback mirror of the hub's index (object-paths.json.gz and metadata/<group>.json.gz, 160 groups,
every annotation CC-BY: the real licences need the hub) holding the shipped 15,081 animated uids and the 20
SV4D test uids, then runs pipelines/render_objaverse.py --source objaverse with its defaults (the shipped list,
--split train: 15,067 assets) and --dry-run true (nothing downloaded or rendered; 8x8 PNG frames with real
cameras.json and meta.json) on a private local Ray with the paper grid (8 views x 16 frames), then again into
the same output to time a resume that finds everything done. Reports wall time, peak driver RSS (from the job
summary) and the output size. ``--assets N`` takes the first N uids of the list instead.
"""

from __future__ import annotations

import argparse
import gzip
import http.server
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=int, default=0, help="first N uids of the shipped list (0 = all of it)")
    ap.add_argument("--items-per-part", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--keep", default="", help="keep the output here instead of a temp dir")
    args = ap.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    import ray

    # A private Ray even when another local cluster is up (ray.init would attach to it).
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)
    from pipelines.render_objaverse import main as job_main
    from pipelines.objaverse_source import ANIMATED_LIST, TEST_LIST, read_uid_list
    tmp = Path(tempfile.mkdtemp(prefix="dryrun-"))
    server = None
    try:
        shipped = read_uid_list(ANIMATED_LIST)
        uids = sorted(set(shipped) | set(read_uid_list(TEST_LIST)))
        hub = tmp / "hub"
        (hub / "metadata").mkdir(parents=True)
        groups: dict[str, dict] = {}
        paths = {}
        for i, uid in enumerate(uids):
            group = f"000-{i % 160:03d}"
            paths[uid] = f"glbs/{group}/{uid}.glb"
            groups.setdefault(group, {})[uid] = {"uid": uid, "name": "", "animationCount": 1, "license": "by"}
        with gzip.open(hub / "object-paths.json.gz", "wt") as fh:
            json.dump(paths, fh)
        for group, anns in groups.items():
            with gzip.open(hub / "metadata" / f"{group}.json.gz", "wt") as fh:
                json.dump(anns, fh)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(hub)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        out = Path(args.keep) if args.keep else tmp / "out"
        argv = ["--preset", "paper", "--source", "objaverse", "--base-url", url, "--cache-dir", str(tmp / "cache"),
                "--output", str(out), "--dry-run", "true", "--items-per-part", str(args.items_per_part),
                "--concurrency", str(args.concurrency), "--cpus-per-worker", "1"]
        if args.assets:
            (tmp / "first.txt").write_text("\n".join(shipped[:args.assets]) + "\n")
            argv += ["--input", str(tmp / "first.txt")]
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
        listed = runs["first"]["items_ok_this_run"]
        report = {"machine": f"{os.cpu_count()} cores, {platform.machine()}", "list": str(ANIMATED_LIST.name),
                  "assets": listed, "parts": (listed + args.items_per_part - 1) // args.items_per_part,
                  "grid": "8 views x 16 frames, 8x8 PNG", "shards_gb": round(size / 1e9, 2), **runs}
        print(json.dumps(report, indent=1))
    finally:
        if server is not None:
            server.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


if __name__ == "__main__":
    main()
