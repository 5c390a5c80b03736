"""Speed of the models (issue 5): training-step throughput and MFU, end-to-end generation time.

Three measurements on random weights in bf16:

* ``base_train``: one optimizer step of the base VideoDiT on B clips of F frames
  (default 16 frames at 72x128); MFU = 3 x forward FLOPs / step time / peak.
* ``fourd_train``: one optimizer step of the 4D model (soft sync, frozen bf16 base) on
  B grids of V x T (default 8x8 at 72x128); MFU from ``FourDModel.train_flops_per_sample``
  (frozen GEMMs cost 1x forward in the backward pass, attention and sync 2x).
* ``generate``: 4D sampling of an 8x8 grid at 72x128 from its first row and column,
  then the x4 upsampler to 288x512, timed end to end.

``sweep`` runs a fixed list of variants (eager/compiled, SDPA backend, batch) each in
its own process (an OOM or a compile failure costs one row, not the run), appends
each result to a JSON file as it lands, and prints a table last.

    PYTHONPATH=. python benchmarks/bench_model.py sweep --out results.json       # on a GPU
    PYTHONPATH=. python benchmarks/bench_model.py base_train --device cpu --preset tiny --height 16 --width 16
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import (DIT_PRESETS, UPSAMPLER_PRESETS, DiTConfig, FourDConfig, FourDModel, VideoDiT,  # noqa: E402
                   VideoUpsampler, grid_condition_mask)
from model import rectified_flow as rf  # noqa: E402
from model.fp8 import enable_fp8  # noqa: E402

# Dense bf16 tensor-core peaks (datasheet, no sparsity), the denominator of MFU.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def sdpa_context(backend: str):
    if backend == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds per call, each timed alone (events on GPU), after warm-up calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def maybe_profile(args, step) -> None:
    """--profile: the kernels that take the GPU time of a few steps, largest first (stderr)."""
    if not args.profile:
        return
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.profile_rows, max_name_column_width=90),
          file=sys.stderr, flush=True)


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def case_matmul(args, device) -> dict:
    n = args.matmul_size
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = time_steps(lambda: a @ b, device, 3, 10)
    return {"tflops": 2 * n ** 3 / statistics.median(times) / 1e12}


def random_video(shape, device, generator) -> torch.Tensor:
    return torch.rand(shape, device=device, generator=generator) * 2 - 1


def dit_preset(args):
    """The named DiT preset with the ``--model key=value`` overrides (e.g. patch_size=8) applied and type-checked
    by the jobs' own config parser."""
    from pipelines.common.config import ConfigError, apply_overrides
    try:
        return apply_overrides(DIT_PRESETS[args.preset], dict(item.partition("=")[::2] for item in args.model))
    except ConfigError as exc:
        raise SystemExit(f"error: --model: {exc}") from None


