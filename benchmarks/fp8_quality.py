"""What the 4D stage's FP8 base (model/fp8.py, ``fp8=true``) does to a trained 4D model, on held-out grids.

    python benchmarks/fp8_quality.py [--checkpoint weights/proof/soft.pt.gz] [--grids weights/proof/heldout]
                                     [--draws 16] [--steps 20] [--device cpu|cuda] [--out FILE.json]

The same 4D model runs three ways: fp32 (the reference), bf16 autocast (the job's precision) and bf16 autocast
with the frozen base's token matmuls in FP8 (FrozenFloat8Linear). For each it reports, on the held-out grids:

* the training loss (velocity matching on the unknown cells, ``--draws`` flow times and noises per grid, the
  same draws for every precision) and the sync layers' gradient, as cosine to fp32: FP8 trains the sync layers
  on this loss and this gradient, so this is what training would see;
* the velocity's relative error to fp32;
* the generated grid (``--steps`` Euler steps from the same noise) as PSNR to the held-out truth and to the
  fp32 generation.

CPUs run the same rowwise FP8 arithmetic as the GPU (``torch._scaled_mm`` with e4m3 operands and per-row
scales), so this runs anywhere. The paper preset runs a GEMM in FP8 where the operand it quantizes has rows of
its width (1024, model/fp8.py's PERSISTENT_ROW); on a smaller model ``--row-limit`` (default: the model's
width) picks the same GEMMs: the QKV and SwiGLU-input maps' forward, the SwiGLU output map's input gradient.
``--row-limit 100000`` runs every GEMM of the frozen layers in FP8 instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import rectified_flow as rf  # noqa: E402
from model.fourd import FourDConfig, FourDModel, grid_condition_mask  # noqa: E402
from model.fp8 import FrozenFloat8Linear, enable_fp8  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp8")


def build(ckpt: dict, checkpoint: str, device: torch.device, fp8: bool, row_limit: int | None) -> FourDModel:
    from pipelines.common.checkpoints import base_from_checkpoint, sync_state
    model = FourDModel(base_from_checkpoint(ckpt, checkpoint), FourDConfig(**ckpt["fourd_config"]))
    model.load_state_dict(sync_state(ckpt), strict=False)
    model.to(device).eval()
    if fp8:
        limit = model.base.cfg.width if row_limit is None else row_limit
        switched = sum(enable_fp8(block, row_limit=limit) for block in model.base.blocks)
        assert switched and all(type(b.mlp.w_in) is FrozenFloat8Linear for b in model.base.blocks)
    return model


def heldout(spec: str, size: tuple[int, int], limit: int) -> list[torch.Tensor]:
    """The first ``limit`` usable grids of ``spec`` as evaluate_4d.py picks them, [V, T, 3, H, W] in [-1, 1]."""
    from pipelines.evaluation import heldout_grids
    from pipelines.generation import frames_to_tensor
    return [frames_to_tensor(g.cells(range(g.shape[0]), range(g.shape[1])), *size)
            for _, g in heldout_grids(spec, limit, {})]


def _ctx(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="weights/proof/soft.pt.gz")
    ap.add_argument("--grids", default="weights/proof/heldout")
    ap.add_argument("--limit", type=int, default=4, help="held-out grids at most")
    ap.add_argument("--draws", type=int, default=16, help="flow times and noises per grid for the loss")
    ap.add_argument("--steps", type=int, default=20, help="Euler steps of the generation")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--row-limit", type=int, default=None,
                    help="FP8 only for operands with rows this short (default: the model's width, which picks the "
                         "GEMMs the paper preset runs in FP8, its width being model/fp8.py's PERSISTENT_ROW)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    device = torch.device(args.device)
    t0 = time.time()
    from pipelines.common.checkpoints import load_checkpoint
    ckpt = load_checkpoint(args.checkpoint)
    if ckpt["stage"] != "4d":
        raise SystemExit(f"error: '{args.checkpoint}' holds a '{ckpt['stage']}' model; pass a trained 4D checkpoint")
    models = {p: build(ckpt, args.checkpoint, device, fp8=p == "fp8", row_limit=args.row_limit) for p in PRECISIONS}
    from pipelines.generation import checkpoint_geometry
    (wv, wt), size = checkpoint_geometry(ckpt)
    grids = [g[:wv, :wt].to(device) for g in heldout(args.grids, size, args.limit)]
    shift = models["fp32"].base.cfg.flow_shift
    rows: dict[str, dict[str, list[float]]] = {p: {"loss": [], "grad_cos": [], "vel_rel_err": [], "psnr_truth": [],
                                                   "psnr_to_fp32": []} for p in PRECISIONS}
    for gi, x0 in enumerate(grids):
        x0 = x0[None]
        V, T = x0.shape[1:3]
        mask = grid_condition_mask(1, V, T, device)
        ref_grad = ref_vel = None
        for d in range(args.draws):
            out = {}
            for p in PRECISIONS:
                m = models[p]
                m.zero_grad(set_to_none=True)
                gen = torch.Generator(device).manual_seed(1000 * gi + d)
                vel = {}

                def fn(x, t, c, mk, m=m, vel=vel):
                    v = m(x, t, c, mk).float()
                    vel["v"] = v.detach()
                    return v
                with _ctx(device, p):
                    loss, _ = rf.training_loss(fn, x0, mask, gen, shift=shift)
                loss.backward()
                grad = torch.cat([q.grad.flatten().float() for q in m.sync_parameters() if q.grad is not None])
                out[p] = (float(loss.detach()), grad, vel["v"])
            ref_loss, ref_grad, ref_vel = out["fp32"]
            for p in PRECISIONS:
                loss, grad, v = out[p]
                rows[p]["loss"].append(loss)
                rows[p]["grad_cos"].append(_cos(grad, ref_grad))
                rows[p]["vel_rel_err"].append(float((v - ref_vel).norm() / ref_vel.norm()))
        # generation: the same noise for every precision
        known = mask[0].bool()
        gens = {}
        for p in PRECISIONS:
            noise = torch.randn(x0.shape, generator=torch.Generator(device).manual_seed(gi), device=device)
            cond = x0 * mask[..., None, None, None]
            with torch.no_grad(), _ctx(device, p):
                g = rf.sample(lambda x, t, c, mk, m=models[p]: m(x, t, cond=c, mask=mk).float(), noise, args.steps,
                              cond=cond, mask=mask, shift=shift)
            gens[p] = g.float().clamp(-1, 1)
        from pipelines.eval_metrics import psnr
        unknown = ~known
        cells = {p: (g[0][unknown] + 1) / 2 for p, g in gens.items()}  # [cells, 3, H, W] in [0, 1]
        truth = (x0[0][unknown] + 1) / 2
        for p in PRECISIONS:
            rows[p]["psnr_truth"].append(float(psnr(cells[p], truth).mean()))
            rows[p]["psnr_to_fp32"].append(float(psnr(cells[p], cells["fp32"]).mean()))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    summary = {p: {k: round(mean(v), 5) for k, v in r.items()} for p, r in rows.items()}
    result = {"checkpoint": args.checkpoint, "row_limit": args.row_limit, "grids": len(grids), "draws": args.draws, "steps": args.steps,
              "device": str(device), "torch": torch.__version__, "seconds": round(time.time() - t0, 1),
              "summary": summary}
    print(f"{'':6} {'loss':>9} {'grad cos':>9} {'vel err':>8} {'PSNR truth':>11} {'PSNR to fp32':>13}")
    for p, s in summary.items():
        print(f"{p:6} {s['loss']:9.5f} {s['grad_cos']:9.5f} {s['vel_rel_err']:8.4f} {s['psnr_truth']:11.2f} "
              f"{s['psnr_to_fp32']:13.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
