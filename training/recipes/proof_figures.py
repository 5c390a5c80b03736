"""Figures of a proof run for docs/results.md: loss curves of every training run, and the evaluation's first
held-out grid of each set with every variant side by side.

    python -m training.recipes.proof_figures --run outputs/proof --out docs/results

Reads ``<run>/<training run>/metrics.jsonl`` (written by every training job, MLflow or not) and
``<run>/eval/<set>__<variant>_grid0.png`` (evaluate_4d's contact sheets: the truth stacked over the variant's
grid). Writes ``proof_loss_curves.png`` and ``proof_<set>_variants.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file from a checkout without install

# Panels of the loss figure: title -> training runs drawn in it (those present).
LOSS_PANELS = {
    "base (video DiT, both contexts)": ["base"],
    "4D phase 1 (pseudo-4D)": ["4d_soft_p1", "4d_hard_p1", "4d_sequential_p1"],
    "4D phase 2 (renders; soft also on pseudo-4D)": ["4d_soft_p2", "4d_hard_p2", "4d_sequential_p2",
                                                     "4d_soft_pseudo_only"],
    "upsampler x4": ["upsampler"],
}
VARIANT_ORDER = ["soft", "hard", "sequential", "soft_pseudo_only", "train_free_soft", "train_free_hard",
                 "train_free_sequential", "copy_first_row", "copy_first_column"]


def read_losses(metrics: Path) -> tuple[np.ndarray, np.ndarray]:
    """(samples seen, loss) of one run's metrics.jsonl; a resumed run's repeated steps keep their last value."""
    from training.tracking import read_metric_rows
    by_step: dict[int, tuple[float, float]] = {}
    for row in read_metric_rows(metrics):
        if "loss" in row and "step" in row:
            by_step[int(row["step"])] = (float(row.get("samples_seen", row["step"])), float(row["loss"]))
    pts = [by_step[k] for k in sorted(by_step)]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def smooth(y: np.ndarray, k: int) -> np.ndarray:
    """Moving average over k points (the logged losses are single-batch values)."""
    if len(y) < k or k < 2:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def loss_figure(run: Path, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(LOSS_PANELS), figsize=(5 * len(LOSS_PANELS), 3.6))
    for ax, (title, names) in zip(axes, LOSS_PANELS.items()):
        for name in names:
            path = run / name / "metrics.jsonl"
            if not path.is_file():
                continue
            x, y = read_losses(path)
            ax.plot(x, y, alpha=0.25, lw=0.8)
            k = max(1, len(y) // 15)
            ax.plot(x[k - 1:] if k > 1 and len(y) >= k else x, smooth(y, k), lw=1.8, label=name,
                    color=ax.lines[-1].get_color())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("samples seen")
        ax.set_ylabel("velocity MSE")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:  # e.g. a base carried in with --base-from: say so rather than draw an empty frame
            ax.text(0.5, 0.5, "not trained in this run", ha="center", va="center", transform=ax.transAxes,
                    color="0.4")
    fig.tight_layout()
    path = out / "proof_loss_curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def variant_sheet(eval_dir: Path, set_name: str, out: Path, panel_width: int = 270) -> Path | None:
    """Panels of ``panel_width`` pixels: the truth, then each variant's grid (the lower half of its contact
    sheet), five to a row."""
    from PIL import Image, ImageDraw
    sheets = {v: eval_dir / f"{set_name}__{v}_grid0.png" for v in VARIANT_ORDER}
    sheets = {v: p for v, p in sheets.items() if p.is_file()}
    if not sheets:
        return None
    panels = []
    for i, (name, path) in enumerate(sheets.items()):
        im = Image.open(path).convert("RGB")
        half = im.height // 2
        size = (panel_width, round(half * panel_width / im.width))
        if i == 0:
            panels.append(("truth", np.asarray(im.crop((0, 0, im.width, half)).resize(size, Image.LANCZOS))))
        panels.append((name.replace("_", " "),
                       np.asarray(im.crop((0, half, im.width, 2 * half)).resize(size, Image.LANCZOS))))
    h, w = panels[0][1].shape[:2]
    cols = min(5, len(panels))
    rows = -(-len(panels) // cols)
    title, gap = 18, 8
    canvas = Image.new("RGB", (cols * (w + gap), rows * (h + title + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (name, im) in enumerate(panels):
        x, y = (k % cols) * (w + gap), (k // cols) * (h + title + gap)
        draw.text((x + 2, y + 2), name, fill="black")
        canvas.paste(Image.fromarray(np.ascontiguousarray(im[:, :w])), (x, y + title))
    path = out / f"proof_{set_name}_variants.png"
    canvas.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="the proof run folder (training runs and eval/ inside)")
    ap.add_argument("--out", default="docs/results", help="where the PNGs go")
    args = ap.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    if not run.is_dir():
        print(f"error: --run {run} is not a folder; pass the proof recipe's --out folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    written = [loss_figure(run, out)]
    sets = sorted({p.name.split("__")[0] for p in (run / "eval").glob("*__*_grid0.png")})
    written += [p for s in sets if (p := variant_sheet(run / "eval", s, out))]
    print("[figures] " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
