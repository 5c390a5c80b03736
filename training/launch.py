"""Driver side of the training jobs: parse the config, start Ray Train, report where things went."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from pipelines.common.config import ensure_output_dir, parse_config, run_cli, to_dict, write_resolved
from pipelines.common.errors import UserError, require
from training.config import TrainConfig, presets_for


def check_resume(cfg: TrainConfig, output: Path) -> Path | None:
    """Refuse to continue a run folder's checkpoints with a config that no longer describes them.

    Ray Train resumes a run from the latest checkpoint under <output>/ray/<run name>, whatever the options of
    the new command; and config.yaml would be overwritten with options that the weights were not trained
    with. So a re-run into a folder with checkpoints must match the recorded config, apart from RESUME_FREE
    (paths, logging, loader layout). With ``force`` it continues and keeps the old config beside the new one;
    returns that copy's path (None when nothing was replaced).
    """
    import time

    from pipelines.common.config import ConfigError, flatten, from_dict, load_yaml
    from training.config import option_changes
    old_path = output / "config.yaml"
    # Ray Train makes <output>/ray/<run> when a run starts, before any checkpoint: a run that failed before its
    # first (an out-of-memory first step) left nothing to continue, and its re-run with other options is a new run.
    if not old_path.is_file():
        return None
    recorded = load_yaml(old_path)
    old_run = recorded.get("run_name") or recorded.get("stage")
    if old_run and old_run != cfg.run and checkpoint_dirs(output / "ray" / old_run):
        # config.yaml, metrics.jsonl, the MLflow run id and checkpoint_final are one per folder: a second run
        # would take them over from the first
        raise UserError(f"{output} holds the run '{old_run}'; a run folder holds one run. Give another --output for "
                        f"run '{cfg.run}', or --run-name {old_run} to continue that one")
    if not checkpoint_dirs(output / "ray" / cfg.run):
        return None
    try:  # options added since the run started read as their defaults, not as differences
        recorded = from_dict(TrainConfig, recorded)
    except (ConfigError, TypeError, ValueError):  # an option since removed: compare the file as written
        pass
    old, new = flatten(recorded), flatten(cfg)
    diff, switched = option_changes(old, new)
    if not diff and not switched:
        return None
    what = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:5])
    what += f" and {len(diff) - 5} more" if len(diff) > 5 else ""
    if diff and not cfg.force:
        raise UserError(f"{output} holds checkpoints of a run with other options ({what}); re-run with the "
                        "recorded options to continue it, give another --output for a new run, or pass --force "
                        "to continue these weights with the new options")
    stamp, n = time.strftime('%Y%m%d-%H%M%S'), 1
    kept = output / f"config.before-{stamp}.yaml"
    while kept.exists():  # two resumes within a second must not overwrite the earlier record
        n += 1
        kept = output / f"config.before-{stamp}-{n}.yaml"
    old_path.replace(kept)
    how = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in switched)
    if diff:  # one line, naming the arithmetic change too when both meet
        print(f"[train {cfg.stage}] --force: continuing {output} with other options ({what})"
              + (f" and other arithmetic from here on ({how})" if switched else "")
              + f"; the previous config is kept as {kept.name}", flush=True)
    else:
        print(f"[train {cfg.stage}] continuing {output} with other arithmetic from here on ({how}; the weights "
              f"carry over); the previous config is kept as {kept.name}", flush=True)
    return kept


def check_nonfinite_stop(cfg: TrainConfig, output: Path) -> None:
    """Refuse, before any worker starts, a run that an earlier one in ``output`` stopped for non-finite gradient
    norms (training/loop.py: NonFiniteSteps) and that would stop again the same way: the same options (the record's
    ``run_fingerprint``) and a limit not above its streak. Otherwise, if the record is this run's (options changed,
    e.g. a lower learning rate with --force, fp8=false, a higher limit or 0), it is dropped and the run goes on;
    another run's record (another --run-name in the same folder) is kept. The workers check it again at the start of
    each attempt, for the record a stop in this job leaves before Ray Train's retry."""
    from training.config import run_fingerprint
    from training.loop import NONFINITE_STOP, stop_record, stop_refusal
    record = stop_record(output)
    refusal = stop_refusal(record, cfg.optim.max_nonfinite_steps, run_fingerprint(cfg), output / NONFINITE_STOP)
    if refusal:
        raise UserError(refusal)
    if record is None or record.get("run") in (None, "", cfg.run):  # none named: an older record, taken as ours
        (output / NONFINITE_STOP).unlink(missing_ok=True)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """A Ray Train run folder's checkpoints, oldest first (their names carry the time they were written)."""
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


