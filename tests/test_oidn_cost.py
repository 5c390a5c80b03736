"""benchmarks/oidn_cost.py: the OpenImageDenoise library that bpy ships, called directly, denoises with the job's
filter settings (the figures beside the Cycles render costs in docs/performance.md come from it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from oidn_cost import main  # noqa: E402


def test_the_shipped_library_denoises_and_reports_its_cost(tmp_path: Path) -> None:
    out = tmp_path / "oidn.json"
    assert main(["--sizes", "16,32", "--reps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["side"] for r in rows] == [16, 32]
    assert all(r["execute_ms"] > 0 and r["us_per_pixel"] > 0 for r in rows)
