"""The Ray Data driver shared by the data jobs (render and pseudo-4D).

The driver lists items, drops those an earlier run finished, groups the rest
into parts and maps the parts over a pool of Ray actors. Each actor builds its
item processor once (a warm Blender, a decoder) and turns a part into shards
plus commit records (see shards.py). Only a few counters per part come back to
the driver, so its memory stays flat however many items there are.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from pipelines.common.config import ensure_output_dir
from pipelines.common.errors import ItemError
from pipelines.common.shards import Failure, PartResult, Sample, commit_part, consolidate, scan_output


class ItemProcessor(Protocol):
    """Turns one item into samples. It may also have ``prefetch(items)``: the worker calls it with a part's
    items before processing them in that order (e.g. to download ahead of the renders)."""

    def __call__(self, item: dict[str, Any]) -> list[Sample]: ...


@dataclass
class JobSpec:
    """Everything the shared driver needs to run one data job."""

    name: str
    output: Path
    items: list[dict[str, Any]]
    """Each item has a unique ``item_id`` plus whatever its processor reads."""
    make_processor: Callable[[], ItemProcessor]
    """Called once per actor; must be picklable (a module-level function or a partial)."""
    items_per_part: int = 8
    concurrency: int = 1
    num_cpus: float = 1.0
    retry_failed: bool = False
    ray_address: str = ""
    extra_summary: dict[str, Any] = field(default_factory=dict)
    index_summary: Callable[[Any], dict[str, Any]] | None = None
    """(the consolidated index, a pyarrow Table) -> more summary entries. From the index, not this run's parts,
    so they describe the whole output across resumed runs (e.g. the render filters' funnel)."""


def init_ray(address: str = "", num_cpus: int | None = None) -> None:
    """Connect to the cluster in ``address``/RAY_ADDRESS, or start a private local one."""
    import ray
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    kwargs: dict[str, Any] = dict(log_to_driver=True, configure_logging=False)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # The dashboard (loopback only) backs the state API that Ray Train and Ray Data progress use.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=None, dashboard_host="127.0.0.1", **kwargs)


def nodes_missing(path: str | Path, timeout_s: float = 300.0) -> list[str]:
    """The alive Ray nodes on which ``path`` does not exist, each checked by a task pinned to it (the driver's
    own node included): a job's output must be one folder that every node writes to and the driver reads."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def exists(p: str) -> bool:
        return os.path.exists(p)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(str(path)) for n in nodes]
    # a node that cannot start a task in that time (its runtime_env failing, say) is reported, not waited on
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    found = [ray.get(r) if r in ready else None for r in refs]
    return [f"{n.get('NodeManagerAddress')} ({n['NodeID'][:8]})" + ("" if ok is False else ": no answer")
            for n, ok in zip(nodes, found) if not ok]


def check_shared_output(output: Path, what: str) -> None:
    """Refuse, before any work, an output folder that not every node of the cluster sees.

    On several nodes, each worker writes where the path points on its own node: a node-local folder (or a
    relative path, resolved in each node's copy of the job's working directory) keeps that node's work where the
    driver never looks, and the run ends "ok" with part of it missing. One Ray task per node looks for a marker
    the driver just wrote. A single node passes at once. Nodes an autoscaler adds later are not checked."""
    import ray
    if len([n for n in ray.nodes() if n.get("Alive")]) < 2:
        return
    output = output.resolve()  # as the workers get it: a relative path resolves in each task's own folder
    output.mkdir(parents=True, exist_ok=True)
    marker = output / f".shared-check-{os.getpid()}"
    marker.write_text("")
    try:
        missing = nodes_missing(marker)
    finally:
        marker.unlink(missing_ok=True)
    if missing:
        from pipelines.common.errors import UserError
        raise UserError(f"the {what} {output} is not visible on node(s) {', '.join(missing)} of this cluster: "
                        "their work would stay where the driver never reads it. Give an absolute path on storage "
                        "every node mounts at that path (NFS, a shared volume; cluster/README.md)")


class _PartWorker:
    """Ray Data actor: one warm processor, many parts."""

    def __init__(self, make_processor: Callable[[], ItemProcessor], output: str) -> None:
        self.processor = make_processor()
        self.output = Path(output)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        start = time.time()
        part = int(row["part"])
        samples: list[Sample] = []
        failures: list[Failure] = []
        ok = 0
        items = json.loads(row["items"])
        ahead = getattr(self.processor, "prefetch", None)
        if ahead is not None:  # e.g. downloads that overlap the renders (pipelines/render_objaverse.py)
            ahead(items)
        for item in items:
            t0 = time.time()
            try:
                produced = self.processor(item)
                if not produced:
                    raise ItemError("process", "produced no samples")
                samples.extend(produced)
                ok += 1
            except ItemError as exc:
                failures.append(Failure(item["item_id"], exc.stage, str(exc), time.time() - t0))
            except Exception as exc:  # a bug or an unforeseen input: keep the job alive, keep the evidence
                tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
                failures.append(Failure(item["item_id"], "process", f"{type(exc).__name__}: {exc} ({tb})",
                                        time.time() - t0))
        result = commit_part(self.output, part, samples, failures)
        result.items_ok, result.items_failed = ok, len(failures)
        result.seconds = time.time() - start
        import ray
        # which node did the part: the summary counts them, so a cluster run shows it used the cluster
        return {"result": json.dumps({**result.__dict__, "node": ray.get_runtime_context().get_node_id()})}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_job(spec: JobSpec) -> dict[str, Any]:
    """Plan, run and summarise a data job; returns the summary (also written to summary.json)."""
    import ray

    t_start = time.time()
    output = ensure_output_dir(spec.output)
    state = scan_output(output)
    if state.removed_orphans:
        print(f"[{spec.name}] removed {len(state.removed_orphans)} leftovers of an interrupted run", flush=True)
    skip = state.done_items | (set() if spec.retry_failed else state.failed_items)
    seen: set[str] = set()
    todo = []
    for item in spec.items:
        iid = item["item_id"]
        if iid in seen:
            continue  # the same asset listed twice must not become two samples
        seen.add(iid)
        if iid not in skip:
            todo.append(item)
    n_parts = (len(todo) + spec.items_per_part - 1) // spec.items_per_part
    print(f"[{spec.name}] {len(seen)} items: {len(state.done_items & seen)} already done, "
          f"{len(state.failed_items & seen)} failed before{' (retrying)' if spec.retry_failed else ' (skipped)'}, "
          f"{len(todo)} to do in {n_parts} parts", flush=True)

    totals = PartResult(part=-1)
    nodes: set[str] = set()
    if todo:
        init_ray(spec.ray_address)
        check_shared_output(output, "output")
        rows = [{"part": state.next_part + i,
                 "items": json.dumps(todo[i * spec.items_per_part:(i + 1) * spec.items_per_part])}
                for i in range(n_parts)]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(n_parts, 1000)))
        # absolute: a relative path would resolve in each worker's own working directory
        ds = ds.map(_PartWorker, fn_constructor_kwargs=dict(make_processor=spec.make_processor,
                                                            output=str(output.resolve())),
                    concurrency=max(1, min(spec.concurrency, n_parts)), num_cpus=spec.num_cpus)
        done_parts = 0
        for row in ds.iter_rows():
            r = json.loads(row["result"])
            done_parts += 1
            nodes.add(r["node"])
            for k in ("items_ok", "items_failed", "samples", "frames", "bytes"):
                setattr(totals, k, getattr(totals, k) + r[k])
            for f in r["failures"]:
                print(f"[{spec.name}] FAILED {f['item_id']} at {f['stage']}: {f['error']}", file=sys.stderr, flush=True)
            el = time.time() - t_start
            print(f"[{spec.name}] part {done_parts}/{n_parts} | items ok {totals.items_ok} failed {totals.items_failed} "
                  f"| samples {totals.samples} | frames {totals.frames} ({totals.frames / max(el, 1e-9):.1f}/s) "
                  f"| {el:.0f}s", flush=True)
    index, failures = consolidate(output)
    wall = time.time() - t_start
    summary = dict(job=spec.name, output=str(output), items_total=len(seen), items_ok_this_run=totals.items_ok,
                   items_failed_this_run=totals.items_failed, items_skipped=len(seen) - len(todo),
                   samples_this_run=totals.samples, frames_this_run=totals.frames,
                   frames_per_second=totals.frames / wall if wall > 0 else 0.0,
                   samples_total=index.num_rows, failures_total=failures.num_rows, wall_seconds=wall,
                   nodes_used=len(nodes),
                   driver_peak_rss_mb=_peak_rss_mb(), **spec.extra_summary,
                   **(spec.index_summary(index) if spec.index_summary is not None else {}))
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[{spec.name}] done in {wall:.1f}s: {totals.items_ok} items ok, {totals.items_failed} failed, "
          f"{totals.samples} samples, {totals.frames} frames ({summary['frames_per_second']:.1f} frames/s); "
          f"output holds {index.num_rows} samples, {failures.num_rows} failures -> {output}", flush=True)
    return summary


def exit_code(summary: dict[str, Any]) -> int:
    """The one exit-code rule of the data jobs: 1 when the output holds nothing after a run whose items all
    failed (a pipeline step after it must not go on), else 0. Partial failures exit 0: they are recorded in
    failures.parquet and counted in the summary, and one bad item never sinks a job; nor does a re-run whose
    few remaining items fail again beside an earlier run's good samples."""
    nothing = summary["items_failed_this_run"] and not summary["items_ok_this_run"] and not summary["samples_total"]
    return 1 if nothing else 0