def check_resume_from(cfg: TrainConfig, output: Path) -> None:
    """A local ``resume_from`` must be a checkpoint this job wrote (a folder with train_state.json), checked on the
    driver: in the workers a wrong path fails every attempt with a filesystem error instead of this line. Only
    while the run folder has no checkpoint of its own: after that the workers resume from those, and the folder
    given once may be gone (pruned by its own run's keep_checkpoints)."""
    from pipelines.common.tracking import URI_SCHEME
    spec = cfg.resume_from
    if not spec or URI_SCHEME.match(spec) or checkpoint_dirs(output / "ray" / cfg.run):
        return
    path = Path(spec)
    if (path / "train_state.json").is_file():
        return
    found = checkpoint_dirs(path) or checkpoint_dirs(path / "ray" / cfg.run)
    hint = f"; the latest checkpoint there is {found[-1]}" if found else (
        "; pass one of a run's <output>/ray/<run name>/checkpoint_* folders")
    what = "does not exist" if not path.exists() else "is not a checkpoint of this job (no train_state.json)"
    raise UserError(f"--resume-from {spec} {what}{hint}")


def check_run_folder(cfg: TrainConfig, output: Path) -> Path | None:
    """The driver's checks of a run folder before Ray starts, in this order: ``check_resume`` first, so that a
    re-run with other options and no --force is refused with the non-finite stop's record still in place (the
    second check would drop it, as this run's record with other options); then ``check_nonfinite_stop``. Returns
    check_resume's value (the path of the config it kept aside, or None)."""
    check_resume_from(cfg, output)
    kept = check_resume(cfg, output)
    check_nonfinite_stop(cfg, output)
    return kept


def absolute_paths(cfg: TrainConfig, cwd: str | None = None) -> TrainConfig:
    """The config with every local input path made absolute against the driver's working directory.

    Ray Train runs each worker in a folder of its own (under the Ray session), so a relative
    ``--data.grids outputs/pseudo4d`` or ``--base-checkpoint weights/base.pt.gz`` that the driver found
    would point nowhere in the workers. URIs (``runs:/<id>``, ``s3://...``) are left alone; the MLflow store
    is made absolute where it is resolved (``pipelines.common.tracking.default_uri``).
    """
    from pipelines.common.tracking import URI_SCHEME
    cwd = cwd or os.getcwd()

    def fix(spec: str) -> str:
        if not spec or URI_SCHEME.match(spec):
            return spec
        # joined, not normalised: an absolute path stays exactly as a run recorded it, so its resume matches
        return os.path.join(cwd, os.path.expanduser(spec))
    data = dataclasses.replace(cfg.data, grids=[fix(s) for s in cfg.data.grids], clips=[fix(s) for s in cfg.data.clips])
    return dataclasses.replace(cfg, data=data, base_checkpoint=fix(cfg.base_checkpoint), init_from=fix(cfg.init_from),
                               resume_from=fix(cfg.resume_from))


def worker_user_error(exc: BaseException) -> UserError | None:
    """The UserError a training worker raised (a problem only a worker can see, e.g. a GPU without FP8 tensor
    cores), so that the command ends in its one line instead of Ray's traceback; None for other failures."""
    for failure in (getattr(exc, "worker_failures", None) or {}).values():
        if isinstance(failure, UserError):
            return UserError(str(failure))
    return None


