"""Compare interrupted training runs against an uninterrupted one, step by step (benchmarks/gpu/resume_device.sh).

    python benchmarks/resume_compare.py --reference A/metrics.jsonl --runs B=B/metrics.jsonl,C=C/metrics.jsonl

A resumed or recovered run must log every step once, with the reference's learning rate (the schedule
resumed at the right step) and samples seen (the data position), and losses close to the reference's: the
same batches through the same weights, up to the non-determinism of GPU kernels. Batches from a wrong data
position differ by the loss's batch-to-batch spread, far more than that. Prints one line per run and writes
the numbers as JSON; exits 1 if a run fails a check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file on the GPU machine
    sys.path.insert(0, str(ROOT))

from training.tracking import read_metric_rows  # noqa: E402


def read(path: Path) -> tuple[dict[int, dict], list[int]]:
    """Step -> the last row logged for it, and every logged step in order (to find duplicates)."""
    rows, order = {}, []
    for row in read_metric_rows(path):
        if "loss" in row:
            rows[row["step"]] = row
            order.append(row["step"])
    return rows, order


def compare(reference: dict[int, dict], run: dict[int, dict], order: list[int], loss_rtol: float) -> dict:
    """Checks of one run against the reference; ``ok`` is their conjunction."""
    common = sorted(set(reference) & set(run))
    lr_diff = max((abs(run[s]["lr"] - reference[s]["lr"]) for s in common), default=float("inf"))
    seen_same = all(run[s].get("samples_seen") == reference[s].get("samples_seen") for s in common)
    rel = [abs(run[s]["loss"] - reference[s]["loss"]) / max(abs(reference[s]["loss"]), 1e-12) for s in common]
    # the reference's own step-to-step change: what a batch from the wrong position would look like
    steps = sorted(reference)
    spread = [abs(reference[b]["loss"] - reference[a]["loss"]) / max(abs(reference[a]["loss"]), 1e-12)
              for a, b in zip(steps, steps[1:])]
    out = {
        "steps_logged": len(order), "steps_unique": len(set(order)), "last_step": max(order, default=0),
        "reference_last_step": max(reference, default=0), "steps_compared": len(common),
        "max_lr_abs_diff": lr_diff, "samples_seen_equal": seen_same,
        "max_loss_rel_diff": max(rel, default=float("inf")),
        "mean_loss_rel_diff": sum(rel) / len(rel) if rel else float("inf"),
        "reference_mean_step_to_step_rel_change": sum(spread) / len(spread) if spread else 0.0,
    }
    # every step within tolerance (max() would skip a NaN: max([0.01, nan]) is 0.01)
    out["ok"] = (out["steps_logged"] == out["steps_unique"] and out["last_step"] == out["reference_last_step"]
                 and len(common) == len(reference) and lr_diff <= 1e-9 and seen_same
                 and bool(rel) and all(r <= loss_rtol for r in rel))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True, help="metrics.jsonl of the uninterrupted run")
    p.add_argument("--runs", required=True, help="name=metrics.jsonl,... of the interrupted runs")
    p.add_argument("--loss-rtol", type=float, default=0.05,
                   help="largest relative loss difference at a step (bf16 kernels are not bit-reproducible)")
    p.add_argument("--out", default="", help="write the comparison here as JSON")
    a = p.parse_args(argv)
    reference, _ = read(Path(a.reference))
    if not reference:
        print(f"error: no loss rows in {a.reference}", file=sys.stderr)
        return 2
    results = {}
    for item in a.runs.split(","):
        name, path = item.split("=", 1)
        run, order = read(Path(path)) if Path(path).is_file() else ({}, [])
        r = results[name] = compare(reference, run, order, a.loss_rtol)
        print(f"[resume] {name}: {'OK' if r['ok'] else 'FAILED'}: steps {r['steps_unique']}/{r['reference_last_step']} "
              f"(logged {r['steps_logged']}), lr diff {r['max_lr_abs_diff']:.1e}, samples seen "
              f"{'equal' if r['samples_seen_equal'] else 'DIFFER'}, loss rel diff max {r['max_loss_rel_diff']:.2e} "
              f"mean {r['mean_loss_rel_diff']:.2e} (reference step-to-step {r['reference_mean_step_to_step_rel_change']:.2e})",
              flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
