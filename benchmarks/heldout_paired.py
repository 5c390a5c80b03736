"""Held-out evaluations compared grid by grid, across one or more ``evaluate_4d.py`` reports of the same grids.

    python benchmarks/heldout_paired.py EVAL_A/results.json [EVAL_B/results.json ...] [--set render] \
        [--pairs soft:hard,hard:sequential] [--figure FILE.png [--plot soft,hard]] [--out FILE.json]

Why: the variants of one comparison are often scored in several processes at once (on one GPU, three
evaluation processes of two variants each finish in the time of one with six), and each writes its own
``results.json``. This merges their rows of one set (refusing reports of other grids: the sets' item lists and
counts must match), then prints every model row against ``copy_first_row`` and each ``--pairs`` entry with
``pipelines.evaluation.paired`` (the report's own grid-by-grid comparison). ``--figure`` draws each model's
per-grid PSNR against copying the first row's (a point above the diagonal is a grid the model wins);
``--out`` keeps the merged per-grid scores and the comparisons.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.evaluation import PAIRED_REFERENCE, paired_metrics, paired_rows  # noqa: E402

KEPT = ("psnr", "ssim", "psnr_object")  # the per-grid scores --out keeps (results.json also holds per-cell lists)


def merge(paths: list[str], set_name: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The set's description and its rows from every report, by variant; a variant in two reports must agree."""
    info, order, rows = None, None, {}
    for path in paths:
        report = json.loads(Path(path).read_text())
        if set_name not in report["results"]:
            raise SystemExit(f"error: {path} has no set '{set_name}' (it has {', '.join(report['results'])}); "
                             "pass --set")
        this = report["sets"][set_name]
        if info is None:
            info = this
        elif (this["items"], this["count"]) != (info["items"], info["count"]):
            raise SystemExit(f"error: {path} scored other grids of '{set_name}' ({this['count']} grids) than "
                             f"{paths[0]} ({info['count']}): grid-by-grid differences need the same grids")
        for name, row in report["results"][set_name].items():
            if order is None:
                order = [g.get("item") for g in row["per_grid"]]
            elif [g.get("item") for g in row["per_grid"]] != order:
                raise SystemExit(f"error: {path} lists the grids of '{set_name}' in another order than {paths[0]}: "
                                 "grid-by-grid differences need the same grids in the same order")
            if name in rows and not np.allclose([g["psnr"] for g in rows[name]["per_grid"]],
                                                [g["psnr"] for g in row["per_grid"]], rtol=0, atol=1e-6):
                raise SystemExit(f"error: variant '{name}' scores differently in {path} than in an earlier report; "
                                 "were they sampled with other settings?")
            rows.setdefault(name, row)
    return info, rows


def compare(rows: dict[str, dict[str, Any]], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    for a, b in pairs:
        for name in (a, b):
            if name not in rows:
                raise SystemExit(f"error: --pairs names '{name}', which no report scored (have: {', '.join(rows)})")
    return {"against_reference": paired_rows(rows),
            "pairs": {f"{a}:{b}": paired_metrics(rows[a], rows[b]) for a, b in pairs}}


def figure(rows: dict[str, dict[str, Any]], path: Path, title: str, names: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = [g["psnr"] for g in rows[PAIRED_REFERENCE]["per_grid"]]
    models = names or [n for n, r in rows.items() if r.get("kind") == "model"]
    for name in models:
        if name not in rows:
            raise SystemExit(f"error: --plot names '{name}', which no report scored (have: {', '.join(rows)})")
    fig, ax = plt.subplots(figsize=(5.5, 5.2), dpi=110)
    lo, hi = min(ref), max(ref)
    for name in models:
        ys = [g["psnr"] for g in rows[name]["per_grid"]]
        lo, hi = min(lo, *ys), max(hi, *ys)
        ax.scatter(ref, ys, s=14, alpha=0.75, label=name)
    ax.plot([lo - 1, hi + 1], [lo - 1, hi + 1], color="grey", lw=1, ls="--")
    ax.set_xlim(lo - 1, hi + 1)
    ax.set_ylim(lo - 1, hi + 1)
    ax.set_xlabel(f"{PAIRED_REFERENCE} PSNR per grid (dB)")
    ax.set_ylabel("variant PSNR per grid (dB)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", help="evaluate_4d.py results.json files of the same grids")
    ap.add_argument("--set", default="render", help="the held-out set to compare")
    ap.add_argument("--pairs", default="", help="comma-separated a:b variant pairs, each compared as a - b")
    ap.add_argument("--figure", default="", help="PNG: each model's per-grid PSNR against copy_first_row's")
    ap.add_argument("--plot", default="", help="comma-separated variants the figure shows (default: every model)")
    ap.add_argument("--out", default="", help="JSON: merged per-grid scores and the comparisons")
    args = ap.parse_args(argv)
    pairs = []
    for entry in filter(None, args.pairs.split(",")):
        a, sep, b = entry.partition(":")
        if not (sep and a and b):
            raise SystemExit(f"error: --pairs entry '{entry}' is not a:b (e.g. --pairs soft:hard)")
        pairs.append((a, b))
    info, rows = merge(args.reports, args.set)
    if PAIRED_REFERENCE not in rows:
        raise SystemExit(f"error: no report scored {PAIRED_REFERENCE}, the baseline every model is compared with")
    result = compare(rows, pairs)
    print(f"set '{args.set}': {info['count']} grids, {len(rows)} variants from {len(args.reports)} report(s)")
    for name, r in rows.items():
        print(f"  {name:24s} PSNR {r['psnr']:6.2f}  SSIM {r['ssim']:.4f}  object PSNR {r['psnr_object']:6.2f}")
    for label, table in [*((f"{n} - {PAIRED_REFERENCE}", p) for n, p in result["against_reference"].items()),
                         *((k.replace(":", " - "), p) for k, p in result["pairs"].items())]:
        print(f"  {label:40s} " + "   ".join(
            f"{m} {p['mean']:+.3f} ± {p['std']:.3f}, t {p['t']:5.2f}, higher on {p['better']}/{p['grids']}"
            for m, p in table.items()))
    if args.figure:
        figure(rows, Path(args.figure), f"held-out set '{args.set}', {info['count']} grids",
               [n for n in args.plot.split(",") if n])
        print(f"figure: {args.figure}")
    if args.out:
        slim = {n: {"kind": r.get("kind"), **{k: r[k] for k in KEPT},
                    "per_grid": [{k: g[k] for k in ("item", *KEPT) if k in g} for g in r["per_grid"]]}
                for n, r in rows.items()}
        Path(args.out).write_text(json.dumps({"set": args.set, "grids": info, "reports": args.reports,
                                              "rows": slim, **result}, indent=1, default=float))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
