"""The loss curves of benchmarks/gpu/fp8_train_device.sh's two runs (4D phase 1, bf16 against ``fp8=true``),
side by side and step by step.

    python benchmarks/fp8_train_report.py RUN_DIR [--out docs/results] [--json FILE]

RUN_DIR holds ``p1_bf16/metrics.jsonl`` and ``p1_fp8/metrics.jsonl`` (the device script's archive, unpacked).
Both runs see the same grids in the same order and the same noise, so their logged single-batch losses are
paired: the figure shows both curves and, below, FP8's loss relative to bf16's at every logged step. The
printed summary gives each run's mean loss over the last quarter and the paired ratio's mean and spread.
With the evaluation (``eval/results.json``: both checkpoints on the same grids from the same noise) it also
gives each held-out set's per-grid PSNR and SSIM differences, fp8 minus bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.recipes.proof_figures import read_losses, smooth  # noqa: E402

RUNS = ("bf16", "fp8")


def summary(run: Path) -> dict:
    curves = {name: read_losses(run / f"p1_{name}" / "metrics.jsonl") for name in RUNS}
    (x, a), (x8, b) = curves["bf16"], curves["fp8"]
    if len(x) != len(x8) or not np.array_equal(x, x8):
        raise SystemExit(f"{run}: the two runs logged different steps ({len(x)} against {len(x8)} points); "
                         "both must run to the end with the same preset")
    tail = slice(len(x) * 3 // 4, None)
    ratio = b / a
    evaluation = {}
    results = run / "eval" / "results.json"
    if results.is_file():
        for name, rows in json.loads(results.read_text())["results"].items():
            evaluation[name] = {"grids": len(rows["bf16"]["per_grid"])}
            for metric in ("psnr", "ssim"):
                a_g, b_g = (np.array([g[metric] for g in rows[v]["per_grid"]]) for v in RUNS)
                d = b_g - a_g
                evaluation[name][metric] = {"bf16": float(a_g.mean()), "fp8": float(b_g.mean()),
                                            "diff_mean": float(d.mean()), "diff_std": float(d.std()),
                                            "diff_min": float(d.min()), "diff_max": float(d.max()),
                                            "fp8_higher": int((d > 0).sum())}
    return {"evaluation": evaluation, "samples": x.tolist(), "loss": {"bf16": a.tolist(), "fp8": b.tolist()},
            "last_quarter_mean": {"bf16": float(a[tail].mean()), "fp8": float(b[tail].mean())},
            "ratio_fp8_bf16": {"mean": float(ratio.mean()), "std": float(ratio.std()),
                               "last_quarter_mean": float(ratio[tail].mean()),
                               "min": float(ratio.min()), "max": float(ratio.max())}}


def figure(s: dict, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = np.array(s["samples"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.2), sharex=True, height_ratios=(2, 1))
    for name, color in zip(RUNS, ("tab:blue", "tab:red")):
        y = np.array(s["loss"][name])
        top.plot(x, y, alpha=0.3, lw=0.8, color=color)
        k = max(2, len(y) // 12)
        top.plot(x[k - 1:], smooth(y, k), lw=1.8, color=color, label=f"{name} (last quarter {s['last_quarter_mean'][name]:.4f})")
    top.set_yscale("log")
    top.set_ylabel("velocity MSE")
    top.set_title("4D phase 1 (soft, proof preset, same data, order and noise): bf16 vs fp8=true", fontsize=9)
    top.grid(alpha=0.3)
    top.legend(fontsize=8)
    ratio = np.array(s["loss"]["fp8"]) / np.array(s["loss"]["bf16"])
    bottom.axhline(1.0, color="0.5", lw=0.8)
    bottom.plot(x, ratio, color="tab:red", lw=1.0, marker=".", ms=3)
    bottom.set_ylabel("fp8 / bf16 loss")
    bottom.set_xlabel("grids seen")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "fp8_training_loss_h100.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    s = summary(args.run)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"figure: {figure(s, args.out)}")
    r = s["ratio_fp8_bf16"]
    print(f"last quarter mean loss: bf16 {s['last_quarter_mean']['bf16']:.5f}, fp8 {s['last_quarter_mean']['fp8']:.5f}; "
          f"paired fp8/bf16: mean {r['mean']:.4f} ± {r['std']:.4f} [{r['min']:.4f}, {r['max']:.4f}], "
          f"last quarter {r['last_quarter_mean']:.4f}")
    for name, e in s["evaluation"].items():
        print(f"{name} ({e['grids']} grids): " + "; ".join(
            f"{m} bf16 {e[m]['bf16']:.4f}, fp8 {e[m]['fp8']:.4f}, per grid fp8 - bf16 {e[m]['diff_mean']:+.4f} "
            f"± {e[m]['diff_std']:.4f} [{e[m]['diff_min']:+.4f}, {e[m]['diff_max']:+.4f}], fp8 higher on "
            f"{e[m]['fp8_higher']}" for m in ("psnr", "ssim")))
    if args.json:
        args.json.write_text(json.dumps(s, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
