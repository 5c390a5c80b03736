"""Where a profiled training step leaves the GPU idle, from the loop's Chrome trace.

    python benchmarks/trace_gaps.py <output>/profile/trace_rank0.json [--steps N] [--min-gap-us 5] [--top 20]

The loop's profiler (``--profile-at N``) gives device and host time per phase; this finds the holes in the GPU's
timeline (no kernel, copy or memset running) inside the profiled steps and blames each one:

* on the loop's phase (``train/...``, on whichever thread marked it) open when the GPU ran dry;
* on the host operation that was running then on the thread that launched the kernel ending the hole (the
  innermost ``cpu_op`` or annotation): that launch came late, so that is what the GPU waited for. Kernels are
  matched to their launches (CUDA runtime or driver API) by correlation id; backward kernels come from the
  autograd engine's thread, so its stack is the one read for them.

It also lists the host syncs (stream, device and event synchronizations, blocking copies): after one, the GPU
waits for the host to queue work again. Every figure is per step; the step count comes from ``--steps``, the
trace's ``ProfilerStep`` ranges, or the ``phases_rank*.json`` the loop writes beside its trace.
"""

from __future__ import annotations

import argparse
import bisect
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")  # Triton kernels launch through the driver API
HOST_CATS = ("cpu_op", "user_annotation", "python_function")
SYNC_NAMES = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                        "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize"})
PHASE_PREFIX = "train/"


def _end(e: dict[str, Any]) -> float:
    return e["ts"] + e.get("dur", 0)


def _stacks_at(events: list[dict[str, Any]], times: list[float]) -> dict[float, list[dict[str, Any]]]:
    """The host ranges open at each time, outermost first: one sweep over the thread's ranges."""
    events = sorted(events, key=lambda e: (e["ts"], -e.get("dur", 0)))
    out, stack, i = {}, [], 0
    for t in sorted(set(times)):
        while i < len(events) and events[i]["ts"] <= t:
            stack = [s for s in stack if _end(s) > events[i]["ts"]] + [events[i]]
            i += 1
        out[t] = [s for s in stack if _end(s) > t]
    return out


def count_steps(trace_path: Path, trace: dict[str, Any]) -> int:
    """Profiled steps: ProfilerStep ranges if the trace has them, else the loop's phases file beside it."""
    steps = sum(1 for e in trace.get("traceEvents", []) if e.get("ph") == "X"
                and str(e.get("name", "")).startswith("ProfilerStep"))
    if steps:
        return steps
    for phases in sorted(trace_path.parent.glob("phases_rank*.json")):
        return int(json.loads(phases.read_text())["steps"])
    raise SystemExit(f"error: cannot tell how many steps {trace_path} holds (no ProfilerStep ranges and no "
                     "phases_rank*.json beside it); pass --steps")


