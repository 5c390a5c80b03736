"""MLflow tracking and the status line; only rank 0 talks to MLflow.

The default store is a SQLite file in the run folder (``<output>/mlflow.db``,
artifacts in ``<output>/mlartifacts``), so a laptop run needs no server;
MLFLOW_TRACKING_URI or ``--mlflow-uri`` points it anywhere else.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from pipelines.common.config import flatten
from pipelines.common.tracking import default_uri, ensure_experiment_at, say
from pipelines.common.visuals import contact_sheet, to_uint8, write_mp4
from training.config import TrainConfig


def tracking_enabled(cfg: TrainConfig) -> bool:
    """``--mlflow-uri none`` switches tracking off (smoke tests, benchmarks, machines without MLflow)."""
    return cfg.mlflow_uri.lower() != "none"


def tracking_uri(cfg: TrainConfig) -> str:
    return default_uri(cfg.mlflow_uri, cfg.output)


def experiment_name(cfg: TrainConfig) -> str:
    return cfg.experiment or f"4real-{cfg.stage}"


def ensure_experiment(cfg: TrainConfig) -> str | None:
    return ensure_experiment_at(tracking_uri(cfg), experiment_name(cfg)) if tracking_enabled(cfg) else None


RUN_ID_FILE = "mlflow_run_id.txt"
"""In the run folder: the MLflow run the latest attempt logs to, so the driver can mark it FAILED or KILLED
when the job dies, and a restart can close the run of an attempt that left no checkpoint."""


def read_metric_rows(metrics_file: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, in order; a line cut short by a kill mid-write is skipped, not fatal. The
    one reader of the file (the Tracker's resume, the proof figures, the resume comparison)."""
    rows = []
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def last_logged_step(metrics_file: Path) -> int:
    """The highest step in a metrics.jsonl (0 when there is none)."""
    return max((int(r.get("step", 0)) for r in read_metric_rows(metrics_file)), default=0)


def mark_run_ended(cfg: TrainConfig, status: str) -> str | None:
    """Set the MLflow run of the run folder's latest attempt to ``status`` (FAILED, KILLED) if it is still
    RUNNING; returns its id. Called by the driver when the job dies, and at a restart without a checkpoint."""
    path = Path(cfg.output) / RUN_ID_FILE
    if not tracking_enabled(cfg) or not path.is_file():
        return None
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(cfg))
    run_id = path.read_text().strip()
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=status)
            return run_id
    except Exception:  # a deleted run or another store: nothing to close
        pass
    return None


