"""Where a profiled training step leaves the GPU idle, from the loop's Chrome trace.

    python benchmarks/trace_gaps.py <output>/profile/trace_rank0.json [--min-gap-us 5] [--top 20]

The loop's profiler (``--profile-at N``) gives device and host time per phase; this finds the holes in the GPU's
timeline (no kernel, copy or memset running) and blames each on what the host was doing: the kernel that ends a
hole was launched late, so the hole belongs to the host operation that was running when the GPU ran dry (the
innermost ``cpu_op`` or annotation open at the hole's start on the thread that made the launch), and to the
loop's phase (``train/...``) around it. Host syncs (stream, device and event synchronizations, blocking copies)
are listed too: after one, the GPU waits for the host to queue work again.
"""

from __future__ import annotations

import argparse
import bisect
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATS = ("cpu_op", "user_annotation", "python_function")
SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def _open_at(events: list[dict[str, Any]], starts: list[float], t: float) -> list[dict[str, Any]]:
    """Host events open at time t, outermost first (events sorted by start)."""
    i = bisect.bisect_right(starts, t)
    # ranges nest, so only ones that began earlier can hold t; a window back is enough for a step's trace
    open_ = [e for e in events[max(0, i - 20000):i] if e["ts"] + e.get("dur", 0) > t]
    return sorted(open_, key=lambda e: (e["ts"], -e.get("dur", 0)))


def analyse(trace: dict[str, Any], min_gap_us: float = 5.0) -> dict[str, Any]:
    ev = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    gpu = sorted((e for e in ev if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    if not gpu:
        raise SystemExit("no GPU events in this trace: profile a CUDA run")
    launches = {e["args"]["correlation"]: e for e in ev
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    host = defaultdict(list)
    for e in ev:
        if e.get("cat") in HOST_CATS:
            host[e["tid"]].append(e)
    starts = {}
    for tid, lst in host.items():
        lst.sort(key=lambda e: e["ts"])
        starts[tid] = [e["ts"] for e in lst]
    steps = [e for e in ev if e.get("cat") == "user_annotation" and e["name"].startswith("ProfilerStep")]
    lo = min((e["ts"] for e in steps), default=gpu[0]["ts"])

    by_op: dict[str, float] = defaultdict(float)
    by_phase: dict[str, float] = defaultdict(float)
    busy = idle = 0.0
    end = gpu[0]["ts"] + gpu[0]["dur"]
    busy += gpu[0]["dur"]
    for k in gpu[1:]:
        if k["ts"] > end:
            gap = k["ts"] - end
            if gap >= min_gap_us and k["ts"] >= lo:
                idle += gap
                launch = launches.get(k.get("args", {}).get("correlation"))
                tid = launch["tid"] if launch else None
                stack = _open_at(host[tid], starts[tid], end) if tid in host else []
                phase = next((e["name"] for e in stack if e["name"].startswith("train/")), "(outside phases)")
                ops = [e["name"] for e in stack if not e["name"].startswith(("train/", "ProfilerStep"))]
                by_phase[phase] += gap
                by_op[" > ".join(ops[-2:]) if ops else "(no host op open)"] += gap
            busy += k["dur"]
            end = k["ts"] + k["dur"]
        elif k["ts"] + k["dur"] > end:
            busy += k["ts"] + k["dur"] - end
            end = k["ts"] + k["dur"]
    syncs: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in ev:
        if e.get("cat") == "cuda_runtime" and e["name"].startswith(SYNC_NAMES):
            stack = _open_at(host[e["tid"]], starts[e["tid"]], e["ts"]) if e["tid"] in host else []
            phase = next((s["name"] for s in stack if s["name"].startswith("train/")), "(outside phases)")
            ops = [s["name"] for s in stack if not s["name"].startswith(("ProfilerStep", "train/"))]
            key = f"{e['name']} in {phase}: {' > '.join(ops[:2] + ['...'] + ops[-2:] if len(ops) > 4 else ops) or '?'}"
            syncs[key][0] += 1
            syncs[key][1] += e.get("dur", 0)
    n = max(len(steps), 1)
    return {"steps": len(steps), "gpu_busy_ms_per_step": busy / 1e3 / n, "gpu_idle_ms_per_step": idle / 1e3 / n,
            "idle_ms_per_step_by_phase": {k: v / 1e3 / n for k, v in sorted(by_phase.items(), key=lambda kv: -kv[1])},
            "idle_ms_per_step_by_host_op": {k: v / 1e3 / n for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
            "host_syncs": {k: {"calls": c, "ms": d / 1e3} for k, (c, d) in sorted(syncs.items(), key=lambda kv: -kv[1][1])}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path)
    ap.add_argument("--min-gap-us", type=float, default=5.0, help="ignore holes shorter than this")
    ap.add_argument("--top", type=int, default=20, help="rows of each table")
    ap.add_argument("--json", type=Path, help="write the full result here")
    args = ap.parse_args()
    res = analyse(json.loads(args.trace.read_text()), args.min_gap_us)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    print(f"{res['steps']} steps: GPU busy {res['gpu_busy_ms_per_step']:.1f} ms, idle {res['gpu_idle_ms_per_step']:.1f} ms a step")
    for title in ("idle_ms_per_step_by_phase", "idle_ms_per_step_by_host_op"):
        print(title)
        for k, v in list(res[title].items())[:args.top]:
            print(f"  {v:7.2f}  {k[:150]}")
    print("host syncs (calls, ms in all)")
    for k, v in list(res["host_syncs"].items())[:args.top]:
        print(f"  {v['calls']:5d} {v['ms']:8.2f}  {k[:150]}")


if __name__ == "__main__":
    main()