def analyse(trace: dict[str, Any], steps: int, min_gap_us: float = 5.0) -> dict[str, Any]:
    ev = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    phases = sorted((e for e in ev if e.get("cat") == "user_annotation" and e["name"].startswith(PHASE_PREFIX)),
                    key=lambda e: e["ts"])
    if not phases:
        raise SystemExit("error: no train/... phases in this trace: profile the training loop (--profile-at N)")
    lo, hi = phases[0]["ts"], max(_end(e) for e in phases)
    gpu = sorted(({**e, "ts": max(e["ts"], lo), "dur": min(_end(e), hi) - max(e["ts"], lo)}
                  for e in ev if e.get("cat") in GPU_CATS and _end(e) > lo and e["ts"] < hi), key=lambda e: e["ts"])
    if not gpu:
        raise SystemExit("error: no GPU events in this trace's phases: profile a CUDA run")
    launches = {e["args"]["correlation"]: e for e in ev
                if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
    phase_starts = [e["ts"] for e in phases]

    def phase_at(t: float) -> str:
        i = bisect.bisect_right(phase_starts, t) - 1
        return phases[i]["name"] if i >= 0 and _end(phases[i]) > t else "(between phases)"

    holes = []  # (start, length, thread of the late launch)
    busy, end = 0.0, lo  # a GPU idle when the first phase opens is idle too
    for k in gpu:
        if k["ts"] > end:
            if k["ts"] - end >= min_gap_us:
                launch = launches.get(k.get("args", {}).get("correlation"))
                holes.append((end, k["ts"] - end, launch["tid"] if launch else None))
            end = k["ts"]
        if _end(k) > end:
            busy += _end(k) - end
            end = _end(k)
    host = defaultdict(list)
    for e in ev:
        if e.get("cat") in HOST_CATS and not e["name"].startswith(("ProfilerStep", PHASE_PREFIX)):
            host[e["tid"]].append(e)
    syncs = [e for e in ev if e.get("cat") in LAUNCH_CATS and e["name"] in SYNC_NAMES and lo <= e["ts"] < hi]
    queries = defaultdict(list)
    for start, _, tid in holes:
        queries[tid].append(start)
    for e in syncs:
        queries[e["tid"]].append(e["ts"])
    stacks = {tid: _stacks_at(host.get(tid, []), ts) for tid, ts in queries.items()}

    def ops(tid: Any, t: float) -> list[str]:
        return [s["name"] for s in stacks.get(tid, {}).get(t, [])]

    by_op: dict[str, float] = defaultdict(float)
    by_phase: dict[str, float] = defaultdict(float)
    for start, length, tid in holes:
        by_phase[phase_at(start)] += length
        names = ops(tid, start)
        by_op[" > ".join(names[-2:]) if names else "(no host op open)"] += length
    by_sync: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in syncs:
        names = ops(e["tid"], e["ts"])
        where = " > ".join(names[:2] + ["..."] + names[-2:] if len(names) > 4 else names) or "?"
        row = by_sync[f"{e['name']} in {phase_at(e['ts'])}: {where}"]
        row[0] += 1
        row[1] += e.get("dur", 0)

    def per_step(table: dict[str, float]) -> dict[str, float]:
        return {k: v / 1e3 / steps for k, v in sorted(table.items(), key=lambda kv: -kv[1])}
    return {"steps": steps, "wall_ms_per_step": (hi - lo) / 1e3 / steps, "gpu_busy_ms_per_step": busy / 1e3 / steps,
            "gpu_idle_ms_per_step": sum(h[1] for h in holes) / 1e3 / steps,
            "idle_ms_per_step_by_phase": per_step(by_phase), "idle_ms_per_step_by_host_op": per_step(by_op),
            "host_syncs_per_step": {k: {"calls": c / steps, "ms": d / 1e3 / steps}
                                    for k, (c, d) in sorted(by_sync.items(), key=lambda kv: -kv[1][1])}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path)
    ap.add_argument("--steps", type=int, default=0, help="profiled steps in the trace (default: found in it or beside it)")
    ap.add_argument("--min-gap-us", type=float, default=5.0, help="ignore holes shorter than this")
    ap.add_argument("--top", type=int, default=20, help="rows of each table")
    ap.add_argument("--json", type=Path, help="write the full result here")
    args = ap.parse_args()
    trace = json.loads(args.trace.read_text())
    res = analyse(trace, args.steps or count_steps(args.trace, trace), args.min_gap_us)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    print(f"{res['steps']} steps, per step: wall {res['wall_ms_per_step']:.1f} ms, GPU busy "
          f"{res['gpu_busy_ms_per_step']:.1f} ms, idle {res['gpu_idle_ms_per_step']:.1f} ms")
    for title in ("idle_ms_per_step_by_phase", "idle_ms_per_step_by_host_op"):
        print(title)
        for k, v in list(res[title].items())[:args.top]:
            print(f"  {v:7.2f}  {k[:150]}")
    print("host syncs per step (calls, ms)")
    for k, v in list(res["host_syncs_per_step"].items())[:args.top]:
        print(f"  {v['calls']:5.1f} {v['ms']:8.2f}  {k[:150]}")


if __name__ == "__main__":
    main()