class Tracker:
    def __init__(self, cfg: TrainConfig, rank: int, run_id: str | None,
                 extra_params: dict[str, Any] | None = None, resumed_at: int = 0, resumed_samples: int = 0) -> None:
        """``run_id``: the MLflow run to continue (None: a new one); ``resumed_at``: the step of the checkpoint
        this attempt resumed from (0: it starts at step 1); ``resumed_samples``: its samples seen (what the kept
        history is cut at: a resume with another samples-per-step counts steps of another size)."""
        self.cfg, self.rank, self.run_id = cfg, rank, run_id
        self.t0 = time.time()
        self.mlflow = None
        # Every logged step also goes to <output>/metrics.jsonl: loss curves survive without MLflow
        # (e.g. a GPU machine without it, --mlflow-uri none) and plot with a few lines of Python.
        self.metrics_file = Path(cfg.output) / "metrics.jsonl"
        self.active = rank == 0 and tracking_enabled(cfg)  # rank 0 prints status lines either way
        # A resumed attempt redoes the steps after its checkpoint that the killed one had logged. metrics.jsonl
        # keeps what precedes the checkpoint and takes the redone steps (so a rewind with resume_from, or
        # --force with other options, shows the new values); MLflow cannot drop history, so there the
        # redone steps of a plain resume, the same values bit for bit, are not logged twice. A fresh start
        # where an attempt left metrics but no checkpoint says so, keeps them aside and closes its MLflow run.
        self.logged_through = 0  # MLflow only
        if rank == 0 and resumed_at:
            kept = [r for r in read_metric_rows(self.metrics_file)
                    if (float(r["samples_seen"]) <= resumed_samples if "samples_seen" in r and resumed_samples
                        else int(r.get("step", 0)) <= resumed_at)]
            self.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif rank == 0 and last_logged_step(self.metrics_file) > 0:
            gone = last_logged_step(self.metrics_file)
            self.metrics_file.rename(self.metrics_file.with_name(f"metrics.attempt-{int(time.time())}.jsonl"))
            closed = mark_run_ended(cfg, "KILLED")
            say(f"[train] {cfg.output}: an earlier attempt logged {gone} steps but left no checkpoint to resume "
                f"(it stopped before its first checkpoint_every={cfg.checkpoint_every}); starting at step 1"
                + (f"; its MLflow run {closed} is marked KILLED" if closed else ""))
        if not self.active:
            return
        import mlflow
        self.mlflow = mlflow
        exp_id = ensure_experiment(cfg)
        mlflow.set_tracking_uri(tracking_uri(cfg))  # a worker process of its own: global state is fine here
        mlflow.set_system_metrics_sampling_interval(cfg.system_metrics_every)
        mlflow.set_system_metrics_samples_before_logging(1)
        resumed_from = None
        if run_id is not None and not self._continuable(run_id):
            # another folder's run: this folder's own, when an earlier attempt of this job made one, else a new run
            resumed_from, run_id = run_id, self._own_run()
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id,
                               run_name=cfg.run, log_system_metrics=True)
        self.run_id = run.info.run_id
        if resumed_from:
            mlflow.set_tag("resumed_from_run", resumed_from)
            say(f"[train] MLflow: the checkpoint's run {resumed_from} is not this folder's run in {tracking_uri(cfg)}; "
                f"logging to {'its own run' if run_id else 'a new run'} {self.run_id} (tag resumed_from_run)")
        (Path(cfg.output) / RUN_ID_FILE).write_text(self.run_id)
        if run_id and resumed_at and not (cfg.force or cfg.resume_from):
            history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
            self.logged_through = max([0, *(m.step for m in history)])
        if run_id is None:
            params = {**flatten(cfg), **(extra_params or {})}
            mlflow.log_params({k: (str(v)[:500] if v is not None else "") for k, v in params.items()})
            mlflow.set_tags({"stage": cfg.stage, "model_preset": cfg.model_preset, "sync": cfg.sync})

    def _own_run(self) -> str | None:
        """The run this folder's mlflow_run_id.txt names, if this tracking store has it."""
        own = Path(self.cfg.output) / RUN_ID_FILE
        if not own.is_file():
            return None
        run_id = own.read_text().strip()
        try:
            self.mlflow.MlflowClient().get_run(run_id)
        except self.mlflow.exceptions.MlflowException:
            return None
        return run_id

    def _continuable(self, run_id: str) -> bool:
        """Whether the MLflow run a checkpoint names is this run folder's own, in this tracking store. A checkpoint
        from another folder (--resume-from) names another run: continuing it would log into that run (a shared
        server) or fail on every attempt (a folder's own SQLite store, which has no such run); so would a run
        whose tracking store changed (--mlflow-uri, MLFLOW_TRACKING_URI set later)."""
        return self._own_run() == run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.rank != 0:
            return
        if self.active and step > self.logged_through:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
        with self.metrics_file.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}) + "\n")
        rss = psutil.Process().memory_info().rss / 2 ** 30
        mem = f"gpu {metrics['gpu_mem_gb']:.1f} GB" if "gpu_mem_gb" in metrics else f"rss {rss:.1f} GB"
        mfu = f" | mfu {metrics['mfu'] * 100:.1f}%" if "mfu" in metrics else ""
        if metrics.get("data_wait", 0.0) >= 0.05:  # the loader is the bottleneck: say so where people look
            mfu += f" | data wait {metrics['data_wait'] * 100:.0f}%"
        if metrics.get("nonfinite_steps", 0):  # updates skipped: the run may not be learning
            mfu += f" | non-finite steps {int(metrics['nonfinite_steps'])}"
        if "data_context_freeze_time_share" in metrics:
            mfu += f" | freeze-time {metrics['data_context_freeze_time_share']:.2f}"
        say(f"[train {self.cfg.stage}] step {step}/{self.cfg.total_steps} | samples {int(metrics['samples_seen'])} "
              f"| loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | gnorm {metrics['grad_norm']:.3g} "
              f"| {metrics['samples_per_s']:.2f} samples/s{mfu} | {mem} | {time.time() - self.t0:.0f}s")

    def log_samples(self, batch: dict[str, torch.Tensor], out: torch.Tensor, step: int) -> None:
        """Contact sheet (top: data, bottom: sample) and MP4s of rows and columns."""
        if not self.active:
            return
        truth, gen = to_uint8(batch["x"][0]), to_uint8(out[0])
        if truth.ndim == 4:  # a clip [F, H, W, 3]: show it as a 1 x F grid
            truth, gen = truth[None], gen[None]
        mask = batch["mask"][0].cpu().numpy().astype(bool)
        mask = mask[None] if mask.ndim == 1 else mask
        with tempfile.TemporaryDirectory() as d:
            sheet = np.concatenate([truth, gen], axis=0)
            given = np.concatenate([mask, mask], axis=0)
            contact_sheet(sheet, Path(d) / f"samples_step{step:07d}.png", given=given)
            write_mp4(gen[0], Path(d) / f"row0_step{step:07d}.mp4")
            if gen.shape[0] > 1:
                write_mp4(gen[:, -1], Path(d) / f"col_last_step{step:07d}.mp4")
            self.mlflow.log_artifacts(d, artifact_path="samples")

    def log_file(self, path: Path) -> None:
        """One file of the run folder as a top-level MLflow artifact (rank 0, when tracking is on)."""
        if self.active:
            self.mlflow.log_artifact(str(path))

    def log_final_checkpoint(self, folder: Path) -> None:
        if self.active:
            self.mlflow.log_artifacts(str(folder), artifact_path="final_checkpoint")

    def finish(self) -> None:
        if self.active:
            # MLflow publishes system metrics once per sampling interval (and stops quietly when a
            # poll of the store fails), so a short run can end with none: publish a final sample.
            from mlflow.tracking import fluent
            monitor = getattr(fluent, "run_id_to_system_metrics_monitor", {}).get(self.run_id)
            if monitor is not None:
                try:
                    monitor.collect_metrics()
                    monitor.publish_metrics(monitor.aggregate_metrics())
                except Exception as exc:  # never fail a finished training run over telemetry
                    say(f"[train] could not log final system metrics: {exc}")
            self.mlflow.end_run()
