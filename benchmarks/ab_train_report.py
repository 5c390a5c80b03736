"""The loss curves of benchmarks/gpu/ab_train_device.sh's two runs (4D phase 1 or, with AB_STAGE=base, the base;
arm A against arm B), side by side and step by step.

    python benchmarks/ab_train_report.py RUN_DIR --arms bf16,fp8 [--figure NAME] [--out docs/results] [--json FILE]

RUN_DIR holds ``p1_<A>/metrics.jsonl`` and ``p1_<B>/metrics.jsonl`` (the device script's archive, unpacked), or
``base_<A>``/``base_<B>`` for the base stage's runs (AB_STAGE=base).
Both runs see the same grids in the same order and the same noise, so their logged single-batch losses are
paired: the figure shows both curves and, below, B's loss relative to A's at every logged step. The printed
summary gives each run's mean loss over the last quarter and the paired ratio's mean and spread. With the
evaluation (``eval/results.json``: both checkpoints on the same grids from the same noise) it also gives each
held-out set's per-grid PSNR and SSIM differences, B minus A; with the base stage's
(``eval_base/<A>_vs_<B>.json``, benchmarks/base_heldout.py) each set's per-clip loss ratio and PSNR difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.recipes.proof_figures import read_losses, smooth  # noqa: E402


def arm_metrics(run: Path, name: str) -> Path:
    """An arm's metrics.jsonl: its 4D phase-1 run (p1_<name>) or, with AB_STAGE=base, its base run (base_<name>)."""
    for prefix in ("p1_", "base_"):
        if (run / f"{prefix}{name}" / "metrics.jsonl").is_file():
            return run / f"{prefix}{name}" / "metrics.jsonl"
    there = sorted(d.parent.name for d in run.glob("*_*/metrics.jsonl"))
    raise SystemExit(f"{run}: no p1_{name} or base_{name} run (metrics.jsonl); the runs there are "
                     f"{', '.join(there) or 'none'}")


