"""benchmarks/sliding_window_seams.py: where each window plan's seams lie, the jump profile, and a run of both plans
with the shipped proof weights on a grid larger than their window (CPU, one sampler step)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_seam_pairs_are_where_a_window_starts_writing() -> None:
    from sliding_window_seams import seam_pairs
    # even: windows [0, 6), [5, 11), [10, 16): the second writes from 6 on, the third from 11 on
    assert seam_pairs(16, 8, "even") == [5, 10]
    # flush: [0, 8), [7, 15), [8, 16): the second writes 8..14, the third only 15 (its 9..14 are discarded)
    assert seam_pairs(16, 8, "flush") == [7, 14]
    assert seam_pairs(8, 8, "even") == seam_pairs(8, 8, "flush") == []


def test_jumps_measure_change_between_generated_neighbours() -> None:
    from sliding_window_seams import jumps
    grid = torch.zeros(4, 5, 3, 2, 2)
    grid[:, 3:] = 0.5  # a step between time 2 and 3, in every view
    grid[0] = 1.0  # the given first row does not count
    t = jumps(grid, 1)
    assert t.shape == (3,) and torch.allclose(t, torch.tensor([0.0, 0.5, 0.0]))  # pairs (1,2), (2,3), (3,4)
    v = jumps(grid, 0)
    assert v.shape == (2,) and torch.allclose(v, torch.zeros(2))


def test_both_plans_fill_a_grid_larger_than_the_window(tmp_path: Path) -> None:
    from pipelines.common.shards import Sample, commit_part
    from PIL import Image
    import io
    V = T = 9  # the proof model's window is 8 x 8
    files = {}
    for v in range(V):
        for t in range(T):
            img = np.zeros((64, 64, 4), np.uint8)
            img[16 + v:40 + v, 16 + t:40 + t] = (200, 40 * (t % 6), 30 * v % 255, 255)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            files[f"v{v:02d}t{t:02d}.png"] = buf.getvalue()
    files["meta.json"] = json.dumps({"item_id": "grid-a", "views": V, "frames": T}).encode()
    commit_part(tmp_path / "grids", 0, [Sample(key="grid-a", item_id="grid-a", files=files, kind="render", views=V,
                                               frames=T, height=64, width=64)], [])
    out = tmp_path / "seams"
    proc = subprocess.run([sys.executable, "benchmarks/sliding_window_seams.py", "run", "--checkpoint",
                           "weights/proof/soft.pt.gz", "--grids", str(tmp_path / "grids"), "--views", str(V),
                           "--frames", str(T), "--steps", "1", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((out / "seams.json").read_text())
    assert rep["grids"] == ["grid-a"] and rep["window"] == [8, 8]
    assert rep["seams"] == {"even": {"time": [4], "views": [4]}, "flush": {"time": [7], "views": [7]}}
    for plan in ("even", "flush"):
        s = rep["summary"][plan]
        assert 5.0 < s["psnr"] < 60.0 and len(s["time_jump_profile"]) == T - 2 and len(s["view_jump_profile"]) == V - 2
    assert rep["per_plan"]["even"]["psnr"] != rep["per_plan"]["flush"]["psnr"]  # the plans fill differently
    assert (out / "grid0.png").stat().st_size > 10_000
    plot = subprocess.run([sys.executable, "benchmarks/sliding_window_seams.py", "plot", "--report",
                           str(out / "seams.json"), "--out", str(tmp_path / "plot.png")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert plot.returncode == 0 and (tmp_path / "plot.png").stat().st_size > 10_000, plot.stderr[-2000:]