def run(cfg: TrainConfig) -> dict:
    """Run a resolved config through Ray Train; returns a small summary."""
    require("ray", "deepspeed", "torch", *(["mlflow"] if cfg.mlflow_uri.lower() != "none" else []))
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.common.job import check_shared_output, init_ray
    from training.loop import train_loop_per_worker
    from training.tracking import ensure_experiment, experiment_name, mark_run_ended, tracking_uri

    from pipelines.common.tracking import URI_SCHEME
    if URI_SCHEME.match(cfg.output):  # Path() would make s3://b/run a local folder named "s3:" without a word
        raise UserError(f"--output {cfg.output}: the training job writes a local or mounted folder (on several "
                        "nodes, one every node mounts at the same path); a URI is not supported")
    output = ensure_output_dir(Path(cfg.output).resolve())  # a file or read-only folder: one line, now
    cfg = dataclasses.replace(absolute_paths(cfg), output=str(output))
    cfg = dataclasses.replace(cfg, mlflow_uri=tracking_uri(cfg))  # resolved once, on the driver ("none": off)
    from training.specs import TRAIN_SPECS
    # the weights the stage starts from, resolved to local files before any worker starts, and the item ids
    # they were trained on
    cfg, inherited = TRAIN_SPECS[cfg.stage].start_from(cfg, output)
    from training.data import check_sources
    descs = check_sources(cfg.stage, cfg.data)
    check_run_folder(cfg, output)
    write_resolved(cfg, output)
    # The training items go into the exported checkpoint, so evaluation can refuse grids the model saw.
    items = sorted(set(inherited).union(*(d["items"] for d in descs)))
    (output / "data_items.json").write_text(json.dumps(items))
    ensure_experiment(cfg)
    init_ray(cfg.ray_address)
    # Ray Train's own check of shared storage fires when a worker on another node reports its first checkpoint:
    # with checkpoint_every=0, at the end of the run. Checked here, before any step.
    check_shared_output(output / "ray", "run folder's checkpoint storage")
    env = {"DS_ACCELERATOR": "cuda" if cfg.use_gpu else "cpu", "PYTHONUNBUFFERED": "1"}
    os.environ.update(env)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=cfg.run, storage_path=str(output / "ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    # A job that dies does not leave its MLflow run RUNNING: Ctrl-C on the driver marks it KILLED, workers
    # failing beyond max_failures (fit raises, or returns the error) FAILED.
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        mark_run_ended(cfg, "KILLED")
        raise
    except Exception as exc:
        mark_run_ended(cfg, "FAILED")
        user = worker_user_error(exc)
        if user is not None:
            raise user from None
        raise
    if result.error:
        mark_run_ended(cfg, "FAILED")
        raise worker_user_error(result.error) or result.error
    final = output / "checkpoint_final" / "model.pt"
    summary = {"stage": cfg.stage, "output": str(output), "final_checkpoint": str(final),
               "ray_checkpoint": result.checkpoint.path if result.checkpoint else None,
               "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
               "mlflow_uri": tracking_uri(cfg), "experiment": experiment_name(cfg)}
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    if final.exists():
        print(f"[train {cfg.stage}] done: final checkpoint {final}")
    else:
        print(f"[train {cfg.stage}] paused at {result.checkpoint.path if result.checkpoint else '?'}; "
              "run the same command again to continue")
    if cfg.mlflow_uri.lower() != "none":
        print(f"[train {cfg.stage}] MLflow: mlflow ui --backend-store-uri {tracking_uri(cfg)} --port 5000  "
              f"(experiment '{experiment_name(cfg)}')")
    return summary


def main_for(stage: str, description: str) -> None:
    def main(argv: list[str] | None) -> int:
        cfg, _ = parse_config(TrainConfig, presets_for(stage), argv, description=description, default_preset="demo")
        if cfg.stage != stage:
            raise UserError(f"this entry point trains the {stage} stage; drop --stage or use training/train_{cfg.stage}.py")
        run(cfg)
        return 0
    run_cli(main, sys.argv[1:])
