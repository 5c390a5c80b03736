"""The blocks' GEMMs alone, bf16 against FP8 (tensorwise and rowwise scaling), forward and input-gradient layouts.

    python benchmarks/bench_fp8_gemm.py [--tokens 36864] [--json]

Why: model/fp8.py's two recipes run these GEMMs through ``torch._scaled_mm``; whether a recipe can pay for its
casts depends first on how much faster its GEMMs are than cuBLAS's bf16 ones at the paper preset's shapes (width
1024, SwiGLU hidden 4608). ``--tokens`` is M: 36864 is the 4D stage's micro-batch (4 grids of 8 x 8 frames of
144 tokens), 73728 the base stage's (32 clips of 16 frames). Times are CUDA-event medians; the casts are not
included (they are fused into other kernels in the model and measured there, by bench_model.py --fp8).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

WIDTH, HIDDEN = 1024, 4608
SHAPES = {"qkv": (WIDTH, 3 * WIDTH), "proj": (WIDTH, WIDTH), "w_in": (WIDTH, 2 * HIDDEN), "w_out": (HIDDEN, WIDTH)}
"""Each token linear of a block as (in K, out N)."""


def _time(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def bench(M: int, iters: int) -> dict:
    dev, e4 = "cuda", torch.float8_e4m3fn
    out = {}
    for name, (K, N) in SHAPES.items():
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        g = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        x8, g8, w8 = x.to(e4), g.to(e4), w.to(e4)
        w8_cm = w8.t().contiguous().t()
        one = torch.ones((), device=dev)
        rx, rg = torch.ones(M, 1, device=dev), torch.ones(M, 1, device=dev)
        rn, rk = torch.ones(1, N, device=dev), torch.ones(1, K, device=dev)
        flops = 2 * M * K * N
        row = {
            "bf16_fwd": _time(lambda: x @ w.t(), iters),
            "bf16_dgrad": _time(lambda: g @ w, iters),
            "tensorwise_fwd": _time(lambda: torch._scaled_mm(x8, w8.t(), one, one, out_dtype=torch.bfloat16), iters),
            "tensorwise_dgrad": _time(lambda: torch._scaled_mm(g8, w8_cm, one, one, out_dtype=torch.bfloat16), iters),
            "rowwise_fwd": _time(lambda: torch._scaled_mm(x8, w8.t(), rx, rn, out_dtype=torch.bfloat16), iters),
            "rowwise_dgrad": _time(lambda: torch._scaled_mm(g8, w8_cm, rg, rk, out_dtype=torch.bfloat16), iters),
        }
        out[name] = {"M": M, "K": K, "N": N, "ms": {k: round(v, 4) for k, v in row.items()},
                     "tflops": {k: round(flops / v / 1e9, 1) for k, v in row.items()}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[36864, 73728], help="M, the token rows of a GEMM")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8_gemm.py needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+)")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "by_tokens": {M: bench(M, args.iters) for M in args.tokens}}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['device']}, torch {result['torch']}: ms (TFLOP/s)")
    for M, rows in result["by_tokens"].items():
        for name, r in rows.items():
            cells = "  ".join(f"{k} {r['ms'][k]:.3f} ({r['tflops'][k]})" for k in r["ms"])
            print(f"M={M} {name} {r['K']}x{r['N']}: {cells}")


if __name__ == "__main__":
    main()
