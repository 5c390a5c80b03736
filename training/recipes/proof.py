"""The proof run (docs/results.md): the project's own data, base, 4D in the paper's two phases, upsampler,
held-out evaluation and shippable weights, each step through the real jobs.

    python -m training.recipes.proof --out outputs/proof                 # every step not done yet (GPU)
    python -m training.recipes.proof --out outputs/proof --steps renders  # one step (renders need Blender)
    python -m training.recipes.proof --preset tiny --out /tmp/proof-tiny  # the whole chain in minutes on CPU

``--preset`` picks the sizes (proof: the GPU run; tiny: the same chain on CPU for tests).

Steps, in order (``STEPS``): renders and pseudo-4D data (train and held-out sets from disjoint seeds), the
base model, phase 1 of the 4D model on pseudo-4D grids for soft, hard and sequential sync (and the upsampler,
beside them), phase 2 (a short fine-tune from phase 1 on renders; plus soft continued on pseudo-4D alone for
the same steps: the paper's ablation 2), the export of slim bf16 weights, the choice of the 4D sampler on
validation sets (seeds neither trained on nor held out), and evaluation on the held-out sets with it.
A step whose output exists is skipped, and the training jobs resume from their last checkpoint, so running
the same command again continues where a stopped call left off. Jobs of one step run side by side: these
models are too small to fill a GPU alone. One status line per job; full logs in <out>/logs/.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file from a checkout without install

from pipelines.common.config import doc, parse_config, run_cli, write_resolved  # noqa: E402
from pipelines.common.errors import UserError  # noqa: E402

TRAINED = ("soft", "hard", "sequential")


@dataclass
class ProofConfig:
    out: str = doc("outputs/proof", "run folder: data/, one folder per training run, eval/, weights/, logs/")
    train_preset: str = doc("proof", "training preset of every stage (proof on a GPU; tiny for a CPU smoke run)")
    steps: list[str] = doc(text="steps to run (default: all, in order, skipping finished ones)", factory=list)
    render_assets: int = doc(56, "procedural assets rendered for training (two actions each); run 6 tried 168 "
                             "in phase 2 and gained nothing on held-out renders (docs/results.md)")
    render_part_assets: int = doc(56, "assets per render output folder (data/render, data/render_p1, ...): one "
                                  "folder must travel in one GPU call, and 56 assets are ~31 MB of shards")
    render_heldout_assets: int = doc(12, "procedural assets rendered for the held-out set (other seeds)")
    render_preset: str = doc("proof", "render job preset (resolution, views, frames, samples)")
    render_args: list[str] = doc(text="extra flags for the render job", factory=list)
    pseudo_videos: int = doc(3000, "procedural videos turned into pseudo-4D training grids")
    pseudo_heldout_videos: int = doc(32, "procedural videos for the held-out pseudo-4D grids (other seeds)")
    pseudo_preset: str = doc("proof", "pseudo-4D job preset")
    pseudo_args: list[str] = doc(text="extra flags for the pseudo-4D jobs of the 4D sets (not the upsampler's)",
                                 factory=list)
    upsampler_videos: int = doc(400, "procedural videos for the upsampler's 256x256 training clips")
    upsampler_heldout_videos: int = doc(16, "procedural videos for the upsampler's held-out clips")
    upsampler_size: int = doc(256, "high-resolution side of the upsampler data (4x the proof resolution)")
    heldout_seed: int = doc(1_000_000, "first seed of every held-out set: far from the training seeds")
    val_seed: int = doc(5_000_000, "first seed of the validation sets, on which sampling settings are chosen "
                        "(step 'sampler'): neither training nor held-out, so the held-out table stays unseen")
    render_val_assets: int = doc(12, "procedural assets rendered for the validation set")
    pseudo_val_videos: int = doc(16, "procedural videos for the validation pseudo-4D grids")
    render_weight: float = doc(0.3, "base stage: share of examples drawn from the renders (the rest pseudo-4D)")
    base_samples: int = doc(0, "base training length in clips (0 = the preset's)")
    phase1_samples: int = doc(0, "4D phase 1 length in grids (0 = the preset's)")
    upsampler_samples: int = doc(0, "upsampler training length in clips (0 = the preset's)")
    phase2_samples: int = doc(0, "4D phase 2 (fine-tune on renders) length in grids (0 = the renders' part a "
                              "quarter of phase 1's length; the paper's 3k after 20k would be 15%)")
    phase2_lr: float = doc(0.0, "4D phase 2 peak learning rate, no warm-up, cosine to the end (0 = phase 1's). "
                           "Run 3 of docs/results.md tried 15% at 1e-4: better on pseudo-4D, worse on renders")
    phase2_pseudo_share: float = doc(0.5, "4D phase 2: share of grids drawn from the pseudo-4D set, the rest from "
                                     "the renders (0 = renders alone, the paper's recipe). The paper fine-tunes "
                                     "on ~15k assets; on the proof's 56 a renders-only phase 2 passes each grid "
                                     "~20 times and forgot pseudo-4D (run 4: soft 21.1 -> 17.8 dB there)")
    base_from: str = doc("", "take this base checkpoint (e.g. weights/proof/base.pt.gz) instead of training one")
    base_init: str = doc("", "start the base from these weights (e.g. weights/proof/base.pt.gz) and train it "
                         "--base-samples more with a fresh schedule: a longer base over several leases")
    variants_from: str = doc("", "take the trained 4D variants from this exported weights folder (e.g. "
                             "weights/proof: soft.pt.gz, ...) instead of the phase-2 runs: evaluate shipped "
                             "weights (with --base-from and --upsampler-from)")
    upsampler_from: str = doc("", "take this upsampler checkpoint (e.g. weights/proof/upsampler.pt.gz) instead of "
                              "making its data and training it in phase 1 (a run that changes only the 4D side)")
    eval_grids: int = doc(16, "held-out grids evaluated per set")
    eval_sampler: str = doc("euler:20", "the 4D sampler of evaluation and generation, method:steps[:shift], when "
                            "step 'sampler' has not chosen one (runs 1-6 used euler:20)")
    samplers: list[str] = doc(text="candidate 4D samplers (method:steps[:shift]) that step 'sampler' scores on "
                              "the validation sets; the best mean PSNR over the trained variants and both sets "
                              "becomes evaluation's", factory=lambda: ["euler:20", "heun:20", "euler:50", "heun:50"])
    parallel: bool = doc(True, "run the jobs of one step side by side")
    mlflow_uri: str = doc("none", "MLflow tracking URI for the training jobs ('none': off; metrics.jsonl is "
                          "always written in each run folder)")
    extra: list[str] = doc(text="extra flags for every training job, e.g. --num-workers 1", factory=list)


def _log(cfg: ProofConfig, name: str) -> Path:
    path = Path(cfg.out) / "logs" / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


_LANES: dict[str, tuple[subprocess.Popen, float, object, list]] = {}
"""Lanes still running (name -> process, start, log, commands left): a step may leave a lane running in the
background (``background``) for a later step to wait for (``_drain``)."""


def _jobs(cfg: ProofConfig, jobs: dict[str, list[str] | list[list[str]]], background: tuple[str, ...] = (),
          wait_all: bool = False) -> None:
    """Run named jobs (side by side if cfg.parallel); one status line each; fail naming the log.

    A job is one command, or a list of commands run one after another in its own lane (e.g. make the
    upsampler's data, then train it, while the 4D jobs run beside it); a failed command ends its lane.
    Returns when every lane is done except those named in ``background`` (and those a step before left
    running), which go on beside the next steps until a step waits for them (``wait_all``); run one after
    another (``parallel`` off), every lane is waited for.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    pending = [(name, list(cmd) if cmd and isinstance(cmd[0], list) else [cmd]) for name, cmd in jobs.items()]
    waited = {name for name, _ in pending if not (cfg.parallel and name in background)}
    failed = []

    def start(name: str, cmds: list, t0: float | None = None) -> None:
        log = _log(cfg, name).open("a")
        log.write(f"\n$ {' '.join(cmds[0])}\n")
        log.flush()
        _LANES[name] = (subprocess.Popen([sys.executable, *cmds[0]], cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT), t0 or time.time(), log, cmds[1:])
        if t0 is None:
            print(f"[proof] {name}: started (log {_log(cfg, name)})", flush=True)

    while pending or (set(_LANES) if wait_all else waited & set(_LANES)):
        while pending and (cfg.parallel or not _LANES):
            start(*pending.pop(0))
        time.sleep(2)
        for name, (proc, t0, log, rest) in list(_LANES.items()):
            if proc.poll() is None:
                continue
            log.close()  # type: ignore[attr-defined]
            del _LANES[name]
            if proc.returncode == 0 and rest:
                start(name, rest, t0)
                continue
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"[proof] {name}: {status} in {time.time() - t0:.0f}s", flush=True)
            if proc.returncode:
                failed.append(name)
    if failed:
        # a lane an earlier step left running is named as such: this step's own jobs may all have succeeded
        tails = "; ".join(f"{n}{'' if n in jobs else ' (background lane of an earlier step)'}: "
                          f"{_tail(_log(cfg, n))}" for n in failed)
        raise UserError(f"proof step failed: {tails} (full logs in {Path(cfg.out) / 'logs'})")


