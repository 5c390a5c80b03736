"""The held-out grids where a variant beats copying the first row by most and by least, scored again one at a
time and drawn side by side (truth above the variant's fill, as evaluate_4d.py draws its first grid).

    python benchmarks/heldout_extremes.py --merged docs/results/proof_eval_render60.json \
        --grids outputs/proof/data/render_heldout60 --checkpoint weights/proof/soft.pt.gz [--variant soft] \
        [--device auto] [--steps 20] --out docs/results/proof_heldout60_win_loss.png

Why: an evaluation draws only each set's first grid, and a mean over 60 grids does not show what a win or a
loss looks like. ``--merged`` is heldout_paired.py's ``--out`` (per-grid scores with each grid's item). Each of
the two grids is evaluated alone (evaluate_4d's ``--items``) with the evaluation's code and sampler, and with the
noise seed it had in the set (``--seed`` plus its place there; the noise is drawn on the CPU, so it is the same
on any device). What differs on another device is the precision (bf16 on a GPU, fp32 on a CPU), so the labels
give both the merged report's score and this run's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.evaluation import PAIRED_REFERENCE, EvalConfig, evaluate  # noqa: E402


def extremes(merged: dict, variant: str) -> list[tuple[int, str, float, float]]:
    """(place in the set, item, variant PSNR, reference PSNR) of the grid the variant wins most against the
    reference and of the one it loses most (or wins least)."""
    rows = merged["rows"]
    for name in (variant, PAIRED_REFERENCE):
        if name not in rows:
            raise SystemExit(f"error: the merged report has no row '{name}' (has: {', '.join(rows)})")
    grids = [(i, g.get("item"), g["psnr"], r["psnr"])
             for i, (g, r) in enumerate(zip(rows[variant]["per_grid"], rows[PAIRED_REFERENCE]["per_grid"]))]
    if any(item is None for _, item, _, _ in grids):
        raise SystemExit("error: the merged report's grids carry no item ids (evaluate_4d.py records them since "
                         "2026-11-25); evaluate again to draw them")
    grids.sort(key=lambda g: g[2] - g[3])
    return [grids[-1], grids[0]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--merged", required=True, help="heldout_paired.py --out JSON")
    ap.add_argument("--grids", required=True, help="the held-out set those scores are of (folder, shards or glob)")
    ap.add_argument("--checkpoint", required=True, help="the variant's checkpoint")
    ap.add_argument("--variant", default="soft")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=20, help="Euler steps (the proof's evaluation sampler)")
    ap.add_argument("--seed", type=int, default=0, help="the evaluation's --seed (a grid's noise: seed + its place)")
    ap.add_argument("--out", required=True, help="PNG")
    args = ap.parse_args(argv)
    from PIL import Image, ImageDraw

    merged = json.loads(Path(args.merged).read_text())
    set_name = merged["set"]
    panels = []
    with tempfile.TemporaryDirectory() as tmp:
        for tag, (place, item, score, ref) in zip(("win", "loss"), extremes(merged, args.variant)):
            cfg = EvalConfig(grids=[f"{set_name}={args.grids}"], checkpoints=[f"{args.variant}={args.checkpoint}"],
                             items=[item], seed=args.seed + place, train_free=False, max_grids=1, method="euler",
                             steps=args.steps,
                             device=args.device, mlflow_uri="none", out=str(Path(tmp) / tag))
            here = evaluate(cfg)["results"][set_name][args.variant]["psnr"]
            sheet = Image.open(Path(cfg.out) / f"{set_name}__{args.variant}_grid0.png").convert("RGB")
            label = (f"{item}: {args.variant} {score:.1f} dB, copy first row {ref:.1f} (merged report);",
                     f"this run {here:.1f}. Top: truth, bottom: {args.variant}")
            panels.append((sheet, label))
            print(f"{tag}: {item}: {args.variant} {score:.2f} dB against {ref:.2f} ({score - ref:+.2f}); "
                  f"alone here {here:.2f}")
    gap, head = 30, 40
    out = Image.new("RGB", (sum(p.width for p, _ in panels) + gap * (len(panels) - 1),
                            max(p.height for p, _ in panels) + head), "white")
    draw, x = ImageDraw.Draw(out), 0
    for sheet, label in panels:
        out.paste(sheet, (x, head))
        for line, text in enumerate(label):
            draw.text((x + 4, 4 + 16 * line), text, fill="black")
        x += sheet.width + gap
    out.save(args.out, optimize=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
