"""Seams of sliding-window generation on grids larger than the model's window (model/sliding_window.py).

    .venv/bin/python benchmarks/sliding_window_seams.py run --checkpoint weights/proof/soft.pt.gz \\
        --grids outputs/proof/data/render_heldout16 --views 16 --frames 16 --out outputs/seams
    .venv/bin/python benchmarks/sliding_window_seams.py plot --report outputs/seams/seams.json \\
        --out docs/results/sliding_window_seams.png

``run``: every window plan (``WINDOW_PLANS``) fills each held-out grid from its first row and first column, with
the same noise seed per grid. Per plan and grid: PSNR and SSIM over the generated cells
(``pipelines.eval_metrics.grid_report``, as evaluation scores them), and the jump profile: for each pair of
neighbouring time steps (and of neighbouring views), the mean absolute change between the two in the generated
grid minus the same in the truth, over pairs of generated cells. Where a window's kept cells begin (a *seam* of
that plan), a fill that does not continue its neighbour shows a jump the truth does not have. Writes
``seams.json`` and, for the first grid, ``grid0.png`` (truth, then each plan; given cells framed).
``plot``: the jump profiles with each plan's seams marked (matplotlib, here).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def seam_pairs(total: int, size: int, plan: str) -> list[int]:
    """Indices i of the neighbour pairs (i, i + 1) along an axis where a window's kept cells begin: i + 1 is the
    first index the window writes that no earlier one did (overlap 1)."""
    from model.sliding_window import WINDOW_PLANS
    spans = WINDOW_PLANS[plan](total, min(size, total), 1)
    return [start + length - 1 for start, length in spans[:-1]]


def jumps(grid: Any, axis: int) -> Any:
    """Mean absolute change between neighbours along ``axis`` (1: time, 0: views) of [V, T, C, H, W] in [0, 1],
    over pairs of generated cells (both outside the given first row and column): one value per pair."""
    import torch
    g = grid[1:, 1:]  # generated cells only
    d = (g.narrow(axis, 1, g.shape[axis] - 1) - g.narrow(axis, 0, g.shape[axis] - 1)).abs()
    other = 0 if axis == 1 else 1
    return d.mean(dim=(other, 2, 3, 4)) if d.shape[other] else torch.zeros(d.shape[axis])


def run(args: argparse.Namespace) -> None:
    import torch

    from model.sliding_window import WINDOW_PLANS
    from pipelines.common.visuals import contact_sheet, to_uint8
    from pipelines.eval_metrics import grid_report
    from pipelines.evaluation import heldout_grids, object_mask, paired
    from pipelines.generation import GenerateConfig, Generator4D, frames_to_tensor
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, int] = {}
    grids = heldout_grids(args.grids, args.max_grids, skipped)
    if not grids:
        raise SystemExit(f"no grids in {args.grids}")
    V, T = args.views, args.frames
    plans = sorted(WINDOW_PLANS)
    gens = {p: Generator4D(GenerateConfig(checkpoint=args.checkpoint, steps=args.steps, method="euler",
                                          device=args.device, compile=False, window_plan=p)) for p in plans}
    first = gens[plans[0]]
    size = first.size
    report: dict[str, Any] = {"checkpoint": args.checkpoint, "grids": [], "views": V, "frames": T,
                              "window": list(first.window), "steps": args.steps, "skipped": skipped,
                              "seams": {p: {"time": seam_pairs(T, first.window[1], p),
                                            "views": seam_pairs(V, first.window[0], p)} for p in plans},
                              "per_plan": {p: {"psnr": [], "ssim": [], "time_jump": [], "view_jump": []}
                                           for p in plans}}
    for start in range(0, len(grids), args.batch):
        chunk = grids[start:start + args.batch]
        cells = [g.cells(range(V), range(T)) for _, g in chunk]
        truth = torch.stack([frames_to_tensor(c, *size) for c in cells])
        masks = [object_mask(c, *size) for c in cells]
        seeds = [args.seed + start + i for i in range(len(chunk))]
        filled = {p: gens[p].generate_batch(truth[:, 0], truth[:, :, 0], seeds) for p in plans}
        for i, (key, grid) in enumerate(chunk):
            t01 = (truth[i] + 1) / 2
            report["grids"].append(str(grid.meta.get("item_id", key)))
            for p in plans:
                g01, given = (filled[p][0][i] + 1) / 2, filled[p][1]
                r = grid_report(g01, t01, given, masks[i])
                row = report["per_plan"][p]
                row["psnr"].append(r["psnr"])
                row["ssim"].append(r["ssim"])
                row["time_jump"].append((jumps(g01, 1) - jumps(t01, 1)).tolist())
                row["view_jump"].append((jumps(g01, 0) - jumps(t01, 0)).tolist())
            if start + i == 0:  # truth, then each plan, side by side (the time axis runs through all of them)
                panels = [truth[i]] + [filled[p][0][i] for p in plans]
                contact_sheet(to_uint8(torch.cat(panels, dim=1)), out / "grid0.png",
                              given=torch.cat([filled[plans[0]][1]] * len(panels), dim=1).numpy().astype(bool))
        print(f"[seams] {min(start + args.batch, len(grids))}/{len(grids)} grids", flush=True)
    summary: dict[str, Any] = {}
    for p in plans:
        row = report["per_plan"][p]
        tj, vj = torch.tensor(row["time_jump"]), torch.tensor(row["view_jump"])
        s: dict[str, Any] = {"psnr": sum(row["psnr"]) / len(row["psnr"]), "ssim": sum(row["ssim"]) / len(row["ssim"]),
                             "time_jump_profile": tj.mean(0).tolist(), "view_jump_profile": vj.mean(0).tolist()}
        for axis, prof in (("time", tj), ("views", vj)):
            # pair i of the profile is pair (i + 1, i + 2) of the grid: the profile starts after the given column/row
            for q in plans:
                at = [i - 1 for i in report["seams"][q][axis] if i >= 1]
                rest = [i for i in range(prof.shape[1]) if i not in at]
                s[f"{axis}_jump_at_{q}_seams"] = prof[:, at].mean().item() if at else float("nan")
                s[f"{axis}_jump_elsewhere_of_{q}"] = prof[:, rest].mean().item() if rest else float("nan")
        summary[p] = s
    if len(plans) == 2:
        a, b = plans
        summary[f"{a}_minus_{b}"] = {m: paired(report["per_plan"][a][m], report["per_plan"][b][m])
                                     for m in ("psnr", "ssim")}
    report["summary"] = summary
    (out / "seams.json").write_text(json.dumps(report, indent=1))
    for p in plans:
        s = summary[p]
        print(f"[seams] {p}: PSNR {s['psnr']:.2f} dB, SSIM {s['ssim']:.4f}; time jump excess at its seams "
              f"{s[f'time_jump_at_{p}_seams']:+.4f} vs {s[f'time_jump_elsewhere_of_{p}']:+.4f} elsewhere; views "
              f"{s[f'views_jump_at_{p}_seams']:+.4f} vs {s[f'views_jump_elsewhere_of_{p}']:+.4f}", flush=True)
    if len(plans) == 2:
        d = summary[f"{plans[0]}_minus_{plans[1]}"]
        print(f"[seams] {plans[0]} - {plans[1]}: PSNR {d['psnr']['mean']:+.2f} dB (t = {d['psnr']['t']:.1f}, higher "
              f"on {d['psnr']['better']}/{len(report['grids'])}), SSIM {d['ssim']['mean']:+.4f} "
              f"(t = {d['ssim']['t']:.1f})", flush=True)


def plot(args: argparse.Namespace) -> None:
    """Top: each plan's jump profile (generated minus truth). Bottom: the second plan minus the first, grid by grid,
    with two standard errors: a seam of one plan stands out where it is alone."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    rep = json.loads(Path(args.report).read_text())
    plans = sorted(rep["per_plan"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.4), sharex="col")
    colours = dict(zip(plans, ("tab:blue", "tab:red", "tab:green")))
    for col, (axis, key, prof_key) in enumerate((("time", "time_jump", "time_jump_profile"),
                                                 ("views", "view_jump", "view_jump_profile"))):
        top, bottom = axes[0, col], axes[1, col]
        for p in plans:
            prof = rep["summary"][p][prof_key]
            xs = [i + 1.5 for i in range(len(prof))]  # pair (i + 1, i + 2)
            top.plot(xs, prof, "-o", ms=3, color=colours[p], label=p)
        if len(plans) == 2:
            d = np.array(rep["per_plan"][plans[1]][key]) - np.array(rep["per_plan"][plans[0]][key])
            se = d.std(0, ddof=1) / np.sqrt(len(d)) if len(d) > 1 else np.zeros(d.shape[1])
            xs = [i + 1.5 for i in range(d.shape[1])]
            bottom.errorbar(xs, d.mean(0), yerr=2 * se, fmt="-o", ms=3, color="k", capsize=2,
                            label=f"{plans[1]} minus {plans[0]} (2 s.e.)")
        for ax in (top, bottom):
            for p in plans:
                for i, seam in enumerate(rep["seams"][p][axis]):
                    ax.axvline(seam + 0.5, color=colours[p], ls=":", lw=1,
                               label=f"{p} seams" if i == 0 and ax is top else None)
            ax.axhline(0, color="k", lw=0.5)
            ax.legend(fontsize=7)
        top.set_ylabel("mean |change|, generated - truth")
        bottom.set_ylabel("difference of the plans")
        bottom.set_xlabel(f"between {'time steps' if axis == 'time' else 'views'} i and i + 1 (centre)")
        top.set_title(f"{axis}: {len(rep['grids'])} held-out {rep['views']}x{rep['frames']} grids, "
                      f"{Path(rep['checkpoint']).name}", fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"[seams] wrote {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("run")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--grids", required=True, help="held-out grids at least --views x --frames (a render output)")
    r.add_argument("--views", type=int, default=16)
    r.add_argument("--frames", type=int, default=16)
    r.add_argument("--max-grids", type=int, default=24)
    r.add_argument("--batch", type=int, default=8)
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto")
    r.add_argument("--out", default="outputs/seams")
    p = sub.add_parser("plot")
    p.add_argument("--report", required=True)
    p.add_argument("--out", required=True)
    args = ap.parse_args()
    run(args) if args.mode == "run" else plot(args)


if __name__ == "__main__":
    main()
