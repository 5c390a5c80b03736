"""The one training loop every stage runs inside a Ray Train worker.

Per optimizer step: ``grad_accum`` micro-batches through the DeepSpeed engine
(ZeRO 0-3, bf16, clipping, accumulation), a cosine schedule with warm-up
counted in samples, an EMA of the trained weights, a status line, metrics to
MLflow from rank 0, and every ``checkpoint_every`` steps a Ray Train
checkpoint holding DeepSpeed's state, the EMA, the step and each rank's data
position, so a restarted or re-run job continues exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from pipelines.common.config import from_dict, to_dict
from training.config import TrainConfig

# bf16 dense peak per device, for MFU (H100 SXM: 989 TFLOP/s; H200 the same silicon).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak LR at optimizer ``step``: linear warm-up, then cosine to min_lr_ratio."""
    seen = step * cfg.samples_per_step
    warm = max(0, cfg.optim.warmup_samples)
    if seen < warm:  # warmup_samples 0 (a phase-2 fine-tune) starts at the peak
        return (seen + cfg.samples_per_step) / (warm + cfg.samples_per_step)
    progress = min(1.0, (seen - warm) / max(1, cfg.total_samples - warm))
    r = cfg.optim.min_lr_ratio
    return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage, "overlap_comm": cfg.use_gpu},
        # bf16 as autocast inside the engine over fp32 master weights (gradients reduced in bf16).
        # DeepSpeed's "bf16" mode would cast the weights instead, and its forward turns an outer
        # torch.autocast off, so fp32 internals (time embeddings, RoPE) would meet bf16 linears.
        "torch_autocast": {"enabled": cfg.precision == "bf16", "dtype": "bfloat16"},
        # torch's AdamW, not DeepSpeed's fused one: nothing to compile on CPU workers.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


class EMA:
    """Float32 EMA of the trained parameters (gathered first under ZeRO-3).

    The decay warms up as (1 + n) / (10 + n): with a fixed 0.999, a run of a few
    hundred steps would export weights still mostly at their random init.
    """

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], decay: float, zero3: bool) -> None:
        self.named, self.decay, self.zero3 = named, decay, zero3
        self.updates = 0
        with self._gathered():  # on the parameters' device: no host copy per step
            self.shadow = {n: p.detach().float().clone() for n, p in named}

    def _gathered(self):
        if not self.zero3:
            return nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters([p for _, p in self.named])

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        with self._gathered():
            for n, p in self.named:
                self.shadow[n].mul_(decay).add_(p.detach().float(), alpha=1 - decay)


def _to(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}