def _drain(cfg: ProofConfig) -> None:
    """Wait for the lanes an earlier step left running (e.g. the upsampler, before the export and evaluation)."""
    if _LANES:
        print(f"[proof] waiting for {', '.join(_LANES)}", flush=True)
        _jobs(cfg, {}, wait_all=True)


def _tail(path: Path) -> str:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(empty log)"])[-1][:300]


def _data(cfg: ProofConfig, name: str) -> Path:
    return Path(cfg.out) / "data" / name


def _run(cfg: ProofConfig, name: str) -> Path:
    return Path(cfg.out) / name


def _done(path: Path) -> bool:
    return (path / "summary.json").is_file() or (path / "checkpoint_final" / "model.pt").is_file()


# ------------------------------------------------------------------------------------------------ steps

def render_parts(cfg: ProofConfig) -> dict[str, tuple[int, int]]:
    """Training render folders: name -> (first asset seed, assets). Part 0 keeps the name "render", so runs
    made before the split read the same folder."""
    step = max(1, cfg.render_part_assets)
    return {("render" if i == 0 else f"render_p{i // step}"): (i, min(step, cfg.render_assets - i))
            for i in range(0, cfg.render_assets, step)}


def _renders(cfg: ProofConfig) -> str:
    """The training renders as one --data.grids entry list (every part, comma-separated)."""
    return ",".join(str(_data(cfg, name)) for name in render_parts(cfg))


