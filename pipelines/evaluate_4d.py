"""Evaluate 4D models against held-out ground-truth grids (rendered grids know every cell).

    python pipelines/evaluate_4d.py \\
        --grids render=outputs/heldout_render,pseudo4d=outputs/heldout_pseudo4d \\
        --checkpoints soft=runs/soft/checkpoint_final,hard=runs/hard/checkpoint_final,sequential=runs/seq/checkpoint_final \\
        --out outputs/eval [--i3d-weights i3d_torchscript.pt] [--lpips-weights lpips.pt]

Every variant is a registered entry producing one table row per held-out set: the
trained checkpoints given, the training-free hard, soft and sequential (Eq. 5 with
the base's own attention) variants on the first checkpoint's frozen base, and two
model-free baselines that copy the nearest given cell (``BASELINES``). Each
held-out grid is filled from its first row and first column and compared cell by
cell with every metric of ``pipelines.eval_metrics.METRICS`` (PSNR, SSIM, object
PSNR on renders, consistency errors, high-frequency energy, FVD / LPIPS when their
weights are given), over generated cells only. Per-grid metrics are reported as
mean ± std [min, max] over a set's grids. Each held-out set (``--grids`` takes
several, as ``name=path``) is reported separately in <out>/report.md,
<out>/results.json and MLflow (``<set>/<variant>/<metric>``).

Held-out means held out: a checkpoint recording its training items
(``ckpt["data_items"]``) is refused when a held-out grid's item is among them.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from a checkout without install

from pipelines.common.config import parse_config, run_cli  # noqa: E402
from pipelines.evaluation import PRESETS, EvalConfig, evaluate, parse_grid_sets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(EvalConfig, PRESETS, argv, description=__doc__,
                          default_preset=None)  # a plain run: EvalConfig's defaults (PRESET_TABLE)
    parse_grid_sets(cfg.grids)  # a clear error before anything is written
    evaluate(dataclasses.replace(cfg, out=str(Path(cfg.out).resolve())))
    return 0


if __name__ == "__main__":
    run_cli(main)