STALE_BUILD_LOCK_S = 600.0
"""Age after which a JIT build lock is taken as left by a killed process (a build takes about a minute here)."""


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove torch JIT-extension build locks older than ``max_age_s``; returns those removed.

    DeepSpeed builds its CPU communication op through torch's cpp_extension, which holds
    ``<extensions dir>/<op>/lock`` while it checks or builds and makes every other process wait for the file
    to go, with no timeout. A process killed in that window leaves the file, and every later training job on
    the machine then hangs before its first step. Younger locks are left alone: another worker may be
    building right now.
    """
    from torch.utils.cpp_extension import get_default_build_root
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    removed = []
    for lock in list(root.glob("*/*/lock")) + list(root.glob("*/lock")):
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink(missing_ok=True)
                removed.append(lock)
        except FileNotFoundError:  # another worker removed it first
            continue
    return removed


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry: runs on every worker."""
    cfg = from_dict(TrainConfig, loop_config["config"])
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.use_gpu else "cpu")
    for lock in clear_stale_build_locks():
        print(f"[train] removed a stale build lock left by a killed process: {lock}", flush=True)
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    from training.data import make_loader, prefetch
    from training.stages import build_stage
    from pipelines.common.tracking import say
    from training.tracking import Tracker

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.seed)  # identical init on every rank
    stage = build_stage(cfg)
    trainable = stage.trainable_parameters()
    named_trainable = [(n, p) for n, p in stage.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=stage, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg),
        model_parameters=trainable, dist_init_required=False)
    ema = EMA(named_trainable, cfg.optim.ema_decay, cfg.zero_stage == 3) if cfg.optim.ema_decay > 0 else None
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in stage.parameters())

    # ---- resume: the run's own latest checkpoint, else an explicit one
    state: dict[str, Any] = {"step": 0, "samples_seen": 0, "mlflow_run_id": None}
    data_state = None
    ckpt = ray.train.get_checkpoint() or (Checkpoint(cfg.resume_from) if cfg.resume_from else None)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag="ds")
            state = json.loads((Path(d) / "train_state.json").read_text())
            rank_file = Path(d) / f"data_rank{rank}.json"
            if rank_file.exists() and state.get("world") == world:
                data_state = json.loads(rank_file.read_text())
            elif rank == 0:
                say(f"[train] checkpoint was written by {state.get('world')} workers, now {world}: "
                    "data order restarts")
            if ema is not None and (Path(d) / "ema.pt").exists():
                saved = torch.load(Path(d) / "ema.pt", map_location="cpu")
                ema.shadow = {k: v.to(ema.shadow[k].device) for k, v in saved.items()}
                ema.updates = state["step"]
        if rank == 0:
            say(f"[train] resumed at step {state['step']} ({state['samples_seen']} samples seen)")

    loader = make_loader(cfg.stage, cfg.data, cfg.batch_size, rank, world, data_state)
    batches = prefetch(iter(loader), cfg.data.prefetch)
    resumed_at = state["step"] if ckpt is not None else 0
    tracker = Tracker(cfg, rank, state.get("mlflow_run_id"),
                      {"trainable_parameters": n_trainable, "total_parameters": n_total}, resumed_at=resumed_at)
    # the nodes Ray placed the workers on, by Ray node id (Ray Train's local ranks go by IP address, which two
    # raylets of one machine share); reported with every checkpoint, so summary.json shows a cluster was used
    node_ids: list[Any] = [None] * world
    torch.distributed.all_gather_object(node_ids, ray.get_runtime_context().get_node_id())
    nodes = len(set(node_ids))
    if rank == 0:
        from training.specs import TRAIN_SPECS
        what = TRAIN_SPECS[cfg.stage].describe(cfg)
        say(f"[train {cfg.stage}] {what}: {n_trainable:,} trainable of {n_total:,} parameters; {world} workers on "
            f"{nodes} node{'s' if nodes != 1 else ''}")
    state["mlflow_run_id"] = tracker.run_id
    preview: dict[str, torch.Tensor] | None = None
    peak = _peak_flops()

    def save(metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag="ds")
            (Path(d) / f"data_rank{rank}.json").write_text(json.dumps(data_pos))
            if rank == 0:
                (Path(d) / "train_state.json").write_text(json.dumps({**state, "world": world}))
                if ema is not None:
                    torch.save({k: v.cpu() for k, v in ema.shadow.items()}, Path(d) / "ema.pt")
            ray.train.report({**metrics, "nodes": nodes, "resumed_at": resumed_at},
                             checkpoint=Checkpoint.from_directory(d))

    data_pos = loader.state() if data_state is None else data_state
    t_last, samples_last = time.time(), state["samples_seen"]
    metrics: dict[str, Any] = {}
    stop_at = min(cfg.total_steps, state["step"] + cfg.steps_this_run) if cfg.steps_this_run else cfg.total_steps
    while state["step"] < stop_at:
        step = state["step"]
        losses = []
        for micro in range(cfg.grad_accum):
            batch, data_pos = next(batches)
            batch = _to(batch, device, torch.float32)
            if preview is None:
                preview = {k: v[:1].clone() for k, v in batch.items()}
            loss, _ = engine(batch, seed=(cfg.seed * 1_000_003 + step) * 4099 + micro * 131 + rank)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
        state["step"] += 1
        state["samples_seen"] += cfg.samples_per_step
        if ema is not None:
            ema.update()
        if cfg.fail_at_step and state["step"] == cfg.fail_at_step and rank == min(1, world - 1):
            marker = Path(cfg.output) / "_fault_injected"
            if not marker.exists():
                marker.write_text("rank killed itself once to test recovery")
                # Ray Train's controller registers a reported checkpoint at its next poll of the
                # workers; die after that, as a real crash almost always does.
                time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 0.5)
                os.kill(os.getpid(), signal.SIGKILL)  # a real worker death, as an OOM kill would be

        if state["step"] % cfg.log_every == 0 or state["step"] == cfg.total_steps:
            loss_val = torch.stack(losses).mean()
            if world > 1:
                torch.distributed.all_reduce(loss_val, op=torch.distributed.ReduceOp.AVG)
            now = time.time()
            sps = (state["samples_seen"] - samples_last) / max(now - t_last, 1e-9)
            t_last, samples_last = now, state["samples_seen"]
            grad_norm = engine.get_global_grad_norm()
            metrics = {"loss": float(loss_val), "lr": float(scheduler.get_last_lr()[0]),
                       "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                       "samples_per_s": sps, "tokens_per_s": sps * stage.tokens_per_sample(preview),
                       "samples_seen": state["samples_seen"]}
            counts = data_pos.get("counts", {})
            produced = sum(v for k, v in counts.items() if k.startswith("source"))
            for name, value in counts.items():  # what the loader actually produced (this rank)
                if produced:
                    metrics[f"data_{name.replace('-', '_')}_share"] = value / produced
            if peak is not None:
                metrics["mfu"] = stage.train_flops_per_sample(preview) * sps / world / peak
                metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
            tracker.log_metrics(metrics, state["step"])
        at_end = state["step"] == cfg.total_steps
        if cfg.sample_every and (state["step"] % cfg.sample_every == 0 or at_end) or at_end:
            _log_samples(stage, engine, preview, cfg, tracker, state["step"])
        if (cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0) or state["step"] == stop_at:
            save(metrics)

    if state["step"] == cfg.total_steps:
        _export(stage, ema, cfg, tracker, rank)
    elif rank == 0:
        say(f"[train] stopped at step {state['step']}/{cfg.total_steps} (steps_this_run); run again to continue")
    tracker.finish()


