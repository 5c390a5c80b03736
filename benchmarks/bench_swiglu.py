"""SwiGLU's gating backward: autograd's compiled kernel against model/swiglu.py's, at the paper preset's shapes.

Times the gating alone (silu(gate) * value on h = [gate | value], forward and backward, compiled) and the whole
SwiGLU layer (w_in, gating, w_out), each written both ways, alternated in one process; checks that the two
backward passes agree with each other and with an fp32 reference. One JSON line a case.

    PYTHONPATH=. python benchmarks/bench_swiglu.py                      # on a GPU: 36864 tokens, 1024 -> 4608
    PYTHONPATH=. python benchmarks/bench_swiglu.py --device cpu --tokens 256 --width 64 --hidden 128 --iters 3
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch
import torch.nn.functional as F

from model.swiglu import swiglu, swiglu_backward_reference, uses_kernel


def autograd_gating(h: torch.Tensor) -> torch.Tensor:
    """The gating as the blocks wrote it before model/swiglu.py: autograd derives the backward."""
    gate, value = h.chunk(2, dim=-1)
    return F.silu(gate) * value


def timed(fn: Callable[[], object], iters: int, device: str) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=36864, help="rows (the base's 32 clips x 1152 tokens)")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=4608)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two ways")
    args = ap.parse_args()
    dev, dt = args.device, torch.bfloat16
    torch.manual_seed(0)
    h = torch.randn(args.tokens, 2 * args.hidden, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(args.tokens, args.hidden, device=dev, dtype=dt)
    x = torch.randn(args.tokens, args.width, device=dev, dtype=dt, requires_grad=True)
    w_in = torch.randn(2 * args.hidden, args.width, device=dev, dtype=dt, requires_grad=True)
    w_out = torch.randn(args.width, args.hidden, device=dev, dtype=dt, requires_grad=True)
    gy = torch.randn(args.tokens, args.width, device=dev, dtype=dt)
    ways = {"autograd": autograd_gating, "kernel": swiglu}
    gating_steps = {n: torch.compile(f) for n, f in ways.items()}  # compiled once: checked, then timed
    layer_steps = {n: torch.compile(lambda a, f=f: F.linear(f(F.linear(a, w_in)), w_out)) for n, f in ways.items()}

    grads = {n: torch.autograd.grad(step(h), h, g)[0].float() for n, step in gating_steps.items()}
    ref = swiglu_backward_reference(h.detach().float(), g.float())
    check = {"kernel_used": uses_kernel(h, g),
             "max_abs_kernel_vs_autograd": (grads["kernel"] - grads["autograd"]).abs().max().item(),
             "max_abs_autograd_vs_fp32": (grads["autograd"] - ref).abs().max().item(),
             "max_abs_kernel_vs_fp32": (grads["kernel"] - ref).abs().max().item(),
             "ref_abs_max": ref.abs().max().item()}
    print(json.dumps({"check": check, "device": torch.cuda.get_device_name() if dev == "cuda" else dev,
                      "tokens": args.tokens, "width": args.width, "hidden": args.hidden}), flush=True)

    def gating_step(n: str) -> Callable[[], object]:
        return lambda: torch.autograd.grad(gating_steps[n](h), h, g)

    def layer_step(n: str) -> Callable[[], object]:
        return lambda: torch.autograd.grad(layer_steps[n](x), (x, w_in, w_out), gy)

    for r in range(args.rounds):
        for case, step in (("gating", gating_step), ("layer", layer_step)):
            for n in ways:
                ms = timed(step(n), args.iters, dev)
                print(json.dumps({"round": r, "case": case, "way": n, "ms": round(ms, 4)}), flush=True)


if __name__ == "__main__":
    main()
