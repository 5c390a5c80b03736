"""benchmarks/resume_compare.py, the step-by-step check of the GPU resume and killed-worker runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks import resume_compare


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _reference(n: int = 20) -> list[dict]:
    # a cosine schedule and a loss that wanders by ~10% from step to step, as a small model's does
    return [{"step": s, "lr": 1e-3 * 0.5 * (1 + math.cos(math.pi * s / n)), "samples_seen": 128 * s,
             "loss": 0.1 * (1 + 0.1 * math.sin(3.7 * s))} for s in range(1, n + 1)]


def test_a_faithful_resume_passes_and_each_kind_of_fault_fails(tmp_path: Path) -> None:
    ref = _reference()
    a = _write(tmp_path / "a.jsonl", ref)
    # resumed at step 10: steps 9-10 were logged by the dead attempt and redone; kernels add 0.1% noise
    good = ref[:10] + [dict(r, loss=r["loss"] * 1.001) for r in ref[10:]]
    replayed = ref[:10] + ref[8:]  # the same steps logged twice
    wrong_lr = ref[:10] + [dict(r, lr=ref[0]["lr"]) for r in ref[10:]]  # schedule restarted
    wrong_data = ref[:10] + [dict(r, loss=ref[i - 1]["loss"]) for i, r in enumerate(ref[10:], 10)]  # batches shifted
    short = ref[:15]
    diverged = good[:15] + [dict(good[15], loss=float("nan"))] + good[16:]  # max() alone would skip the NaN
    runs = {"good": good, "replayed": replayed, "wrong_lr": wrong_lr, "wrong_data": wrong_data, "short": short,
            "diverged": diverged}
    paths = ",".join(f"{k}={_write(tmp_path / f'{k}.jsonl', v)}" for k, v in runs.items())
    out = tmp_path / "cmp.json"
    assert resume_compare.main(["--reference", str(a), "--runs", paths, "--out", str(out)]) == 1
    res = json.loads(out.read_text())
    assert res["good"]["ok"] and res["good"]["max_loss_rel_diff"] < 2e-3
    assert [k for k, r in res.items() if not r["ok"]] == ["replayed", "wrong_lr", "wrong_data", "short", "diverged"]
    assert res["replayed"]["steps_logged"] == 22 and res["replayed"]["steps_unique"] == 20
    assert res["wrong_data"]["max_loss_rel_diff"] > 0.05
    assert resume_compare.main(["--reference", str(a), "--runs", f"good={tmp_path / 'good.jsonl'}"]) == 0
