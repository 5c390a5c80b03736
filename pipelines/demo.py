"""The embedded demo: render -> pseudo-4D -> train base -> train 4D -> generate, each a real Ray job.

`make demo` runs this. It starts (or reuses) the loopback Ray head of
cluster/start_local.sh and submits every stage with `ray job submit`, exactly as
a user would on a cluster, then prints where the shards, checkpoints, pictures
and the MLflow UI are.

Quiet by default: each stage shows a header, one status line taken from the
stage's own `[render] ...` / `[train base] step ...` lines (updated in place on
a terminal) and a closing line; everything it printed (Ray's INFO lines, actor
output, tracebacks) goes to <output>/logs/<stage>.log. `--verbose` (make demo
VERBOSE=1) streams it all instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from a checkout without install

from pipelines.common.config import run_cli  # noqa: E402
from pipelines.common.errors import UserError  # noqa: E402
from pipelines.common.stage_runner import run_stage  # noqa: E402


def _show(path: Path) -> str:
    """A path as the user typed it: relative to the current directory when it lies below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _head_env(logs: Path, verbose: bool) -> dict[str, str]:
    """Start the loopback head unless one from start_local.sh is up; return the env that reaches it."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    state = Path(env.get("RAY_LOCAL_DIR", Path(env.get("XDG_CACHE_HOME", Path.home() / ".cache")) /
                         "fourreal-video" / "ray"))
    env_file = state / "env.sh"
    alive = False
    if env_file.exists():
        probe = dict(env)
        probe.update(_read_env(env_file))
        alive = subprocess.run(["ray", "job", "list"], env=probe, capture_output=True, timeout=60).returncode == 0
    if not alive:
        print("[demo] starting a local Ray head on 127.0.0.1 ...", end="\n" if verbose else " ", flush=True)
        t0 = time.time()
        out = subprocess.run([str(ROOT / "cluster/start_local.sh")], env=env, text=True, capture_output=True)
        log = logs / "ray_head.log"
        log.write_text(f"$ {ROOT / 'cluster/start_local.sh'}\n{out.stdout}{out.stderr}# exit code {out.returncode}\n")
        if out.returncode != 0:
            if not verbose:
                print("failed", flush=True)
            raise UserError(f"could not start the local Ray head: {out.stderr.strip() or out.stdout.strip()} "
                            f"(log: {_show(log)})")
        print(out.stdout.strip() if verbose else f"up in {time.time() - t0:.0f}s (log: {_show(log)})", flush=True)
    env.update(_read_env(env_file))
    if alive and not verbose:
        print(f"[demo] using the Ray head already running at {env.get('RAY_ADDRESS', '?')}", flush=True)
    return env


def _read_env(path: Path) -> dict[str, str]:
    pairs = [line.removeprefix("export ").split("=", 1) for line in path.read_text().splitlines() if "=" in line]
    return {k: v for k, v in pairs}


# Status lines that only point at outputs (the summary lists those): the stage's last shown line stays its
# last step or its result (`[train base] step 600/600 | loss ...`, `[generate] 4x8 grid ... in 12.4s`).
STATUS_SKIP = r"\] (?:MLflow:|final checkpoint|done: final checkpoint|contact sheet:|videos:)"


def _submit(env: dict[str, str], name: str, args: list[str], *, key: str, tags: tuple[str, ...], outputs: Path,
            logs: Path, verbose: bool, index: str) -> None:
    """One stage as a Ray job; quiet unless ``verbose``: its output goes to ``logs/<key>.log``."""
    cmd = ["ray", "job", "submit", "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "cluster/runtime_env.yaml"),
           "--", "python", *args]
    log = logs / f"{key}.log"
    if verbose:
        print(f"\n[demo] === {name} ===\n[demo] $ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    else:
        print(f"[demo] {index} {name}", flush=True)
    result = run_stage(cmd, log=log, tags=tags, env=env, cwd=ROOT, stream=sys.stdout, verbose=verbose,
                       skip=STATUS_SKIP)
    if not result.ok:
        raise UserError(f"demo stage '{name}' failed; full log: {_show(log)}")
    if verbose:
        print(f"[demo] {name} finished in {result.seconds:.0f}s (log: {_show(log)})", flush=True)
    else:
        print(f"  done in {result.seconds:.0f}s -> {_show(outputs)}   (log: {_show(log)})", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default=str(ROOT / "outputs" / "demo"), help="where all demo results go")
    parser.add_argument("--verbose", action="store_true",
                        help="stream every stage's full output (Ray's logs included) instead of one status line")
    args = parser.parse_args(argv)
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    env = _head_env(logs, args.verbose)
    mlflow_uri = f"sqlite:///{out / 'mlflow.db'}"  # one store, an experiment per stage
    # (log name, title, job arguments, the job's status-line tags, its outputs)
    stages: list[tuple[str, str, list[str], tuple[str, ...], Path]] = [
        ("render", "render procedural assets (Blender/Cycles)",
         ["pipelines/render_objaverse.py", "--preset", "demo", "--output", str(out / "render")],
         ("render",), out / "render"),
        ("pseudo4d", "pseudo-4D grids from procedural videos",
         ["pipelines/make_pseudo4d.py", "--preset", "demo", "--output", str(out / "pseudo4d")],
         ("pseudo4d",), out / "pseudo4d"),
        ("train_base", "train the base video model",
         ["training/train_base.py", "--preset", "demo", "--output", str(out / "train_base"), "--mlflow-uri", mlflow_uri,
          "--data.grids", f"{out / 'pseudo4d'},{out / 'render'}", "--data.clips", str(out / "pseudo4d" / "clips")],
         ("train base", "train"), out / "train_base"),
        ("train_4d", "train the 4D model (soft sync)",
         ["training/train_4d.py", "--preset", "demo", "--output", str(out / "train_4d"), "--mlflow-uri", mlflow_uri,
          "--base-checkpoint", str(out / "train_base" / "checkpoint_final"),
          "--data.grids", f"{out / 'pseudo4d'},{out / 'render'}", "--data.weights", "0.7,0.3"],
         ("train 4d", "train"), out / "train_4d"),
    ]
    generate = ROOT / "pipelines" / "generate_4d.py"
    if generate.exists():
        stages.append(("generate", "generate a 4D grid",
                       ["pipelines/generate_4d.py", "--checkpoint", str(out / "train_4d" / "checkpoint_final"),
                        "--from-grid", str(out / "render"), "--out", str(out / "generated")],
                       ("generate",), out / "generated"))
    proof = ROOT / "weights" / "proof"
    if (proof / "soft.pt.gz").exists():
        # What a trained model does: the proof run's weights (one H100, docs/results.md) on a held-out grid.
        stages.append(("generate_proof", "fill a held-out grid with the proof model (trained on a GPU)",
                       ["pipelines/generate_4d.py", "--checkpoint", str(proof / "soft.pt.gz"), "--from-grid",
                        str(proof / "heldout"), "--steps", "10", "--method", "euler", "--out",
                        str(out / "generated_proof")],
                       ("generate",), out / "generated_proof"))
    t0 = time.time()
    for i, (key, name, job_args, tags, outputs) in enumerate(stages, 1):
        _submit(env, name, job_args, key=key, tags=tags, outputs=outputs, logs=logs, verbose=args.verbose,
                index=f"{i}/{len(stages)}")
    print(f"\n[demo] all stages done in {time.time() - t0:.0f}s. Results under {out}:")
    print(f"  rendered shards      {out / 'render' / 'shards'}  (index.parquet, failures.parquet)")
    print(f"  pseudo-4D shards     {out / 'pseudo4d' / 'shards'} and clips {out / 'pseudo4d' / 'clips'}")
    print(f"  base checkpoint      {out / 'train_base' / 'checkpoint_final'}")
    print(f"  4D checkpoint        {out / 'train_4d' / 'checkpoint_final'}")
    if (out / "generated").exists():
        print(f"  generated grid       {out / 'generated' / 'contact_sheet.png'} and MP4s in {out / 'generated'}"
              "  (the demo's own model, minutes of CPU training: blobs, not objects yet)")
    if (out / "generated_proof").exists():
        print(f"  proof-model grid     {out / 'generated_proof' / 'contact_sheet.png'}  (weights/proof: trained on "
              "one H100, see docs/results.md)")
    print(f"  MLflow UI            .venv/bin/mlflow ui --backend-store-uri {mlflow_uri} --port 5000  "
          "-> http://127.0.0.1:5000 (experiments 4real-base, 4real-4d)")
    print(f"  Ray dashboard        {env['RAY_ADDRESS']}   (stop the head with: make ray-down)")
    print(f"  full logs            {logs}  (one per stage; make demo VERBOSE=1 streams them)")
    return 0


if __name__ == "__main__":
    run_cli(main)
