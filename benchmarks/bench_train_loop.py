"""The real training job on a GPU: Ray Train + DeepSpeed (ZeRO-2, bf16, NCCL) + compiled blocks, paper preset (FP8 token matmuls: the base trained in them, the 4D stage's frozen base).

Where bench_model.py times bare model steps, this runs `training.launch.run` end to end on synthetic
shards of the paper's data shape (the loader, DeepSpeed, EMA, checkpointing and all) and reports the
loop's own status-line metrics: samples/s and MFU over the last logging window.

    python benchmarks/bench_train_loop.py --stage base   # the paper preset: 8-frame clips at 72x128, B=32, fp8 on
    python benchmarks/bench_train_loop.py --stage 4d     # 8x8 grid at 72x128, B=4, over a random base (fp8 on, the preset's)
    python benchmarks/bench_train_loop.py --stage upsampler   # 8-frame clips 72x128 -> 288x512, 8 x 2 a step (bf16, the preset's)
    python benchmarks/bench_train_loop.py --stage base --workers 2 --zero 3   # one Ray Train worker per GPU (NCCL)

samples/s is the whole job's (all workers); per GPU divide by --workers. MFU is per GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_loader import textured_grid  # noqa: E402

from pipelines.common.config import apply_overrides  # noqa: E402
from pipelines.common.shards import commit_part  # noqa: E402
from training.config import presets_for  # noqa: E402


def save_base(net, folder: Path) -> str:
    """``net`` (a VideoDiT) as a base-stage checkpoint in ``folder``, in the portable format, its weights in bf16 (the
    4D stage freezes its base in bf16; the base stage's master weights start from them in fp32): the folder's path."""
    import torch

    from pipelines.common.checkpoints import save_checkpoint
    return str(save_checkpoint(folder, {"stage": "base", "model_config": dataclasses.asdict(net.cfg), "state_dict":
                                        {k: v.to(torch.bfloat16) for k, v in net.state_dict().items()}}).parent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--stage", choices=("base", "upsampler", "4d"), default="base")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--grids", type=int, default=16)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="Ray Train workers, one GPU each")
    ap.add_argument("--batch", type=int, default=0, help="micro-batch per GPU (0 = the preset's)")
    ap.add_argument("--frames", type=int, default=0, help="base clip frames / 4D time steps (0 = the preset's)")
    ap.add_argument("--profile-at", type=int, default=0, help="profile 3 steps from this one (the job's "
                    "profile_at); the phase table is printed and written to --profile-out")
    ap.add_argument("--profile-out", default="", help="copy the run's profile/ folder here")
    ap.add_argument("--base-init", choices=("fresh", "random"), default="fresh",
                    help="base stage: train from a fresh adaLN-Zero model, as a pretraining run starts (its zero layers "
                    "pass back zero or tiny gradients at first), or from one whose zero parameters were drawn at "
                    "random (bench_model.fill_zero_parameters_), as a run's later steps see")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other TrainConfig override, e.g. data.loader_processes=4")
    args = ap.parse_args()
    if args.base_init != "fresh" and args.stage != "base":
        ap.error("--base-init is the base stage's (the 4D stage's frozen base is always bench_model.random_base)")
    with tempfile.TemporaryDirectory() as d:
        cfg = presets_for(args.stage)["paper"]()
        data = Path(d) / "grids"
        # at the stage's own frame size (the upsampler's 288x512 targets), so the loader decodes what it would
        size = (cfg.data.height, cfg.data.width)
        for p in range(0, args.grids, 4):
            commit_part(data, p // 4, [textured_grid(i, 8, 16, *size) for i in range(p, p + 4)], [])
        base_ckpt = ""
        if args.stage == "4d":  # a random paper base, exported in the portable format
            from bench_model import random_base
            from model.dit import DIT_PRESETS
            # no zero layers: gradients through it as through a trained one
            base_ckpt = save_base(random_base(DIT_PRESETS["paper"]), Path(d) / "base")
        cfg = apply_overrides(cfg, {
            "output": str(Path(d) / "run"), "num_workers": args.workers, "zero_stage": args.zero,
            "mlflow_uri": "none", "total_samples": args.steps * cfg.batch_size * cfg.grad_accum * args.workers, "log_every": 5, "sample_every": 0, "sample_steps": 2,
            "checkpoint_every": 0, "data.grids": [str(data)], "data.prefetch": 4, "base_checkpoint": base_ckpt,
            "optim.ema_decay": 0.999, "profile_at": args.profile_at,
            **({"batch_size": args.batch} if args.batch else {}), **({"data.frames": args.frames} if args.frames else {}),
            **dict(item.partition("=")[::2] for item in args.set)})
        cfg = apply_overrides(cfg, {"total_samples": args.steps * cfg.batch_size * cfg.grad_accum * args.workers})
        if args.stage == "base" and args.base_init == "random":
            from bench_model import fill_zero_parameters_
            from training.stages import BaseStage
            cfg = apply_overrides(cfg, {"init_from": save_base(fill_zero_parameters_(BaseStage(cfg).net),
                                                               Path(d) / "init")})
        from training.launch import run
        t0 = time.time()
        summary = run(cfg)
        metrics = summary["metrics"]
        phases = Path(cfg.output) / "profile" / "phases_rank0.json"
        profile = json.loads(phases.read_text()) if phases.is_file() else None
        if args.profile_out and phases.is_file():
            import shutil
            shutil.copytree(phases.parent, args.profile_out, dirs_exist_ok=True)
    print(json.dumps({"stage": args.stage, "base_init": args.base_init if args.stage == "base" else None,
                      "batch": cfg.batch_size, "zero": args.zero, "zero_run": cfg.zero_stage_run,
                      "steps": args.steps,
                      "workers": args.workers, "frames": cfg.data.frames, "overrides": args.set, "profile": profile,
                      "data_wait_last_window": metrics.get("data_wait"),
                      "wall_s": time.time() - t0, "samples_per_s_last_window": metrics.get("samples_per_s"),
                      "mfu_last_window": metrics.get("mfu"), "gpu_mem_gb": metrics.get("gpu_mem_gb")}, indent=2))


if __name__ == "__main__":
    main()
