"""benchmarks/trace_gaps.py: GPU idle blamed on the host's phase and op, on a trace in the profiler's format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from trace_gaps import analyse  # noqa: E402


def _x(cat, name, ts, dur, tid, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1, "args": args}


def _trace() -> dict:
    """One step (1000 us): a kernel, then a 200 us host hook with the GPU dry, a host sync, a second kernel
    launched late inside the optimizer phase."""
    host, gpu = 1, 7
    return {"traceEvents": [
        _x("user_annotation", "ProfilerStep#20", 0, 1000, host),
        _x("user_annotation", "train/backward", 0, 400, host),
        _x("cpu_op", "aten::mm", 10, 20, host),
        _x("cuda_runtime", "cudaLaunchKernel", 15, 5, host, correlation=1),
        _x("kernel", "gemm", 20, 30, gpu, correlation=1),
        _x("cpu_op", "deepspeed_hook", 40, 300, host),
        _x("cuda_runtime", "cudaStreamSynchronize", 60, 40, host),
        _x("user_annotation", "train/optimizer", 400, 300, host),
        _x("cpu_op", "aten::_fused_adamw_", 600, 50, host),
        _x("cuda_runtime", "cudaLaunchKernel", 610, 5, host, correlation=2),
        _x("kernel", "adamw", 620, 40, gpu, correlation=2),
        _x("kernel", "adamw_tail", 655, 10, gpu, correlation=3),  # overlaps the previous: no hole
    ]}


def test_holes_are_blamed_on_the_phase_and_op_running_when_the_gpu_ran_dry(tmp_path: Path) -> None:
    res = analyse(_trace(), min_gap_us=5)
    # busy: 30 + 40 + 5 us; idle: 50 -> 620 us, blamed where the host was at 50 us: the hook in the backward
    assert res["steps"] == 1
    assert res["gpu_busy_ms_per_step"] == pytest.approx(0.075)
    assert res["gpu_idle_ms_per_step"] == pytest.approx(0.570)
    assert res["idle_ms_per_step_by_phase"] == {"train/backward": pytest.approx(0.570)}
    assert list(res["idle_ms_per_step_by_host_op"]) == ["deepspeed_hook"]
    (sync,) = res["host_syncs"].items()
    assert sync[0].startswith("cudaStreamSynchronize in train/backward: deepspeed_hook") and sync[1]["calls"] == 1
    assert analyse(_trace(), min_gap_us=1000)["gpu_idle_ms_per_step"] == 0  # shorter holes are left out
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(_trace()))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trace_gaps.py"), str(path)], capture_output=True,
                         text=True, check=True).stdout
    assert "idle 0.6 ms a step" in out and "train/backward" in out


def test_a_trace_without_gpu_events_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"traceEvents": [_x("cpu_op", "aten::mm", 0, 5, 1)]}))
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trace_gaps.py"), str(path)], capture_output=True,
                         text=True)
    assert run.returncode != 0 and "no GPU events" in run.stderr
