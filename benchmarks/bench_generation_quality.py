"""What the fast generation path costs in quality: the shipped proof model (4D + x4 upsampler) fills held-out
grids with the fast sampler settings and with a many-step reference, from the same noise, and the two
outputs are compared (PSNR / SSIM of fast against reference, x4 frames), beside each one's PSNR against the
truth at the model's resolution and its wall time.

    python benchmarks/bench_generation_quality.py --grids outputs/proof/data/render_heldout \
        --fast euler:20:2 --reference heun:50:20 --max-grids 12 --json results.json

A sampler is method:4D steps:upsampler steps. On CPU it runs, slowly (the tests run one grid at 2 steps);
docs/performance.md has the H100 figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.common.shards import LazyGrid, iter_tar_samples, resolve_shards  # noqa: E402
from pipelines.eval_metrics import psnr, ssim  # noqa: E402
from pipelines.generation import GenerateConfig, Generator4D, frames_to_tensor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse(text: str) -> tuple[str, int, int]:
    method, steps, up = text.split(":")
    return method, int(steps), int(up)


def heldout(spec: str, n: int, window: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """The first n grids of a held-out set, cropped to the model's window, [N, V, T, 3, H, W] in [-1, 1]."""
    V, T = window
    out = []
    for shard in resolve_shards(spec):
        for _, files in iter_tar_samples(shard):
            grid = LazyGrid(files)
            if grid.shape[0] >= V and grid.shape[1] >= T:
                out.append(frames_to_tensor(grid.cells(range(V), range(T)), *size))
            if len(out) == n:
                return torch.stack(out)
    if not out:
        raise SystemExit(f"no grid of at least {V}x{T} in {spec}")
    return torch.stack(out)


def run(weights: Path, sampler: tuple[str, int, int], truth: torch.Tensor, device: str,
        compile_: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(x4 grids, 4D grids at the model's size, seconds per grid after a warm-up grid)."""
    method, steps, up_steps = sampler
    common = dict(checkpoint=str(weights / "soft.pt.gz"), steps=steps, method=method, device=device,
                  compile=compile_)
    gen = Generator4D(GenerateConfig(**common, upsampler=str(weights / "upsampler.pt.gz"), upsampler_steps=up_steps))
    up, gen.upsampler = gen.upsampler, None  # the 4D grids alone first, to score against the truth
    low, _ = gen.generate_batch(truth[:, 0], truth[:, :, 0], list(range(len(truth))))
    gen.upsampler = up
    gen.generate(truth[0, 0], truth[0, :, 0], seed=0)  # warm-up (compiles on a GPU)
    if torch.cuda.is_available() and device != "cpu":
        torch.cuda.synchronize()
    t0 = time.time()
    high = torch.stack([gen.generate(truth[i, 0], truth[i, :, 0], seed=i)[0] for i in range(len(truth))])
    if torch.cuda.is_available() and device != "cpu":
        torch.cuda.synchronize()
    return high, low, (time.time() - t0) / len(truth)


def compare(a: torch.Tensor, b: torch.Tensor, given: torch.Tensor) -> dict[str, float]:
    """Mean PSNR / SSIM over the generated cells of grids a and b ([N, V, T, 3, H, W] in [-1, 1])."""
    todo = ~given.bool()
    x, y = ((a[:, todo] + 1) / 2).flatten(0, 1), ((b[:, todo] + 1) / 2).flatten(0, 1)
    return {"psnr": float(psnr(x, y).mean()), "ssim": float(ssim(x, y).mean())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=str(ROOT / "weights" / "proof"))
    ap.add_argument("--grids", default=str(ROOT / "weights" / "proof" / "heldout"))
    ap.add_argument("--max-grids", type=int, default=12)
    ap.add_argument("--fast", default="euler:20:2", help="method:4D steps:upsampler steps")
    ap.add_argument("--reference", default="heun:50:20")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", type=int, default=1)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    from model.fourd import grid_condition_mask
    weights = Path(args.weights)
    probe = Generator4D(GenerateConfig(checkpoint=str(weights / "soft.pt.gz"), device="cpu", compile=False))
    truth = heldout(args.grids, args.max_grids, probe.window, probe.size)
    given = grid_condition_mask(1, *probe.window)[0]
    res: dict = {"grids": len(truth), "window": list(probe.window), "size": list(probe.size),
                 "fast": args.fast, "reference": args.reference, "device": args.device}
    outs = {}
    for name in ("fast", "reference"):
        high, low, sec = run(weights, parse(getattr(args, name)), truth, args.device, bool(args.compile))
        outs[name] = high
        res[name + "_seconds_per_grid"] = sec
        res[name + "_vs_truth_4d"] = compare(low, truth, given)
        print(f"[quality] {name} {getattr(args, name)}: {sec:.2f} s a grid; 4D PSNR against the truth "
              f"{res[name + '_vs_truth_4d']['psnr']:.2f} dB", flush=True)
    res["fast_vs_reference_x4"] = compare(outs["fast"], outs["reference"], given)
    print(f"[quality] fast against reference, x4 frames: PSNR {res['fast_vs_reference_x4']['psnr']:.2f} dB, "
          f"SSIM {res['fast_vs_reference_x4']['ssim']:.4f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
