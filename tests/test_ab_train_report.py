"""benchmarks/ab_train_report.py on the committed FP8-vs-bf16 phase-1 metrics: it reproduces the paired loss
ratio docs/performance.md quotes, draws the figure, and refuses runs that logged different steps."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "results" / "fp8_train_proof_h100"
STAGE0 = ROOT / "benchmarks" / "results" / "stage0_train_proof_h100"
sys.path.insert(0, str(ROOT / "benchmarks"))

from ab_train_report import figure, summary  # noqa: E402


def test_the_committed_runs_give_the_documented_ratio_and_a_figure(tmp_path: Path) -> None:
    s = summary(RUN, ("bf16", "fp8"))
    assert len(s["samples"]) == 60 and s["samples"][-1] == 9600
    assert s["ratio"]["mean"] == pytest.approx(1.0048, abs=5e-5)
    assert s["last_quarter_mean"]["bf16"] == pytest.approx(0.02392, abs=5e-6)
    assert s["evaluation"] == {}  # the evaluation's per-cell results.json is not committed, only its summary
    path = figure(s, tmp_path, "fig.png", "bf16 vs fp8")
    assert path.stat().st_size > 10_000


def test_runs_that_logged_different_steps_are_refused(tmp_path: Path) -> None:
    shutil.copytree(RUN, tmp_path / "run")
    metrics = tmp_path / "run" / "p1_fp8" / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:-3]))  # a run cut short
    with pytest.raises(SystemExit, match="different steps"):
        summary(tmp_path / "run", ("bf16", "fp8"))


def test_the_committed_stage0_runs_give_the_documented_ratio() -> None:
    """Session 15's ZeRO-2 (previous commit) against stage 0: docs/results.md quotes 1.0003 ± 0.0010."""
    s = summary(STAGE0, ("zero2", "stage0"))
    assert s["samples"][-1] == 9600 and s["arms"] == ["zero2", "stage0"]
    assert s["ratio"]["mean"] == pytest.approx(1.0003, abs=5e-5) and s["ratio"]["std"] == pytest.approx(0.0010, abs=5e-5)
    with pytest.raises(SystemExit, match="no p1_fp8/metrics.jsonl; the runs there are stage0, zero2"):
        summary(STAGE0, ("stage0", "fp8"))  # an arm the run does not have
