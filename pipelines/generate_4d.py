"""Generate a 4D video from a fixed-view video (the first row) and a freeze-time video (the first column).

    python pipelines/generate_4d.py --checkpoint outputs/demo/train_4d/checkpoint_final \\
        --fixed-view row.mp4 --freeze-time column.mp4 --out outputs/gen
    python pipelines/generate_4d.py --checkpoint runs:/<mlflow run id> --from-grid outputs/render --out outputs/gen
    python pipelines/generate_4d.py --checkpoint ... --manifest pairs.parquet --out outputs/batch   # Ray Data

Writes the V x T frames, a contact sheet, an MP4 per row and per column and a bullet-time MP4.
Grids larger than the model's trained window are filled by sliding windows.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from a checkout without install

from pipelines.common.config import ensure_output_dir, parse_config, run_cli, write_resolved  # noqa: E402
from pipelines.generation import PRESETS, GenerateConfig, Generator4D, generate_one, run_batch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(GenerateConfig, PRESETS, argv, description=__doc__,
                          default_preset=None)  # a plain run: GenerateConfig's defaults (PRESET_TABLE)
    out = ensure_output_dir(Path(cfg.out).resolve())  # an unusable output is one line, before a model loads
    if cfg.manifest:
        write_resolved(cfg, out)
        return run_batch(dataclasses.replace(cfg, out=str(out)))
    gen = Generator4D(cfg)
    result = generate_one(gen, cfg, out)
    write_resolved(cfg, out)  # after success: a failed run leaves the folder's config describing its outputs
    print(f"[generate] {result['views']}x{result['frames']} grid ({gen.sync}, window {gen.window[0]}x"
          f"{gen.window[1]}) in {result['seconds']:.1f}s")
    print(f"[generate] contact sheet: {result['contact_sheet']}")
    if result["videos"]:  # without PyAV none are written, and generate_one has said so
        print(f"[generate] videos: {result['videos']} (rows, columns, bullet_time.mp4)")
    return 0


if __name__ == "__main__":
    run_cli(main)