def step_renders(cfg: ProofConfig) -> None:
    jobs = {}
    sets = [(name, seed, count, 2) for name, (seed, count) in render_parts(cfg).items()]
    for name, seed, count, actions in [*sets, ("render_heldout", cfg.heldout_seed, cfg.render_heldout_assets, 1),
                                       ("render_val", cfg.val_seed, cfg.render_val_assets, 1)]:
        if not _done(_data(cfg, name)):
            jobs[name] = ["pipelines/render_objaverse.py", "--preset", cfg.render_preset, "--output",
                          str(_data(cfg, name)), "--count", str(count), "--seed", str(seed),
                          "--max-actions", str(actions), *cfg.render_args]
    _jobs(dataclasses.replace(cfg, parallel=False), jobs)  # Blender uses every core already


def _pseudo4d(cfg: ProofConfig, name: str, seed: int, count: int, extra: list[str]) -> list[str]:
    return ["pipelines/make_pseudo4d.py", "--preset", cfg.pseudo_preset, "--output", str(_data(cfg, name)),
            "--procedural.seed", str(seed), "--procedural.count", str(count), *extra]


def _upsampler_sets(cfg: ProofConfig) -> dict[str, list[str]]:
    """The upsampler's data: 4 x 4 grids at 4x the proof resolution; it trains on their rows (4-frame clips)."""
    s = cfg.upsampler_size
    shape = ["--views", "4", "--frames", "4", "--height", str(s), "--width", str(s),
             "--procedural.width", str(2 * s), "--procedural.height", str(3 * s // 2)]
    sets = {"upsampler": (2 * cfg.heldout_seed, cfg.upsampler_videos),
            "upsampler_heldout": (3 * cfg.heldout_seed, cfg.upsampler_heldout_videos)}
    return {name: _pseudo4d(cfg, name, seed, count, shape) for name, (seed, count) in sets.items()
            if not _done(_data(cfg, name))}


def step_pseudo4d(cfg: ProofConfig) -> None:
    """The 4D model's pseudo-4D sets (train and held-out). The upsampler's sets are made in phase 1, beside
    the 4D jobs, since nothing before the upsampler needs them."""
    sets = {"pseudo4d": (0, cfg.pseudo_videos), "pseudo4d_heldout": (cfg.heldout_seed, cfg.pseudo_heldout_videos),
            "pseudo4d_val": (cfg.val_seed, cfg.pseudo_val_videos)}
    jobs = {name: _pseudo4d(cfg, name, seed, count, cfg.pseudo_args) for name, (seed, count) in sets.items()
            if not _done(_data(cfg, name))}
    _jobs(dataclasses.replace(cfg, parallel=False), jobs)  # each job already spreads over the cores


def _train(cfg: ProofConfig, stage: str, out: Path, *args: str) -> list[str]:
    return [f"training/train_{stage}.py", "--preset", cfg.train_preset, "--output", str(out), "--run-name", out.name,
            "--mlflow-uri", cfg.mlflow_uri, *args, *cfg.extra]


def _base(cfg: ProofConfig) -> str:
    """The base checkpoint the 4D stages and the export take: ``base_from`` if given, else the base step's."""
    return cfg.base_from or str(_run(cfg, "base") / "checkpoint_final")


def step_base(cfg: ProofConfig) -> None:
    out = _run(cfg, "base")
    if cfg.base_from:
        print(f"[proof] base: taken from {cfg.base_from}, not trained", flush=True)
        return
    if _done(out):
        return
    init = ["--init-from", cfg.base_init] if cfg.base_init else []
    parts = render_parts(cfg)
    grids = f"{_data(cfg, 'pseudo4d')},{_renders(cfg)}"
    # the renders' share spread over their folders by asset count (a source's weight is per folder)
    weights = ",".join([str(1 - cfg.render_weight)] + [str(cfg.render_weight * n / cfg.render_assets)
                                                        for _, n in parts.values()])
    _jobs(cfg, {"base": _train(cfg, "base", out, "--data.grids", grids, "--data.weights", weights,
                               *_length(cfg.base_samples), *init)})


def _upsampler(cfg: ProofConfig) -> str:
    """The upsampler checkpoint evaluation and the export take: ``upsampler_from`` if given, else phase 1's."""
    return cfg.upsampler_from or str(_run(cfg, "upsampler") / "checkpoint_final")


def step_phase1(cfg: ProofConfig) -> None:
    """4D phase 1 on pseudo-4D grids for every trained variant, and the upsampler (its data, then its
    training) beside them."""
    base = _base(cfg)
    jobs: dict[str, list[str] | list[list[str]]] = {}
    for sync in TRAINED:
        out = _run(cfg, f"4d_{sync}_p1")
        if not _done(out):
            jobs[out.name] = _train(cfg, "4d", out, "--sync", sync, "--base-checkpoint", str(base),
                                    "--data.grids", str(_data(cfg, "pseudo4d")), *_length(cfg.phase1_samples))
    out = _run(cfg, "upsampler")
    if cfg.upsampler_from:
        print(f"[proof] upsampler: taken from {cfg.upsampler_from}, not trained", flush=True)
        heldout = _upsampler_sets(cfg).get("upsampler_heldout")
        if heldout:  # evaluation still scores it on the held-out clips
            jobs["upsampler_heldout"] = heldout
    elif not _done(out):
        jobs["upsampler"] = [*_upsampler_sets(cfg).values(),
                             _train(cfg, "upsampler", out, "--data.grids", str(_data(cfg, "upsampler")),
                                    *_length(cfg.upsampler_samples))]
    # Nothing before the export needs the upsampler: phase 2 starts when the 4D jobs end, beside it.
    _jobs(cfg, jobs, background=("upsampler", "upsampler_heldout"))


def _length(samples: int) -> list[str]:
    return ["--total-samples", str(samples)] if samples else []


def _phase2_samples(cfg: ProofConfig) -> int:
    from training.config import presets_for
    p = presets_for("4d")[cfg.train_preset]()
    # The renders' part is a quarter of phase 1 whatever the mix: mixing adds pseudo-4D grids, it does not take
    # render grids away.
    n = cfg.phase2_samples or round((cfg.phase1_samples or p.total_samples) / 4 / (1 - cfg.phase2_pseudo_share))
    return max(p.samples_per_step, n // p.samples_per_step * p.samples_per_step)


def step_phase2(cfg: ProofConfig) -> None:
    """Fine-tune each phase-1 model on renders (mixed with pseudo-4D grids, ``phase2_pseudo_share``); soft also
    continues on pseudo-4D alone (ablation 2), with the same length and learning rate."""
    n = str(_phase2_samples(cfg))
    jobs = {}
    for sync in TRAINED + ("soft_pseudo_only",):
        out = _run(cfg, f"4d_{sync}_p2" if sync != "soft_pseudo_only" else "4d_soft_pseudo_only")
        variant = sync if sync in TRAINED else "soft"
        share = cfg.phase2_pseudo_share
        if sync not in TRAINED:  # ablation 2: pseudo-4D alone
            data = ["--data.grids", str(_data(cfg, "pseudo4d"))]
        else:
            counts = [n for _, n in render_parts(cfg).values()]
            weights = [(1 - share) * n / cfg.render_assets for n in counts] + ([share] if share > 0 else [])
            data = ["--data.grids", _renders(cfg) + (f",{_data(cfg, 'pseudo4d')}" if share > 0 else ""),
                    "--data.weights", ",".join(f"{w:.6g}" for w in weights)]
        if not _done(out):
            jobs[out.name] = _train(cfg, "4d", out, "--sync", variant,
                                    "--init-from", str(_run(cfg, f"4d_{variant}_p1") / "checkpoint_final"),
                                    *data, "--total-samples", n,
                                    "--optim.warmup-samples", "0", "--seed", "1",
                                    *(["--optim.lr", str(cfg.phase2_lr)] if cfg.phase2_lr else []))
    _jobs(cfg, jobs)


def variants(cfg: ProofConfig) -> dict[str, Path]:
    """Trained variant name -> its final checkpoint (what evaluation and the export take): the phase-2 runs'
    folders, or the exported files of ``variants_from``."""
    if cfg.variants_from:
        return {k: Path(cfg.variants_from) / f"{k}.pt.gz" for k in (*TRAINED, "soft_pseudo_only")}
    names = {s: f"4d_{s}_p2" for s in TRAINED} | {"soft_pseudo_only": "4d_soft_pseudo_only"}
    return {k: _run(cfg, v) / "checkpoint_final" for k, v in names.items()}


def parse_sampler(text: str) -> dict[str, object]:
    """'heun:20' or 'euler:50:2' -> {"method", "steps", "shift"} (shift 0: the model's own flow_shift)."""
    from model.rectified_flow import SAMPLER_METHODS
    parts = text.split(":")
    try:
        method, steps, shift = parts[0], int(parts[1]), float(parts[2]) if len(parts) > 2 else 0.0
    except (IndexError, ValueError):
        method = steps = shift = None
    if len(parts) > 3 or method not in SAMPLER_METHODS or not steps or steps < 1 or not 0 <= shift < math.inf:
        raise UserError(f"sampler '{text}' must read method:steps[:shift] with method one of "
                        f"{', '.join(SAMPLER_METHODS)}, steps >= 1 and shift >= 0 (e.g. heun:20 or euler:50:2)")
    return {"method": method, "steps": steps, "shift": shift}


def _sampler_flags(sampler: dict[str, object]) -> list[str]:
    return ["--method", str(sampler["method"]), "--steps", str(sampler["steps"]), "--shift", str(sampler["shift"])]


def _sampler_inputs(cfg: ProofConfig) -> dict[str, object]:
    """What a sampler choice depends on: the candidates and the variants' checkpoints."""
    return {"samplers": list(cfg.samplers), "variants": {k: str(v) for k, v in variants(cfg).items() if k in TRAINED}}


def chosen_sampler(cfg: ProofConfig) -> tuple[str, dict[str, object]]:
    """The 4D sampler of evaluation: step 'sampler''s choice when it ran for these candidates and variants,
    else ``eval_sampler``."""
    path = Path(cfg.out) / "sampler" / "choice.json"
    choice = json.loads(path.read_text()) if path.is_file() else {}
    fresh = choice.get("inputs") == _sampler_inputs(cfg)
    text = choice["sampler"] if fresh else cfg.eval_sampler
    return text, parse_sampler(text)


def _eval_cmd(cfg: ProofConfig, sets: str, ckpts: dict[str, Path], sampler: dict[str, object], out: Path,
              *extra: str) -> list[str]:
    return ["pipelines/evaluate_4d.py", "--grids", sets, "--checkpoints", ",".join(f"{k}={v}" for k, v in ckpts.items()),
            "--max-grids", str(cfg.eval_grids), *_sampler_flags(sampler), "--out", str(out),
            "--mlflow-uri", "none" if cfg.mlflow_uri == "none" else cfg.mlflow_uri, *extra]


def step_sampler(cfg: ProofConfig) -> None:
    """Choose the 4D sampler on the validation sets (other seeds than training and held-out): every candidate
    of ``samplers`` scores the trained variants there; the best mean PSNR (over variants, the two sets weighed
    alike) is written to sampler/choice.json, which evaluation and generation then use."""
    _drain(cfg)
    root = Path(cfg.out) / "sampler"
    inputs = _sampler_inputs(cfg)
    if (root / "choice.json").is_file() and json.loads((root / "choice.json").read_text()).get("inputs") == inputs:
        return
    candidates = {text: parse_sampler(text) for text in cfg.samplers}
    if not candidates:
        raise UserError("step 'sampler' needs at least one --samplers candidate")
    if not _done(_data(cfg, "render_val")):
        raise UserError(f"step 'sampler' needs the validation renders {_data(cfg, 'render_val')}: run "
                        "--steps renders where Blender is (they travel with a GPU call like the other renders)")
    # scores of other candidates or variants (an earlier sweep) must not be reused: start the folder again
    if (root / "inputs.json").is_file() and json.loads((root / "inputs.json").read_text()) != inputs:
        import shutil
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "inputs.json").write_text(json.dumps(inputs, indent=1))
    if not _done(_data(cfg, "pseudo4d_val")):  # an older run folder: make the validation grids first
        _jobs(cfg, {"pseudo4d_val": _pseudo4d(cfg, "pseudo4d_val", cfg.val_seed, cfg.pseudo_val_videos,
                                              cfg.pseudo_args)})
    sets = f"render={_data(cfg, 'render_val')},pseudo4d={_data(cfg, 'pseudo4d_val')}"
    trained = {k: v for k, v in variants(cfg).items() if k in TRAINED}
    jobs = {f"sampler_{text.replace(':', '_')}": _eval_cmd(cfg, sets, trained, s, root / text.replace(":", "_"),
                                                            "--train-free", "false")
            for text, s in candidates.items() if not (root / text.replace(":", "_") / "results.json").is_file()}
    _jobs(cfg, jobs)
    scores: dict[str, dict[str, float]] = {}
    for text in candidates:
        results = json.loads((root / text.replace(":", "_") / "results.json").read_text())["results"]
        per_set = {name: sum(rows[k]["psnr"] for k in trained) / len(trained) for name, rows in results.items()}
        scores[text] = {**per_set, "mean": sum(per_set.values()) / len(per_set)}
    best = max(scores, key=lambda t: scores[t]["mean"])
    (root / "choice.json").write_text(json.dumps({"sampler": best, "scores": scores, "inputs": inputs}, indent=1))
    table = ", ".join(f"{t} {s['mean']:.2f}" for t, s in scores.items())
    print(f"[proof] sampler: {best} (validation PSNR, mean of sets and trained variants: {table})", flush=True)


def step_eval(cfg: ProofConfig) -> None:
    _drain(cfg)
    text, sampler = chosen_sampler(cfg)
    print(f"[proof] eval: 4D sampler {text}", flush=True)
    out = Path(cfg.out) / "eval"
    jobs: dict[str, list[str] | list[list[str]]] = {}
    if not (out / "results.json").is_file():
        sets = f"render={_data(cfg, 'render_heldout')},pseudo4d={_data(cfg, 'pseudo4d_heldout')}"
        jobs["eval"] = _eval_cmd(cfg, sets, variants(cfg), sampler, out)
    up = Path(cfg.out) / "eval_upsampler"
    if not (up / "results.json").is_file():
        # its held-out clips are made in phase 1; a run that skips phase 1 (shipped weights) makes them here
        data = [cmd for name, cmd in _upsampler_sets(cfg).items() if name == "upsampler_heldout"]
        jobs["eval_upsampler"] = [*data, ["-m", "training.recipes.upsampler_eval", "--checkpoint", _upsampler(cfg),
                                          "--grids", str(_data(cfg, "upsampler_heldout")), "--out", str(up)]]
    gen = Path(cfg.out) / "generated_x4"
    if not (gen / "meta.json").is_file():
        jobs["generate_x4"] = ["pipelines/generate_4d.py", "--checkpoint", str(variants(cfg)["soft"]),
                               "--upsampler", _upsampler(cfg),
                               "--from-grid", str(_data(cfg, "render_heldout")), *_sampler_flags(sampler),
                               "--out", str(gen)]
    _jobs(cfg, jobs)  # side by side: each leaves most of a GPU idle


def step_weights(cfg: ProofConfig) -> None:
    _drain(cfg)
    if cfg.variants_from:
        print(f"[proof] weights: evaluating the exported {cfg.variants_from}, nothing to export", flush=True)
        return
    from pipelines.common.checkpoints import slim_export
    out = Path(cfg.out) / "weights"
    ckpts = {k: str(v) for k, v in variants(cfg).items()}
    ckpts["upsampler"] = _upsampler(cfg)
    sizes = slim_export(ckpts, out, base=_base(cfg))
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
    print(f"[proof] weights: {sum(sizes.values()) / 1e6:.1f} MB in {out}", flush=True)


STEPS: dict[str, Callable[[ProofConfig], None]] = {
    "renders": step_renders, "pseudo4d": step_pseudo4d, "base": step_base, "phase1": step_phase1,
    # weights before eval: the export takes seconds, and a run cut short during evaluation still has them
    "phase2": step_phase2, "weights": step_weights, "sampler": step_sampler, "eval": step_eval,
}


def _presets() -> dict[str, Callable[[], ProofConfig]]:
    return {
        "proof": ProofConfig,
        # The same chain on CPU in a few minutes: what the tests run.
        "tiny": lambda: ProofConfig(out="outputs/proof-tiny", train_preset="tiny", render_assets=2, render_part_assets=2,
                                    render_heldout_assets=1,
                                    render_preset="tiny", render_args=["--views", "4", "--frames", "4"],
                                    pseudo_videos=4, pseudo_heldout_videos=2, pseudo_preset="tiny",
                                    pseudo_args=["--views", "4", "--frames", "4"], upsampler_videos=2, upsampler_heldout_videos=1,
                                    upsampler_size=32, eval_grids=1, eval_sampler="euler:2", parallel=False,
                                    render_val_assets=1, pseudo_val_videos=2, samplers=["euler:1", "euler:2"]),
    }


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(ProofConfig, _presets(), argv, description=__doc__.split("\n\n")[0],
                          default_preset="proof")
    unknown = [s for s in cfg.steps if s not in STEPS]
    if unknown:
        raise UserError(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    if cfg.render_assets < 1 or cfg.render_part_assets < 1:
        raise UserError(f"--render-assets and --render-part-assets must be >= 1, got {cfg.render_assets} and "
                        f"{cfg.render_part_assets}")
    if not 0 <= cfg.phase2_pseudo_share < 1:
        raise UserError(f"--phase2-pseudo-share must be in [0, 1) (the rest are renders), got {cfg.phase2_pseudo_share}")
    cfg = dataclasses.replace(cfg, out=str(Path(cfg.out).resolve()))
    write_resolved(cfg, cfg.out, name="proof_config.yaml")
    t0 = time.time()
    try:
        for name, fn in STEPS.items():
            if cfg.steps and name not in cfg.steps:
                continue
            t = time.time()
            print(f"[proof] step {name} ...", flush=True)
            fn(cfg)
            print(f"[proof] step {name} finished in {time.time() - t:.0f}s", flush=True)
    except KeyboardInterrupt:
        # Stopped by hand: end the lanes too (their jobs resume from their checkpoints on the next run) rather
        # than wait silently for them, or leave them to run beside the next one.
        for name, (proc, *_rest) in list(_LANES.items()):
            proc.terminate()
            print(f"[proof] {name}: stopped", flush=True)
        _LANES.clear()
        raise
    except Exception:
        # A lane left running (the upsampler) is waited for even when a step failed: exiting would orphan it,
        # and the next run would start a second job into the same folder beside it.
        try:
            _drain(cfg)
        except UserError as e:
            print(f"[proof] {e}", flush=True)
        raise
    _drain(cfg)  # a lane the last step asked for left running
    print(f"[proof] all requested steps done in {time.time() - t0:.0f}s; outputs under {cfg.out}", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
