"""Smoke job for a cluster: runs tasks on every node and reports what Ray sees.

    ray job submit --working-dir . -- python pipelines/cluster_check.py --tasks 8
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from a checkout without install

from pipelines.common.config import run_cli  # noqa: E402
from pipelines.common.errors import UserError, require  # noqa: E402


def _probe(i: int) -> dict:
    import torch
    return {"task": i, "host": socket.gethostname(), "pid": os.getpid(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=4, help="number of probe tasks")
    args = parser.parse_args(argv)
    if args.tasks < 1:
        raise UserError(f"--tasks must be at least 1, got {args.tasks}")
    require("ray", "torch")
    import ray

    from pipelines.common.job import init_ray
    init_ray()
    t0 = time.time()
    results = ray.get([ray.remote(num_cpus=0.5)(_probe).remote(i) for i in range(args.tasks)])
    resources = ray.cluster_resources()
    print(f"cluster: {len(ray.nodes())} node(s), resources {dict(sorted(resources.items()))}")
    hosts = sorted({r["host"] for r in results})
    print(f"ran {len(results)} tasks on {hosts} in {time.time() - t0:.2f}s; torch {results[0]['torch']}, "
          f"cuda={any(r['cuda'] for r in results)}")
    print("cluster check OK")
    return 0


if __name__ == "__main__":
    run_cli(main)
