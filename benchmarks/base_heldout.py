"""Base checkpoints scored on the same held-out clips: the velocity loss at fixed draws, and the frames they
generate from the first one.

    python benchmarks/base_heldout.py --checkpoints start=weights/proof/base.pt.gz,bf16=RUN/base_bf16/checkpoint_final \
        --grids heldout=DIR[,val=DIR] [--clips 512] [--batch 64] [--draws 4] [--steps 20] [--device auto] [--out FILE.json]

Why: a run's logged loss is one training batch per logged step, and a short continuation of a trained model
cannot tell learning from standing still (docs/results.md, "FP8 at the base"). Here every checkpoint sees the
same clips, drawn by the base stage's own loader (training/data.py: rows and columns of the grids, freeze-time
and dynamic, the given-frame masks it trains with) from grids it never trained on, with one fixed seed:

* ``loss``: the masked velocity MSE on the unknown frames, ``--draws`` flow times and noises per clip, the same
  draws for every checkpoint (the training loss, measured on held-out clips);
* ``psnr``: the clip generated from its first frame alone (the pattern the 4D model shows the base in every row
  and column but the first) with ``--steps`` Euler steps from the same noise, in dB against the truth over the
  generated frames.

Per set and checkpoint it prints the means, and for every checkpoint after the first its clip-by-clip
difference to the first (loss ratio, PSNR difference: mean, spread, on how many clips it is better). GPUs run
bf16 autocast (the job's precision), CPUs fp32; every checkpoint is scored alike, so the comparison is of the
trained weights, whatever precision trained them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import rectified_flow as rf  # noqa: E402
from pipelines.eval_metrics import PSNR_CAP_DB, psnr  # noqa: E402

MAX_DRAWS = 1000
"""Seeds are ``seed + MAX_DRAWS * batch + k``: draws take k < MAX_DRAWS - 1, the generation's noise the last."""


def _to01(v: torch.Tensor) -> torch.Tensor:
    return ((v.float() + 1) / 2).clamp(0, 1)


