"""Training-loader throughput at the proof run's shapes (64x64 pseudo-4D grids), by loader layout.

The proof run on an H100 was loader-bound (docs/results.md: 225 base clips/s with the GPU 3% busy). This
times base clips (8 frames) and 4D grids (8 x 8) through the loader the training loop uses
(``training.data.make_loader``) in three layouts, in one run so the ratios are comparable:
in the training process with one decode thread, with ``--threads`` decode threads, and in ``--processes``
loader processes. Data: the pseudo-4D job's ``proof`` preset on ``--videos`` procedural videos.

    .venv/bin/python benchmarks/bench_loader_proof.py [--videos 24] [--seconds 8] [--threads 4] [--processes 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from training.config import DataConfig  # noqa: E402
from training.data import make_loader  # noqa: E402


def rate(stage: str, cfg: DataConfig, batch: int, seconds: float) -> float:
    loader = make_loader(stage, cfg, batch)
    it = iter(loader)
    next(it)  # start-up (process spawn, first shards) is not throughput
    n, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        next(it)
        n += batch
    if hasattr(loader, "close"):
        loader.close()
    return n / (time.time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--videos", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, str(ROOT / "pipelines/make_pseudo4d.py"), "--preset", "proof", "--output", d,
                        "--procedural.count", str(args.videos), "--concurrency", "2", "--items-per-part", "4"],
                       check=True, capture_output=True)
        base = DataConfig(grids=[d], frames=8, views=8, height=64, width=64, shuffle_buffer=16, prefetch=2)
        layouts = {"1 thread": {}, f"{args.threads} threads": {"decode_threads": args.threads},
                   f"{args.processes} processes": {"loader_processes": args.processes}}
        out = {}
        for stage, batch in (("base", 64), ("4d", 8)):
            for name, kw in layouts.items():
                out[f"{stage} | {name}"] = rate(stage, dataclasses.replace(base, **kw), batch, args.seconds)
                print(f"{stage:5s} {name:12s} {out[f'{stage} | {name}']:8.1f} samples/s", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