def case_base_train(args, device, dtype) -> dict:
    cfg = dataclasses.replace(dit_preset(args), checkpointing=bool(args.checkpointing))
    with torch.device(device):
        model = VideoDiT(cfg)
    if args.fp8:
        for block in model.blocks:
            enable_fp8(block)
    if args.compile:
        model.compile_blocks(**_compile_kwargs(args))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator(device).manual_seed(0)
    B, Fr = args.batch, args.frames
    x0 = random_video((B, Fr, 3, args.height, args.width), device, g)
    mask = torch.zeros(B, Fr, device=device)
    mask[: B // 2, 0] = 1  # half the clips are image-to-video
    context = torch.arange(B, device=device) % 2

    def step():
        with autocast(device, dtype):
            loss, _ = rf.training_loss(lambda x, t, c, m: model(x, t, context, c, m), x0, mask, g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = time_steps(step, device, args.warmup, args.iters)
    maybe_profile(args, step)
    flops = 3 * model.flops_per_sample(Fr, args.height, args.width) * B
    return summarize(times, flops, B, device, params=model.num_parameters(),
                     extra={"frames_per_s": B * Fr / statistics.median(times)})


def fill_zero_parameters_(model: torch.nn.Module) -> torch.nn.Module:
    """Every all-zero parameter of ``model`` (a DiT's adaLN-Zero modulation and output layers, its biases, the null
    text embedding) drawn from N(0, 0.02), in place: values of a trained model's order, so that no gradient through it
    is exactly zero. A fresh DiT outputs zeros and passes back exactly zero gradients, and H100s run GEMMs over zeros
    faster (presumably less power, higher clocks): that overstated the 4D step's speed by 8% (docs/performance.md,
    session 18)."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return model


def random_base(cfg: DiTConfig, seed: int = 0) -> VideoDiT:
    """A random base for the 4D benchmarks, without adaLN-Zero's zero layers (``fill_zero_parameters_``). Seeded,
    so that runs compared in one call (before/after a change) train over the same base and log the same losses."""
    with torch.random.fork_rng():  # the caller's random stream goes on as if this had drawn nothing
        torch.manual_seed(seed)
        return fill_zero_parameters_(VideoDiT(cfg))


def build_fourd(args, device, dtype, sync_variant: str = "soft") -> FourDModel:
    with torch.device(device):
        base = random_base(dit_preset(args))
    base.to(dtype)  # frozen: kept in bf16, no fp32 master copy needed
    model = FourDModel(base, FourDConfig(sync=sync_variant)).to(device)
    if args.checkpointing:
        base.cfg.checkpointing = True
    if args.fp8:
        for block in base.blocks:
            enable_fp8(block)
    if args.compile:
        model.compile_blocks(**_compile_kwargs(args))
    return model


def case_fourd_train(args, device, dtype) -> dict:
    model = build_fourd(args, device, dtype)
    opt = torch.optim.AdamW(model.sync_parameters(), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator(device).manual_seed(0)
    B, V, T = args.batch, args.views, args.frames
    x0 = random_video((B, V, T, 3, args.height, args.width), device, g)
    mask = grid_condition_mask(B, V, T, device)

    def step():
        with autocast(device, dtype):
            loss, _ = rf.training_loss(lambda x, t, c, m: model(x, t, c, m), x0, mask, g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = time_steps(step, device, args.warmup, args.iters)
    maybe_profile(args, step)
    flops = model.train_flops_per_sample(V, T, args.height, args.width) * B
    return summarize(times, flops, B, device, params=sum(p.numel() for p in model.sync_parameters()),
                     extra={"grids_per_s": B / statistics.median(times)})


def case_generate(args, device, dtype) -> dict:
    fourd = build_fourd(args, device, dtype)
    fourd.to(dtype).eval()
    with torch.device(device):
        up = fill_zero_parameters_(VideoUpsampler(UPSAMPLER_PRESETS[args.up_preset]))  # no zero output, as trained
    up.to(dtype).eval()
    if args.compile:
        up.dit.compile_blocks(**_compile_kwargs(args))
    g = torch.Generator(device).manual_seed(0)
    V, T, h, w = args.views, args.frames, args.height, args.width
    given = random_video((1, V, T, 3, h, w), device, g)
    mask = grid_condition_mask(1, V, T, device)
    timings: dict[str, list[float]] = {"fourd_s": [], "upsample_s": [], "total_s": []}

    def generate(steps_4d: int, steps_up: int, record: bool) -> torch.Tensor:
        sync(device)
        t0 = time.perf_counter()
        noise = torch.randn(given.shape, device=device, generator=g)
        # Weights are bf16; autocast runs the fp32 sampler state through them, the state stays fp32.
        with autocast(device, dtype):
            lowres = rf.sample(lambda x, t, c, m: fourd(x, t, c, m), noise, steps_4d, args.method, cond=given,
                               mask=mask)
            sync(device)
            t1 = time.perf_counter()
            # Each grid row is a fixed-view video: V clips of T frames.
            hr = up.upsample(lowres[0].clamp(-1, 1), steps=steps_up, method=args.method, generator=g)
        sync(device)
        t2 = time.perf_counter()
        if record:
            timings["fourd_s"].append(t1 - t0)
            timings["upsample_s"].append(t2 - t1)
            timings["total_s"].append(t2 - t0)
        return hr

    with torch.inference_mode():
        hr = generate(2, 2, record=False)  # warm-up: compilation, kernel selection
        for _ in range(args.iters):
            hr = generate(args.steps_4d, args.steps_up, record=True)
    assert hr.shape == (V, T, 3, h * 4, w * 4) and torch.isfinite(hr).all()
    def calls(steps: int) -> int:  # model calls of a sampler: Heun's last step is Euler (model/rectified_flow.py)
        return 2 * steps - 1 if args.method == "heun" else steps
    f4 = fourd.flops_per_sample(V, T, h, w) * calls(args.steps_4d)
    fu = up.flops_per_sample(V * T, h * 4, w * 4) * calls(args.steps_up)
    out = {k: statistics.median(v) for k, v in timings.items()}
    out.update({"steps_4d": args.steps_4d, "steps_up": args.steps_up, "method": args.method, "output": list(hr.shape),
                "fourd_tflops_per_s": f4 / out["fourd_s"] / 1e12, "up_tflops_per_s": fu / out["upsample_s"] / 1e12,
                "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None})
    return out


def summarize(times: list[float], flops: float, batch: int, device: torch.device, params: int, extra: dict) -> dict:
    med = statistics.median(times)
    peak = peak_flops(device)
    out = {"step_s": med, "step_s_min": min(times), "step_s_max": max(times), "samples_per_s": batch / med,
           "tflops_per_step": flops / 1e12, "achieved_tflops": flops / med / 1e12,
           "mfu": flops / med / peak if peak else None, "trainable_params": params,
           "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None}
    out.update(extra)
    return out


def run_case(args) -> dict:
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    info = {"case": args.case, "preset": args.preset, "model": args.model, "batch": args.batch, "compile": bool(args.compile),
            "compile_mode": args.compile_mode if args.compile else None,
            "compile_tuning": bool(args.tune) if args.compile else None,
            "attn": args.attn, "checkpointing": bool(args.checkpointing), "fp8": bool(args.fp8), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    torch.manual_seed(0)
    with sdpa_context(args.attn):
        if args.case == "matmul":
            info.update(case_matmul(args, device))
        elif args.case == "base_train":
            info.update(case_base_train(args, device, dtype))
        elif args.case == "fourd_train":
            info.update(case_fourd_train(args, device, dtype))
        else:
            info.update(case_generate(args, device, dtype))
    return info


# The variants tried on a GPU, in order of importance (the budget may cut the tail).
SWEEP = [
    ["matmul"],
    ["base_train", "--batch", "8", "--compile", "1"],
    ["base_train", "--batch", "16", "--compile", "1"],
    ["fourd_train", "--batch", "1", "--compile", "1"],
    ["fourd_train", "--batch", "2", "--compile", "1"],
    ["generate", "--compile", "1"],
    ["base_train", "--batch", "8", "--compile", "0"],
    ["fourd_train", "--batch", "1", "--compile", "0"],
    ["base_train", "--batch", "16", "--compile", "1", "--attn", "cudnn"],
    ["fourd_train", "--batch", "2", "--compile", "1", "--attn", "cudnn"],
    ["generate", "--compile", "0"],
]


def sweep(args) -> None:
    deadline = time.monotonic() + args.budget
    results = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for case in SWEEP:
        left = deadline - time.monotonic()
        if left < 30:
            print(f"[sweep] budget spent, skipping {' '.join(case)}", flush=True)
            results.append({"argv": case, "error": "skipped: budget"})
            continue
        cmd = [sys.executable, __file__, *case, "--json"]
        print(f"[sweep] {' '.join(case)} (timeout {min(left, args.case_timeout):.0f}s)", flush=True)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=min(left, args.case_timeout),
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(lines[-1]) if proc.returncode == 0 and lines else \
                {"error": (proc.stderr or proc.stdout)[-1500:]}
        except subprocess.TimeoutExpired:
            row = {"error": "timeout"}
        row.update({"argv": case, "wall_s": time.monotonic() - t0})
        print(json.dumps(row), flush=True)
        results.append(row)
        out.write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: list[dict]) -> None:
    print("\ncase                                         step/total s   TFLOP/s    MFU   mem GiB")
    for r in results:
        name = " ".join(r["argv"])[:44]
        if "error" in r:
            print(f"{name:44s} ERROR {r['error'].strip().splitlines()[-1][:80] if r['error'].strip() else ''}")
        elif r["argv"][0] == "matmul":
            print(f"{name:44s} {'':12s} {r['tflops']:8.1f}")
        elif r["argv"][0] == "generate":
            print(f"{name:44s} {r['total_s']:12.2f} 4d {r['fourd_s']:.2f}s up {r['upsample_s']:.2f}s  "
                  f"mem {r['peak_mem_gib']:.1f}")
        else:
            mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") else "   -  "
            print(f"{name:44s} {r['step_s']:12.3f} {r['achieved_tflops']:8.1f} {mfu} {r['peak_mem_gib'] or 0:8.1f}")


def _compile_kwargs(args) -> dict:
    return {"tune": bool(args.tune), **({} if args.compile_mode == "default" else {"mode": args.compile_mode})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=["sweep", "matmul", "base_train", "fourd_train", "generate"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--preset", default="paper", choices=sorted(DIT_PRESETS))
    parser.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the DiT preset, e.g. --model patch_size=8 (repeatable)")
    parser.add_argument("--up-preset", default="paper", choices=sorted(UPSAMPLER_PRESETS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=None, help="frames per clip (base) or T of the grid")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--height", type=int, default=72)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--compile", type=int, default=0)
    parser.add_argument("--tune", type=int, default=0, help="with --compile 1: inductor's kernel tuning at compile "
                        "time (model/dit.py: TUNED_COMPILE; the paper preset's compile_tuning)")
    parser.add_argument("--compile-mode", default="default", choices=["default", "max-autotune-no-cudagraphs"],
                        help="torch.compile mode of the blocks (max-autotune: Triton GEMM templates with fused "
                             "epilogues, autotuned against cuBLAS; minutes of compilation)")
    parser.add_argument("--checkpointing", type=int, default=0)
    parser.add_argument("--fp8", type=int, default=0, help="the blocks' token matmuls in FP8 (model/fp8.py)")
    parser.add_argument("--attn", default="default", choices=["default", "flash", "cudnn", "efficient", "math"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--steps-4d", type=int, default=20, help="sampling steps of the 4D model (generation's default)")
    parser.add_argument("--steps-up", type=int, default=2, help="sampling steps of the upsampler (its presets' default)")
    parser.add_argument("--method", default="euler", choices=["euler", "heun"], help="generate: sampler (heun = 2 calls a step)")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--profile", action="store_true", help="print the top GPU kernels of 3 steps (stderr)")
    parser.add_argument("--profile-rows", type=int, default=25, help="how many kernels --profile prints")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    parser.add_argument("--out", default="bench_model.json", help="sweep: results file")
    parser.add_argument("--budget", type=float, default=540, help="sweep: seconds for all variants")
    parser.add_argument("--case-timeout", type=float, default=200, help="sweep: seconds per variant")
    args = parser.parse_args()
    if args.frames is None:
        args.frames = 8 if args.case in ("fourd_train", "generate") else 16
    if args.case == "generate" and args.iters == 10:
        args.iters = 2
    if args.case == "sweep":
        sweep(args)
        return
    result = run_case(args)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