def load_base(spec: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The base DiT of a base (or 4D) checkpoint, and the data config it was trained with."""
    from pipelines.common.checkpoints import base_from_checkpoint, load_checkpoint
    ckpt = load_checkpoint(spec)
    return base_from_checkpoint(ckpt, spec), ckpt.get("config", {}).get("data", {})


def heldout_clips(spec: str, data: dict[str, Any], clips: int, batch: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``clips`` base examples from the grids at ``spec``, as the base stage's loader draws them (with the
    checkpoint's clip geometry and masks), in batches; the same seed gives the same clips."""
    from training.config import DataConfig
    from training.data import TrainLoader
    names = {f.name for f in dataclasses.fields(DataConfig)}
    cfg = DataConfig(**{k: v for k, v in data.items() if k in names})
    cfg = dataclasses.replace(cfg, grids=[spec], weights=[], clips=[], loader_processes=0, prefetch=0, seed=seed,
                              keep_filtered=[])
    loader = iter(TrainLoader("base", cfg, batch))
    out, left = [], clips
    while left > 0:
        b, _ = next(loader)
        out.append({k: v[:left] for k, v in b.items()})
        left -= len(out[-1]["x"])
    return out


@torch.no_grad()
def score(net: torch.nn.Module, batches: list[dict[str, torch.Tensor]], draws: int, steps: int,
          device: torch.device, seed: int) -> dict[str, list[float]]:
    """Per clip: the loss averaged over ``draws`` fixed draws, and the first-frame generation's PSNR."""
    net.to(device).eval()
    shift = net.cfg.flow_shift
    losses, psnrs = [], []
    for bi, b in enumerate(batches):
        x0, mask, context = (b[k].to(device) for k in ("x", "mask", "context"))
        fn = lambda xt, t, cond, m: net(xt, t, context, cond=cond, mask=m).float()  # noqa: E731
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            per = []
            for d in range(draws):
                g = torch.Generator(device).manual_seed(seed + MAX_DRAWS * bi + d)
                per.append(rf.training_loss(fn, x0, mask, generator=g, shift=shift, per_sample=True)[0].float())
            first = torch.zeros_like(mask)
            first[:, 0] = 1
            g = torch.Generator(device).manual_seed(seed + MAX_DRAWS * bi + MAX_DRAWS - 1)  # not a draw's seed
            noise = torch.randn(x0.shape, generator=g, device=device)
            gen = rf.sample(fn, noise, steps, cond=x0, mask=first, shift=shift).float()
        losses += torch.stack(per).mean(0).tolist()
        frame_psnr = psnr(_to01(gen[:, 1:]), _to01(x0[:, 1:])).clamp_max(PSNR_CAP_DB)  # [B, F-1], exact: the cap
        psnrs += frame_psnr.mean(1).tolist()
    net.cpu()
    return {"loss": losses, "psnr": psnrs}


def paired(ref: dict[str, list[float]], other: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """``other`` against ``ref`` clip by clip: loss ratio (lower is better; over the clips where ``ref`` has a loss,
    i.e. an unknown frame) and PSNR difference (higher is better)."""
    ref_loss = np.array(ref["loss"])
    ratio = np.array(other["loss"])[ref_loss > 0] / ref_loss[ref_loss > 0]
    diff = np.array(other["psnr"]) - np.array(ref["psnr"])
    return {"loss_ratio": {"mean": float(ratio.mean()), "std": float(ratio.std()), "min": float(ratio.min()),
                           "max": float(ratio.max()), "better": int((ratio < 1).sum())},
            "psnr_diff": {"mean": float(diff.mean()), "std": float(diff.std()), "min": float(diff.min()),
                          "max": float(diff.max()), "better": int((diff > 0).sum())}}


def evaluate(checkpoints: dict[str, str], grids: dict[str, str], clips: int = 512, batch: int = 64, draws: int = 4,
             steps: int = 20, device: str = "auto", seed: int = 1234) -> dict[str, Any]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    nets = {name: load_base(path) for name, path in checkpoints.items()}
    ref_name, (_, data) = next(iter(nets.items()))
    geometry = {k: data.get(k) for k in ("frames", "height", "width")}
    for name, (_, d) in nets.items():
        if {k: d.get(k) for k in geometry} != geometry:
            raise SystemExit(f"error: checkpoint '{name}' was trained on clips {d.get('frames')} x {d.get('height')}"
                             f" x {d.get('width')}, '{ref_name}' on {geometry['frames']} x {geometry['height']} x "
                             f"{geometry['width']}: scores on different clips would not compare")
    if not 1 <= draws < MAX_DRAWS:
        raise SystemExit(f"error: --draws must be 1 to {MAX_DRAWS - 1}, got {draws}")
    # the clips (contexts, masks) follow the first checkpoint's data config: recorded with the scores
    out: dict[str, Any] = {"config": {"clips": clips, "batch": batch, "draws": draws, "steps": steps, "seed": seed,
                                      "device": str(dev), "geometry": geometry, "checkpoints": checkpoints,
                                      "grids": grids, "data": data}, "sets": {}}
    for set_name, spec in grids.items():
        batches = heldout_clips(spec, data, clips, batch, seed)
        scores = {name: score(net, batches, draws, steps, dev, seed) for name, (net, _) in nets.items()}
        contexts = torch.cat([b["context"] for b in batches])
        out["sets"][set_name] = {
            "clips": len(contexts), "freeze_time_clips": int((contexts == 1).sum()),
            "checkpoints": {n: {"loss": float(np.mean(s["loss"])), "psnr": float(np.mean(s["psnr"])), "per_clip": s}
                            for n, s in scores.items()},
            "paired": {n: paired(scores[ref_name], s) for n, s in scores.items() if n != ref_name}}
    return out


def report(result: dict[str, Any]) -> str:
    lines = []
    for set_name, s in result["sets"].items():
        names = list(s["checkpoints"])
        lines.append(f"{set_name} ({s['clips']} clips, {s['freeze_time_clips']} freeze-time): " + "; ".join(
            f"{n} loss {c['loss']:.5f} psnr {c['psnr']:.2f} dB" for n, c in s["checkpoints"].items()))
        for n, p in s["paired"].items():
            r, d = p["loss_ratio"], p["psnr_diff"]
            lines.append(f"  {n} vs {names[0]}, per clip: loss ratio {r['mean']:.4f} ± {r['std']:.4f} "
                         f"(lower on {r['better']}/{s['clips']}), psnr {d['mean']:+.3f} ± {d['std']:.3f} dB "
                         f"(higher on {d['better']}/{s['clips']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoints", required=True, help="name=path,...: base checkpoints; the first is the reference")
    ap.add_argument("--grids", required=True, help="held-out grid sets as evaluate_4d.py takes them: name=path,... "
                    "(shard folders or tar globs; a bare path is named after its folder)")
    ap.add_argument("--clips", type=int, default=512, help="clips per set")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--draws", type=int, default=4, help="flow times and noises per clip for the loss")
    ap.add_argument("--steps", type=int, default=20, help="Euler steps of the generation")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=1234, help="clips, draws and generation noise")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON (with per-clip scores) here")
    args = ap.parse_args(argv)
    if min(args.clips, args.batch, args.draws, args.steps) < 1:
        raise SystemExit("error: --clips, --batch, --draws and --steps must be >= 1")
    t0 = time.time()
    from pipelines.common.errors import UserError
    from pipelines.evaluation import parse_checkpoints, parse_grid_sets
    try:  # evaluate_4d.py's parsers, so both tools take the same --checkpoints and --grids
        checkpoints = parse_checkpoints(args.checkpoints, example="start=weights/proof/base.pt.gz")
        grids = parse_grid_sets(args.grids)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    result = evaluate(checkpoints, grids, args.clips, args.batch, args.draws, args.steps,
                      args.device, args.seed)
    result["seconds"] = time.time() - t0
    print(report(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
