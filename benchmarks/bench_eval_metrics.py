"""The evaluation's per-grid metrics, timed on CPU: SSIM as shipped (separable, two matrix products) against the
2-D Gaussian window as grouped convolutions (how it was computed until 2026-11-25), and a whole grid_report.

    .venv/bin/python benchmarks/bench_eval_metrics.py [--reps 5]

Why: on the GPU machine, scoring 60 held-out proof grids took 110 s for a baseline that samples nothing, against
15-33 s for a model's row today: SSIM in float64 grouped convolutions was 90% of an evaluation. Shapes: the
proof's 8 x 8 grids at 64 x 64 and one 4 x 4 block at the paper's 288 x 512. Both ways are run alternately in
one process, best of ``--reps``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.eval_metrics import _gaussian, grid_report, ssim  # noqa: E402


def ssim_2d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM with the 11x11 window as one grouped 2-D convolution per moment (the reference computation)."""
    lead = a.shape[:-3]
    c, h, w = a.shape[-3:]
    x, y = a.reshape(-1, c, h, w).double(), b.reshape(-1, c, h, w).double()
    g = _gaussian(min(11, h - (1 - h % 2), w - (1 - w % 2)))
    k = (g[:, None] * g[None, :]).expand(c, 1, -1, -1).contiguous()
    f = lambda z: F.conv2d(z, k, groups=c)  # noqa: E731
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).reshape(lead)


def best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, shape in [("proof grid 8x8 at 64x64", (8, 8, 3, 64, 64)), ("4x4 at 288x512", (4, 4, 3, 288, 512))]:
        a = torch.rand(shape)
        b = (a + 0.1 * torch.randn(shape)).clamp(0, 1)
        err = float((ssim(a, b) - ssim_2d(a, b)).abs().max())
        two_d = best(lambda: ssim_2d(a, b), args.reps)
        shipped = best(lambda: ssim(a, b), args.reps)
        given = torch.zeros(shape[:2])
        given[0], given[:, 0] = 1, 1
        report = best(lambda: grid_report(a, b, given, a[:, :, :1] > 0.5), args.reps)
        print(f"{name}: SSIM 2-D convolution {two_d * 1e3:8.1f} ms, shipped {shipped * 1e3:7.1f} ms "
              f"({two_d / shipped:4.1f}x; max difference {err:.1e}); grid_report {report * 1e3:7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
