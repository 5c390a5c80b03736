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
    with pytest.raises(SystemExit, match=r"no p1_fp8 or base_fp8 run \(metrics.jsonl\); the runs there are p1_stage0, p1_zero2"):
        summary(STAGE0, ("stage0", "fp8"))  # an arm the run does not have


def test_the_committed_base_runs_show_what_session_16_reports(tmp_path: Path) -> None:
    """Session 16's base A/B (benchmarks/results/fp8_base_proof_h100, AB_STAGE=base): the report reads base_<arm>
    runs; main's tensorwise FP8 trained with finite gradient norms and within 0.1% of the uncompiled rowwise run,
    while the compiled rowwise branch's norms were all non-finite (docs/performance.md)."""
    import json
    import math

    base = ROOT / "benchmarks" / "results" / "fp8_base_proof_h100"
    s = summary(base / "call8_25k", ("tensorwise", "rowwise"))
    assert len(s["samples"]) == 8 and s["samples"][-1] == 25600
    norms = {f"{call}/{arm}": [json.loads(line)["grad_norm"] for line in (base / call / f"base_{arm}" / "metrics.jsonl")
                               .read_text().splitlines()]
             for call, arm in (("call8_25k", "tensorwise"), ("call8_25k", "rowwise"), ("call7_25k", "nocompile"),
                               ("call5_120k", "fp8"), ("call5_120k", "bf16"))}
    finite = {k: sum(math.isfinite(v) for v in vals) for k, vals in norms.items()}
    assert finite == {"call8_25k/tensorwise": 8, "call8_25k/rowwise": 0, "call7_25k/nocompile": 8,
                      "call5_120k/fp8": 0, "call5_120k/bf16": 38}
    # the tensorwise run against the uncompiled rowwise one (calls 8 and 7: same grids, order and noise)
    for call, arm in (("call7_25k", "nocompile"), ("call8_25k", "tensorwise")):
        shutil.copytree(base / call / f"base_{arm}", tmp_path / f"base_{arm}")
    pair = summary(tmp_path, ("nocompile", "tensorwise"))["ratio"]
    assert abs(pair["mean"] - 1.0009) < 5e-4 and pair["std"] < 0.002
    with pytest.raises(SystemExit, match="no p1_bf16 or base_bf16"):
        summary(base / "call8_25k", ("bf16", "rowwise"))


def test_the_committed_scratch_bases_show_what_session_21_reports() -> None:
    """Session 21 (benchmarks/results/fp8_base_scratch_h100): proof bases trained from random weights in bf16,
    with fp8=true, and in bf16 with another seed; the report pairs their held-out clips (eval_base/, written by
    benchmarks/base_heldout.py) and gives the figures docs/results.md quotes: FP8's held-out difference to bf16
    is no larger than another seed's."""
    import json
    import math

    run = ROOT / "benchmarks" / "results" / "fp8_base_scratch_h100"
    fp8, seed = summary(run, ("bf16", "fp8")), summary(run, ("bf16", "bf16seed1"))
    assert fp8["samples"][-1] == seed["samples"][-1] == 256_000
    assert fp8["ratio"]["mean"] == pytest.approx(1.0023, abs=5e-5)
    for arm in ("bf16", "fp8", "bf16seed1"):
        norms = [json.loads(line)["grad_norm"] for line in (run / f"base_{arm}" / "metrics.jsonl").read_text().splitlines()]
        assert len(norms) == 80 and all(math.isfinite(n) for n in norms)
    for name in ("heldout", "val"):
        f, s = fp8["heldout_clips"][name], seed["heldout_clips"][name]
        assert f["clips"] == s["clips"] == 512
        assert f["psnr_diff"]["mean"] == pytest.approx({"heldout": -0.046, "val": -0.076}[name], abs=5e-4)
        assert f["loss_ratio"]["mean"] == pytest.approx({"heldout": 1.0076, "val": 1.0072}[name], abs=5e-5)
        # FP8's change of the mean held-out loss is smaller than the other seed's
        assert abs(f["fp8"]["loss"] / f["bf16"]["loss"] - 1) < abs(s["bf16seed1"]["loss"] / s["bf16"]["loss"] - 1)
    assert summary(run, ("fp8", "bf16"))["heldout_clips"] == {}  # evaluated as bf16 against fp8 only