def summary(run: Path, arms: tuple[str, str]) -> dict:
    """Paired losses, their ratio (B / A) and, with the evaluation, per-grid PSNR/SSIM differences (B - A)."""
    first, second = arms
    curves = {name: read_losses(arm_metrics(run, name)) for name in arms}
    (x, a), (x8, b) = curves[first], curves[second]
    if len(x) != len(x8) or not np.array_equal(x, x8):
        raise SystemExit(f"{run}: the two runs logged different steps ({len(x)} against {len(x8)} points); "
                         "both must run to the end with the same preset")
    tail = slice(len(x) * 3 // 4, None)
    ratio = b / a
    evaluation = {}
    results = run / "eval" / "results.json"
    if results.is_file():
        for name, rows in json.loads(results.read_text())["results"].items():
            evaluation[name] = {"grids": len(rows[first]["per_grid"])}
            for metric in ("psnr", "ssim"):
                a_g, b_g = (np.array([g[metric] for g in rows[v]["per_grid"]]) for v in arms)
                d = b_g - a_g
                evaluation[name][metric] = {first: float(a_g.mean()), second: float(b_g.mean()),
                                            "diff_mean": float(d.mean()), "diff_std": float(d.std()),
                                            "diff_min": float(d.min()), "diff_max": float(d.max()),
                                            "second_higher": int((d > 0).sum())}
    base_eval = run / "eval_base" / f"{first}_vs_{second}.json"  # benchmarks/base_heldout.py (AB_STAGE=base)
    heldout_clips = {}
    if base_eval.is_file():
        for name, st in json.loads(base_eval.read_text())["sets"].items():
            heldout_clips[name] = {"clips": st["clips"], **{arm: {m: st["checkpoints"][arm][m] for m in ("loss", "psnr")}
                                                            for arm in arms}, **st["paired"][second]}
    return {"arms": list(arms), "evaluation": evaluation, "heldout_clips": heldout_clips, "samples": x.tolist(),
            "loss": {first: a.tolist(), second: b.tolist()},
            "last_quarter_mean": {first: float(a[tail].mean()), second: float(b[tail].mean())},
            "ratio": {"mean": float(ratio.mean()), "std": float(ratio.std()),
                      "last_quarter_mean": float(ratio[tail].mean()),
                      "min": float(ratio.min()), "max": float(ratio.max())}}


def figure(s: dict, out: Path, name: str, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = np.array(s["samples"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.2), sharex=True, height_ratios=(2, 1))
    first, second = s["arms"]
    for arm, color in zip(s["arms"], ("tab:blue", "tab:red")):
        y = np.array(s["loss"][arm])
        top.plot(x, y, alpha=0.3, lw=0.8, color=color)
        k = max(2, len(y) // 12)
        top.plot(x[k - 1:], smooth(y, k), lw=1.8, color=color, label=f"{arm} (last quarter {s['last_quarter_mean'][arm]:.4f})")
    top.set_yscale("log")
    top.set_ylabel("velocity MSE")
    top.set_title(title, fontsize=9)
    top.grid(alpha=0.3)
    top.legend(fontsize=8)
    ratio = np.array(s["loss"][second]) / np.array(s["loss"][first])
    bottom.axhline(1.0, color="0.5", lw=0.8)
    bottom.plot(x, ratio, color="tab:red", lw=1.0, marker=".", ms=3)
    bottom.set_ylabel(f"{second} / {first} loss")
    bottom.set_xlabel("samples seen (4D: grids, base: clips)")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--arms", default="bf16,fp8", help="the two arms' names, A,B (the runs' p1_<name> or base_<name> folders)")
    ap.add_argument("--figure", default="", help="figure file name in --out (default: <B>_vs_<A>_loss.png)")
    ap.add_argument("--title", default="", help="figure title")
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    arms = tuple(args.arms.split(","))
    if len(arms) != 2:
        raise SystemExit(f"--arms: two names expected, got {args.arms!r}")
    a, b = arms
    s = summary(args.run, arms)
    args.out.mkdir(parents=True, exist_ok=True)
    title = args.title or f"4D phase 1 (soft, proof preset, same data, order and noise): {a} vs {b}"
    print(f"figure: {figure(s, args.out, args.figure or f'{b}_vs_{a}_loss.png', title)}")
    r = s["ratio"]
    print(f"last quarter mean loss: {a} {s['last_quarter_mean'][a]:.5f}, {b} {s['last_quarter_mean'][b]:.5f}; "
          f"paired {b}/{a}: mean {r['mean']:.4f} ± {r['std']:.4f} [{r['min']:.4f}, {r['max']:.4f}], "
          f"last quarter {r['last_quarter_mean']:.4f}")
    for name, e in s["evaluation"].items():
        print(f"{name} ({e['grids']} grids): " + "; ".join(
            f"{m} {a} {e[m][a]:.4f}, {b} {e[m][b]:.4f}, per grid {b} - {a} {e[m]['diff_mean']:+.4f} "
            f"± {e[m]['diff_std']:.4f} [{e[m]['diff_min']:+.4f}, {e[m]['diff_max']:+.4f}], {b} higher on "
            f"{e[m]['second_higher']}" for m in ("psnr", "ssim")))
    for name, e in s["heldout_clips"].items():
        r, d = e["loss_ratio"], e["psnr_diff"]
        print(f"{name} ({e['clips']} clips): loss {a} {e[a]['loss']:.5f}, {b} {e[b]['loss']:.5f}, per clip {b}/{a} "
              f"{r['mean']:.4f} ± {r['std']:.4f} (lower on {r['better']}); psnr {a} {e[a]['psnr']:.2f}, {b} "
              f"{e[b]['psnr']:.2f} dB, per clip {d['mean']:+.3f} ± {d['std']:.3f} (higher on {d['better']})")
    if args.json:
        args.json.write_text(json.dumps(s, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
