"""Input-pipeline throughput: samples/s of the training loader alone, at the paper's shapes.

Writes synthetic grid shards (8 views x 16 frames, 72x128 RGB PNG, textured so
PNG does not compress them unrealistically well) through the real shard writer,
then times ``TrainLoader`` for the base stage (16-frame clips) and the 4D stage
(8x8 windows) in one process on one core. Compare with the GPU step rate of the
paper preset (benchmarks/bench_model.py) to see how many loader cores a GPU needs.

    .venv/bin/python benchmarks/bench_loader.py [--grids 24] [--samples 60] [--gpu-samples-per-s-base X --gpu-samples-per-s-4d Y]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from pipelines.common.shards import Sample, commit_part, json_bytes  # noqa: E402
from training.config import DataConfig  # noqa: E402
from training.data import TrainLoader  # noqa: E402


def textured_grid(i: int, views: int, frames: int, h: int, w: int) -> Sample:
    rng = np.random.default_rng(i)
    base = rng.integers(0, 255, (h * 2, w * 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(base).filter(ImageFilter.GaussianBlur(2)))  # photo-like, not white noise
    files = {}
    for v in range(views):
        for t in range(frames):
            crop = base[t % h: t % h + h, (3 * v) % w: (3 * v) % w + w]
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(crop)).save(buf, format="PNG", compress_level=1)
            files[f"v{v:02d}t{t:02d}.png"] = buf.getvalue()
    files["meta.json"] = json_bytes({"kind": "pseudo4d", "views": views, "frames": frames})
    return Sample(key=f"g{i:05d}", item_id=f"g{i}", files=files, kind="pseudo4d", views=views, frames=frames,
                  height=h, width=w)


def time_loader(stage: str, cfg: DataConfig, batch: int, samples: int) -> float:
    it = iter(TrainLoader(stage, cfg, batch))
    next(it)  # open the first shard
    t0 = time.perf_counter()
    n = 0
    while n < samples:
        next(it)
        n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--grids", type=int, default=24)
    ap.add_argument("--samples", type=int, default=60)
    ap.add_argument("--gpu-samples-per-s-base", type=float, default=0.0, help="paper-preset base step rate on 1 GPU")
    ap.add_argument("--gpu-samples-per-s-4d", type=float, default=0.0, help="paper-preset 4D step rate on 1 GPU")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        t0 = time.perf_counter()
        for p in range(0, args.grids, 4):
            commit_part(out, p // 4, [textured_grid(i, 8, 16, 72, 128) for i in range(p, min(args.grids, p + 4))], [])
        write_s = time.perf_counter() - t0
        mb = sum(f.stat().st_size for f in (out / "shards").glob("*.tar")) / 2 ** 20
        common = dict(grids=[str(out)], height=72, width=128, shuffle_buffer=8, prefetch=0)
        base = time_loader("base", DataConfig(frames=16, **common), 4, args.samples)
        four = time_loader("4d", DataConfig(frames=8, views=8, **common), 1, args.samples // 4)
    result = {"machine": "dev box, 1 core used (torch threads 1)", "grid": "8x16 @ 72x128 PNG",
              "shard_mb_per_grid": mb / args.grids, "write_s_per_grid": write_s / args.grids,
              "base_clips_per_s_per_core": base, "fourd_grids_per_s_per_core": four}
    for key, rate, gpu in (("base", base, args.gpu_samples_per_s_base), ("4d", four, args.gpu_samples_per_s_4d)):
        if gpu:
            result[f"{key}_loader_cores_per_gpu"] = gpu / rate
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