def _log_samples(stage, engine, preview, cfg: TrainConfig, tracker, step: int) -> None:
    """Every rank samples (ZeRO-3 needs all of them in the forward); rank 0 logs the pictures."""
    stage.eval()
    device_type = next(stage.parameters()).device.type
    with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        out = engine.module.sample(preview, cfg.sample_steps, seed=cfg.seed + step).float()
    stage.train()
    tracker.log_samples(preview, out, step)


def data_items(path: Path) -> dict[str, Any]:
    """The training items (written by the driver) as stored in checkpoints: sorted ids and their digest."""
    import hashlib
    items = json.loads(path.read_text()) if path.is_file() else []
    return {"items": items, "digest": hashlib.sha256("\n".join(items).encode()).hexdigest()}


def _export(stage, ema, cfg: TrainConfig, tracker, rank: int) -> None:
    """Write checkpoint_final/model.pt (EMA weights when kept) and log it to MLflow."""
    import deepspeed
    params = list(stage.parameters())
    ctx = deepspeed.zero.GatheredParameters(params) if cfg.zero_stage == 3 else nullcontext()
    with ctx:
        if rank != 0:
            return
        payload = stage.export()
        payload["config"] = to_dict(cfg)
        payload["data_items"] = data_items(Path(cfg.output) / "data_items.json")
        if ema is not None:
            prefix = "net."
            for name, value in ema.shadow.items():
                key = name[len(prefix):] if name.startswith(prefix) else name
                if key in payload["state_dict"]:
                    payload["state_dict"][key] = value.to("cpu", payload["state_dict"][key].dtype)
            payload["ema"] = True
    from pipelines.common.checkpoints import save_checkpoint
    path = save_checkpoint(Path(cfg.output) / "checkpoint_final", payload)
    tracker.log_final_checkpoint(path.parent)
    from pipelines.common.tracking import say
    say(f"[train] final checkpoint: {path}")

