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
from typing import Any, Iterator

import torch

from pipelines.common.config import from_dict, to_dict
from pipelines.common.errors import UserError
from training.config import TrainConfig, deepspeed_extra, run_fingerprint

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


def apply_optim_config(optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig, step: int) -> None:
    """Make a resumed optimizer and schedule follow ``cfg`` at optimizer ``step``.

    DeepSpeed's load_checkpoint restores the optimizer's param groups (learning rate, betas, weight decay) and the
    scheduler's base learning rates as they were saved, so a run continued with --force and another optim.lr,
    betas or weight decay (what the non-finite stop's message suggests) would go on with the old ones while its
    config.yaml named the new. The config is the record: its values win, and the schedule stands at ``step``.
    """
    for group in optimizer.param_groups:
        group["betas"] = (cfg.optim.beta1, cfg.optim.beta2)
        group["weight_decay"] = cfg.optim.weight_decay
        group["initial_lr"] = cfg.optim.lr
        group["lr"] = cfg.optim.lr * lr_at(step, cfg)
    scheduler.base_lrs = [cfg.optim.lr] * len(optimizer.param_groups)
    scheduler.last_epoch = step
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def resumed_step(state: dict[str, Any], cfg: TrainConfig) -> int:
    """The optimizer step a checkpoint stands at under ``cfg``: its samples seen over this run's samples per step.

    The schedule (lr_at) and the end (total_steps) count steps of ``cfg.samples_per_step`` samples; a checkpoint
    continued with another (--force with more workers, another batch size or accumulation) has made
    ``samples_seen`` samples in steps of another size. Its step count alone would move the schedule and the end,
    and could end the run at once as finished with half its samples unseen."""
    seen = int(state.get("samples_seen", 0))
    return seen // cfg.samples_per_step if seen else int(state.get("step", 0))


def _lower_precision_modules() -> list[str]:
    from deepspeed.runtime.torch_autocast import get_default_autocast_lower_precision_modules

    from model.fp8 import Float8Linear
    return [*get_default_autocast_lower_precision_modules(), f"{Float8Linear.__module__}.{Float8Linear.__name__}"]


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        into[key] = _merge(dict(into.get(key) or {}), value) if isinstance(value, dict) else value
    return into


def deepspeed_config(cfg: TrainConfig, zero_stage: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a run at ``zero_stage`` (default: the stage a fresh run runs,
    ``cfg.zero_stage_run``): built from the TrainConfig, then ``cfg.deepspeed``'s entries merged in."""
    return _merge(_deepspeed_base(cfg, cfg.zero_stage_run if zero_stage is None else zero_stage),
                  deepspeed_extra(cfg.deepspeed))


def _deepspeed_base(cfg: TrainConfig, zero_stage: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        # at stage 0 the loop clips itself, on the device (clip_on_device): DeepSpeed's stage-0 clipping waits
        # for the GPU every step
        "gradient_clipping": cfg.optim.grad_clip if zero_stage else 0.0,
        "zero_optimization": {"stage": zero_stage, "overlap_comm": cfg.overlap_comm},
        # bf16 as autocast inside the engine over fp32 master weights (gradients reduced in bf16).
        # DeepSpeed's "bf16" mode would cast the weights instead, and its forward turns an outer
        # torch.autocast off, so fp32 internals (time embeddings, RoPE) would meet bf16 linears.
        "torch_autocast": {"enabled": cfg.precision == "bf16", "dtype": "bfloat16",
                           # the layers whose gradients DeepSpeed reduces in bf16: its defaults (nn.Linear, by
                           # exact class) and the FP8 linear, which would otherwise be reduced in fp32
                           "lower_precision_safe_modules": _lower_precision_modules()},
        # torch's AdamW, not DeepSpeed's fused one: nothing to compile on CPU workers.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer, on by default, waits for the whole device at the start of every forward
        # and the end of every step (cudaDeviceSynchronize), only to print a samples/s the loop measures itself
        "timers": {"throughput": {"enabled": False}},
    }


def clip_on_device(params: list[torch.nn.Parameter], max_norm: float,
                   optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Clip the gradients' global norm to ``max_norm`` (0 = no clipping) and skip a step whose norm is not
    finite, without the host waiting for the GPU; returns the norm before clipping, on the device.

    The loop's clipping at ZeRO stage 0 (TrainConfig.zero_stage_run). DeepSpeed's own reads values back or
    copies host constants in, so the host waits for the backward to finish and the GPU then idles while the
    host queues the optimizer step, the EMA and the next forward (19-30 ms a step at the paper base,
    docs/performance.md). A non-finite norm skips the update (weights and AdamW's moments stay, as with
    DeepSpeed's ZeRO 1/2; the learning-rate schedule still advances, with the loop's step count): the fused
    AdamW (on GPUs) reads the flag on the device (``found_inf``, as torch's GradScaler sets it) and clips in its
    own pass (``grad_scale``): ``p.grad`` holds the clipped gradient only after ``optimizer.step()``; elsewhere,
    where reading it costs nothing, the gradients are dropped so the step updates nothing. A parameter no loss
    reached gets a zero gradient, as DeepSpeed gives it, so AdamW still decays it (with one worker nothing
    else fills it in).
    """
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    norm = torch.nn.utils.get_total_norm(grads)
    bad = ~torch.isfinite(norm)
    if all(group.get("fused") for group in optimizer.param_groups):
        # The fused AdamW clips as it reads the gradients: it divides them by grad_scale (the hook torch's
        # GradScaler unscales through) and writes them back, in its own pass. clip_grads_with_norm_'s separate
        # multiply took 1.8 ms a step at the paper base, the write-back adds about 1 ms (docs/performance.md).
        # torch's clipping multiplies by max_norm / (norm + 1e-6) when that is below 1; the kernel reads fp32.
        optimizer.grad_scale = (torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)  # type: ignore[attr-defined]
                                if max_norm > 0 else None)
        optimizer.found_inf = bad.float()  # type: ignore[attr-defined]
    else:
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        if bool(bad):
            optimizer.zero_grad(set_to_none=True)
    return norm


NONFINITE_STOP = "nonfinite_stop.json"
"""Written into the run folder when NonFiniteSteps stops a run. Ray Train retries a failed worker group
(``max_failures``) and a user may simply run the command again: with the same options and limit both then stop at
once (the retry in its workers, the re-run on the driver before any worker starts: training/launch.py,
check_nonfinite_stop) instead of skipping another ``max_nonfinite_steps`` steps, as long as the limit is not above
the recorded streak; with other options, a higher limit, or 0, the run continues and the driver drops the record."""


class NonFiniteSteps:
    """Optimizer steps whose gradient norm was not finite (inf or NaN), counted on the device so that no step
    waits for it, and read when the loop logs.

    Such a step's update is skipped (clip_on_device, DeepSpeed's ZeRO 1/2), so a run where every step is
    non-finite trains nothing while its loss looks plausible: the rowwise FP8 experiment of session 16 did so for
    120 K clips, its loss within 1% of bf16's (docs/results.md). The loop logs each window's count
    (``nonfinite_steps``) and stops the run once ``limit`` steps in a row were non-finite. Every rank sees the same
    norm (all-reduced gradients), so all ranks stop at the same logged step. The count is read only when the loop
    logs (reading it every step would make each step wait for the device), so the stop comes at the first logged
    step at or after the streak reached ``limit``: up to ``log_every - 1`` steps later.
    """

    def __init__(self, device: torch.device, limit: int, output: Path, fingerprint: str = "", run: str = "") -> None:
        self.limit, self.marker, self.fingerprint, self.run = limit, output / NONFINITE_STOP, fingerprint, run
        self.window = torch.zeros((), device=device)   # non-finite steps since the last read
        self.streak = torch.zeros((), device=device)   # the current run of them (carries across reads)
        self.longest = torch.zeros((), device=device)  # the longest run seen at a step of this window
        self.last_longest = 0

    def add(self, norm: torch.Tensor | float | None) -> None:
        """Count one optimizer step's gradient norm (a device tensor, or a host float from DeepSpeed; None: not
        computed, nothing counted)."""
        if norm is None:
            return
        bad = (~torch.isfinite(norm)).float() if torch.is_tensor(norm) else float(not math.isfinite(norm))
        self.window += bad
        self.streak = (self.streak + 1) * bad
        self.longest = torch.maximum(self.longest, self.streak)

    def read(self) -> int:
        """This window's count (waits for the device); ``check`` then says whether to stop."""
        count, self.last_longest = int(self.window), int(self.longest)
        self.window.zero_()
        self.longest.zero_()  # the current run carries on in ``streak``
        return count

    def _message(self, streak: int, step: int) -> str:
        return (f"{streak} optimizer steps in a row, by step {step}, had a non-finite gradient norm (inf or NaN): "
                "their updates were skipped, or the weights themselves diverged, so the model is not learning; the "
                "run's checkpoints so far are kept. Try a lower optim.lr, fp8=false or compile_blocks=false "
                "(numerics faults in those paths show this way; with --force to continue these weights, or a new "
                "--output), or check the data; optim.max_nonfinite_steps above the streak, or 0 (off), lets the "
                "run go on")

    def check(self, step: int, rank: int) -> None:
        """Raise UserError if ``limit`` steps in a row were non-finite by the last ``read`` (called after its
        metrics are logged, so the run's record shows them). Rank 0 leaves ``NONFINITE_STOP`` behind first: every
        rank decides alike (the same norm), and the others wait for it, since Ray Train stops the whole group at
        the first worker's error."""
        if not (self.limit and self.last_longest >= self.limit):
            return
        message = self._message(self.last_longest, step)
        if rank == 0:
            tmp = self.marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"streak": self.last_longest, "step": step, "message": message,
                                       "fingerprint": self.fingerprint, "run": self.run}))
            os.replace(tmp, self.marker)  # whole or absent, whenever the worker is stopped
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()
        raise UserError(message)

    def refuse_restart(self) -> None:
        """At the start of an attempt: stop at once if an earlier attempt of this job stopped for non-finite steps
        (Ray Train's retry after ``check``). Records left by earlier jobs were checked on the driver, which dropped
        the run's record if its options or limit now let it go on (training/launch.py, check_nonfinite_stop)."""
        refusal = stop_refusal(stop_record(self.marker.parent), self.limit, self.fingerprint, self.marker)
        if refusal:
            raise UserError(refusal)


def stop_record(output: Path) -> dict[str, Any] | None:
    """The ``NONFINITE_STOP`` record in ``output`` (streak, step, message, fingerprint, run), or None: none there, or
    not one this code wrote whole."""
    try:
        record = json.loads((output / NONFINITE_STOP).read_text())
        if not {"streak", "step", "message"} <= record.keys():
            return None
        record["streak"] = int(record["streak"])
    except (OSError, ValueError, TypeError, AttributeError, OverflowError):  # valid JSON, not a record of ours
        return None
    return record


def stop_refusal(record: dict[str, Any] | None, limit: int, fingerprint: str, marker: Path) -> str | None:
    """Why a run is not started again: an earlier attempt left ``record`` (``stop_record``, read from ``marker``)
    with the same options (``fingerprint``: training/config.py, run_fingerprint) and a ``limit`` that would stop it
    again (not above the recorded streak). None when there is no such record (none, one this code did not write,
    other options, a limit above its streak, or 0: off)."""
    if record is None:
        return None
    limit_stops = limit and limit <= record["streak"]
    if not (limit_stops and record.get("fingerprint") == fingerprint):
        return None
    return (f"{record['message']} (an earlier attempt stopped at step {record['step']}, and the same run is not "
            f"retried with optim.max_nonfinite_steps={limit}, not above its streak of {record['streak']}: raise it, "
            f"set 0, change the options, or delete {marker})")


def run_zero_stage(cfg: TrainConfig, resumed: dict[str, Any] | None) -> int:
    """The ZeRO stage this attempt runs: a fresh run's ``cfg.zero_stage_run``; a resume keeps the stage its
    checkpoint (``resumed``, its train_state.json) was written with, since DeepSpeed cannot load one stage's
    optimizer state into another. Checkpoints from before the stage was recorded ran the configured one."""
    return cfg.zero_stage_run if resumed is None else int(resumed.get("zero_stage", cfg.zero_stage))


def checkpoint_state(ckpt: Any) -> dict[str, Any]:
    """A Ray Train checkpoint's ``train_state.json``, read alone (not the whole checkpoint)."""
    with ckpt.filesystem.open_input_file(f"{ckpt.path}/train_state.json") as f:
        return json.loads(f.read())


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
            # One multi-tensor kernel over all parameters: a loop of mul_/add_ per tensor was ~1,000 kernel
            # launches and three passes over 2.4 GB of fp32 weights per step at the paper preset.
            shadows = [self.shadow[n] for n, _ in self.named]
            params = [p.detach() if p.dtype == torch.float32 else p.detach().float() for _, p in self.named]
            torch._foreach_lerp_(shadows, params, 1 - decay)


def _to(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # Batches arrive pinned on GPU workers (pin_batches): the copy is asynchronous, so the host keeps queueing
    # this step's kernels instead of waiting for the GPU to finish the previous step (a pageable copy syncs).
    return {k: (v.to(device, non_blocking=True).to(dtype) if v.is_floating_point() else v.to(device, non_blocking=True))
            for k, v in batch.items()}


def pin_batches(batches: Iterator[Any]) -> Iterator[Any]:
    """(batch, data position) pairs with the batch's tensors in page-locked memory (in the loader's prefetch
    thread when ``data.prefetch`` > 0, off the training thread's path)."""
    for batch, pos in batches:
        yield {k: v.pin_memory() for k, v in batch.items()}, pos


class StepProfiler:
    """torch.profiler over optimizer steps ``[start, start + steps)`` of one rank (``profile_at``).

    Writes ``<output>/profile/trace_rank<r>.json`` (Chrome trace: chrome://tracing or ui.perfetto.dev),
    ``kernels_rank<r>.txt`` (the top operators by device time) and ``phases_rank<r>.json``: host and device
    milliseconds per step of each phase the loop marks (data, forward, backward, optimizer, ema, checkpoint),
    so where a step's time goes is one file, not a trace to read.
    """

    def __init__(self, start: int, steps: int, out: Path, rank: int) -> None:
        self.start, self.steps, self.out, self.rank = start, steps, out, rank
        self.prof: Any = None
        self.done = start <= 0 or steps <= 0

    def step_begins(self, step: int) -> None:
        if self.done or self.prof is not None or step != self.start:
            return
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(activities=acts, record_shapes=False)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def step_ended(self, step: int, last: bool = False) -> dict[str, Any] | None:
        """Call after optimizer step ``step`` (1-based count of steps done); returns the phase table when
        the profiled window closed (at its end, or at the run's ``last`` step if that comes first)."""
        if self.prof is None or (step < self.start + self.steps and not last):
            return None
        self.steps = step - self.start  # the steps actually profiled
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        prof, self.prof, self.done = self.prof, None, True
        self.out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out / f"trace_rank{self.rank}.json"))
        events = prof.key_averages()
        sort = "device_time_total" if torch.cuda.is_available() else "cpu_time_total"
        (self.out / f"kernels_rank{self.rank}.txt").write_text(events.table(sort_by=sort, row_limit=60))

        def device_us(e: Any) -> float:
            return float(getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0) or 0.0)

        phases: dict[str, dict[str, float]] = {}
        for e in events:  # on GPUs each mark comes twice: the host range and its kernels' device range
            if e.key.startswith("train/"):
                row = phases.setdefault(e.key[len("train/"):], {"host_ms": 0.0, "device_ms": 0.0})
                row["host_ms"] = max(row["host_ms"], e.cpu_time_total / 1e3 / self.steps)
                row["device_ms"] = max(row["device_ms"], device_us(e) / 1e3 / self.steps)
        # kernels and copies only: ranges like "Optimizer.step#AdamW.step" appear on the GPU timeline too
        kernels = sum(device_us(e) for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")
                      and not getattr(e, "is_user_annotation", False) and not e.key.startswith("train/"))
        table = {"steps": self.steps, "wall_ms_per_step": wall * 1e3 / self.steps,
                 "device_busy_ms_per_step": kernels / 1e3 / self.steps, "phases": phases}
        (self.out / f"phases_rank{self.rank}.json").write_text(json.dumps(table, indent=1))
        return table


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


def out_of_memory(cfg: TrainConfig, device: torch.device, step: int, detail: str = "") -> UserError:
    """What a step that ran out of GPU memory should change, as the one error the job ends with.

    Every attempt would draw a batch of the same size again, so the advice is a configuration change: the same
    samples per optimizer step in smaller micro-batches, or activation checkpointing. ``detail`` is torch's own
    message (its allocation figures), kept at the end.
    """
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        where = str(device)
    d = cfg.data
    shape = (f"{d.views} x {d.frames} grids" if cfg.stage == "4d" else f"{d.frames}-frame clips") + f" at {d.height}x{d.width}"
    ckpt = "on" if cfg.activation_checkpointing else "off"
    fixes = []
    if cfg.batch_size > 1:
        # the smallest factor of the micro-batch: the samples per step, and so the recipe, stay as they are
        k = next(f for f in range(2, cfg.batch_size + 1) if cfg.batch_size % f == 0)
        fixes.append(f"--set batch_size={cfg.batch_size // k} --set grad_accum={cfg.grad_accum * k} (the same "
                     f"{cfg.samples_per_step} samples per optimizer step over the {cfg.num_workers} workers, in "
                     "smaller micro-batches)")
    if not cfg.activation_checkpointing:
        fixes.append("--set activation_checkpointing=true (each block's activations recomputed in the backward pass: "
                     "about a third more compute)")
    if not fixes:
        fixes.append("smaller frames or fewer of them (data.height, data.width, data.frames), or a GPU with more memory")
    # torch's message: its first sentences (the allocation that failed, the GPU's capacity and use), whole
    said = ""
    for sentence in detail.replace("\n", " ").split(". "):
        if len(said) + len(sentence) > 300:
            break
        said += sentence.rstrip(".") + ". "
    return UserError(f"the {cfg.stage} stage ran out of GPU memory at step {step} on {where}: {cfg.batch_size} "
                     f"{shape} a micro-batch per GPU, activation checkpointing {ckpt}. Try " + "; or ".join(fixes)
                     + " (a run folder that already holds checkpoints continues with these only with --force)."
                     + (f" torch: {said.strip()}" if said else ""))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry: runs on every worker."""
    cfg = from_dict(TrainConfig, loop_config["config"])
    # Set, not defaulted: a DS_ACCELERATOR from the cluster's runtime_env (cluster/runtime_env.yaml ships "cpu" for
    # the CPU demo) would give a GPU preset DeepSpeed's CPU accelerator, which moves the model off the GPU.
    accelerator = "cuda" if cfg.use_gpu else "cpu"
    if os.environ.get("DS_ACCELERATOR", accelerator) != accelerator:
        print(f"[train] DS_ACCELERATOR={os.environ['DS_ACCELERATOR']} in the environment ignored: use_gpu="
              f"{cfg.use_gpu} runs DeepSpeed's {accelerator} accelerator", flush=True)
    os.environ["DS_ACCELERATOR"] = accelerator
    for lock in clear_stale_build_locks():
        print(f"[train] removed a stale build lock left by a killed process: {lock}", flush=True)
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    from training.data import loader_processes_of, make_loader, prefetch
    from training.stages import build_stage
    from pipelines.common.tracking import say
    from training.tracking import Tracker

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    nonfinite = NonFiniteSteps(device, cfg.optim.max_nonfinite_steps, Path(cfg.output), run_fingerprint(cfg), cfg.run)
    nonfinite.refuse_restart()  # an earlier attempt of this job stopped for non-finite steps: before building anything
    torch.manual_seed(cfg.seed)  # identical init on every rank
    stage = build_stage(cfg)
    trainable = stage.trainable_parameters()
    named_trainable = [(n, p) for n, p in stage.named_parameters() if p.requires_grad]
    # On GPUs the fused AdamW: one kernel over DeepSpeed's flat fp32 partition instead of the foreach
    # version's dozen passes over it (its parameters must be on the GPU when it is built).
    stage.to(device)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg))
    ckpt = ray.train.get_checkpoint() or (Checkpoint(cfg.resume_from) if cfg.resume_from else None)
    resumed = checkpoint_state(ckpt) if ckpt is not None else None  # read once: the stage, then the state
    zero_stage = run_zero_stage(cfg, resumed)
    if rank == 0 and zero_stage != cfg.zero_stage_run:
        say(f"[train] the checkpoint was written at ZeRO stage {zero_stage}; continuing at that stage "
            f"(a fresh run of this config runs stage {cfg.zero_stage_run})")
    ds_config = deepspeed_config(cfg, zero_stage)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=stage, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        model_parameters=trainable, dist_init_required=False)
    if zero_stage == 0 and world == 1:
        # one rank: DeepSpeed would still flatten every gradient into buckets, all-reduce them with themselves
        # and copy them back, each backward
        engine.enable_backward_allreduce = False
    ema = EMA(named_trainable, cfg.optim.ema_decay, zero_stage == 3) if cfg.optim.ema_decay > 0 else None
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in stage.parameters())

    # ---- resume: the run's own latest checkpoint, else an explicit one
    state: dict[str, Any] = {"step": 0, "samples_seen": 0, "mlflow_run_id": None}
    data_state = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag="ds")
            if device.type == "cuda":  # a checkpoint from before the fused optimizer brings back its param-group
                for group in optimizer.param_groups:  # flags: keep the fused kernel
                    group["fused"], group["foreach"] = True, None
            state = resumed
            updates, step = state["step"], resumed_step(state, cfg)
            if step != state["step"] and rank == 0:
                say(f"[train] the checkpoint's {state['samples_seen']} samples took {state['step']} steps; at "
                    f"{cfg.samples_per_step} samples a step they are step {step} of {cfg.total_steps}")
            state["step"] = step
            apply_optim_config(optimizer, scheduler, cfg, step)
            rank_file = Path(d) / f"data_rank{rank}.json"
            saved_pos = json.loads(rank_file.read_text()) if rank_file.exists() else None
            if saved_pos is not None and state.get("world") == world \
                    and loader_processes_of(saved_pos) == cfg.data.loader_processes:
                data_state = saved_pos
            elif rank == 0:  # another layout of the data: its saved positions do not apply
                procs = loader_processes_of(saved_pos)
                say(f"[train] the data position was saved by {state.get('world')} workers with "
                    f"{'?' if procs is None else procs} loader processes each, now {world} with "
                    f"{cfg.data.loader_processes}: data order restarts")
            if ema is not None and (Path(d) / "ema.pt").exists():
                saved = torch.load(Path(d) / "ema.pt", map_location="cpu")
                ema.shadow = {k: v.to(ema.shadow[k].device) for k, v in saved.items()}
                ema.updates = updates  # the updates it has had (its warm-up counts them)
        if rank == 0:
            say(f"[train] resumed at step {state['step']} ({state['samples_seen']} samples seen)")

    loader = make_loader(cfg.stage, cfg.data, cfg.batch_size, rank, world, data_state)
    batches = prefetch(pin_batches(iter(loader)) if device.type == "cuda" else iter(loader), cfg.data.prefetch)
    profiler = StepProfiler(cfg.profile_at, cfg.profile_steps, Path(cfg.output) / "profile", rank)
    if rank != 0 and not cfg.profile_all_ranks:
        profiler.done = True
    resumed_at = state["step"] if ckpt is not None else 0
    tracker = Tracker(cfg, rank, state.get("mlflow_run_id"),
                      {"trainable_parameters": n_trainable, "total_parameters": n_total}, resumed_at=resumed_at,
                      resumed_samples=state["samples_seen"] if ckpt is not None else 0)
    # the nodes Ray placed the workers on, by Ray node id (Ray Train's local ranks go by IP address, which two
    # raylets of one machine share); reported with every checkpoint, so summary.json shows a cluster was used
    node_ids: list[Any] = [None] * world
    torch.distributed.all_gather_object(node_ids, ray.get_runtime_context().get_node_id())
    nodes = len(set(node_ids))
    if rank == 0:
        from training.specs import TRAIN_SPECS
        what = TRAIN_SPECS[cfg.stage].describe(cfg)
        say(f"[train {cfg.stage}] {what}: {n_trainable:,} trainable of {n_total:,} parameters; {world} workers on "
            f"{nodes} node{'s' if nodes != 1 else ''}, ZeRO stage {zero_stage}")
    state["mlflow_run_id"] = tracker.run_id
    if rank == 0:  # what DeepSpeed ran with: the job's config and its ZeRO settings as DeepSpeed read them
        zero = engine._config.zero_config.model_dump(mode="json")
        ds_file = Path(cfg.output) / "deepspeed.json"
        ds_file.write_text(json.dumps({"config": ds_config, "zero_optimization": zero}, indent=1, default=str))
        tracker.log_file(ds_file)
    preview: dict[str, torch.Tensor] | None = None
    peak = _peak_flops()

    def save(metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag="ds")
            (Path(d) / f"data_rank{rank}.json").write_text(json.dumps(data_pos))
            if rank == 0:
                (Path(d) / "train_state.json").write_text(json.dumps({**state, "world": world,
                                                                      "zero_stage": zero_stage}))
                if ema is not None:
                    torch.save({k: v.cpu() for k, v in ema.shadow.items()}, Path(d) / "ema.pt")
            ray.train.report({**metrics, "nodes": nodes, "resumed_at": resumed_at},
                             checkpoint=Checkpoint.from_directory(d))

    data_pos = loader.state() if data_state is None else data_state
    t_last, samples_last = time.time(), state["samples_seen"]
    waited = 0.0  # seconds this logging window spent waiting for the loader
    metrics: dict[str, Any] = {}
    grad_norm: Any = None  # the last step's, read only when logged (at stage 0 a device tensor: no wait a step)
    phase = torch.profiler.record_function
    stop_at = min(cfg.total_steps, state["step"] + cfg.steps_this_run) if cfg.steps_this_run else cfg.total_steps
    while state["step"] < stop_at:
        step = state["step"]
        profiler.step_begins(step)
        losses = []
        for micro in range(cfg.grad_accum):
            # Out of memory anywhere in a step (the batch's transfer, forward, backward, or the optimizer's state,
            # made at its first step): the same batch would fail again, so say what to change.
            try:
                with phase("train/data"):
                    t_wait = time.perf_counter()
                    batch, data_pos = next(batches)
                    waited += time.perf_counter() - t_wait
                    batch = _to(batch, device, torch.float32)
                if preview is None:
                    preview = {k: v[:1].clone() for k, v in batch.items()}
                if cfg.fail_kind == "oom" and cfg.fail_at_step == step + 1:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fail_kind=oom: "
                                                 "simulated). GPU 0 has a total capacity of 79.18 GiB")
                with phase("train/forward"):
                    loss, _ = engine(batch, seed=(cfg.seed * 1_000_003 + step) * 4099 + micro * 131 + rank)
                with phase("train/backward"):
                    engine.backward(loss)
                with phase("train/optimizer"):  # at accumulation boundaries: clipping and the optimizer step
                    if zero_stage == 0 and micro == cfg.grad_accum - 1:
                        grad_norm = clip_on_device(trainable, cfg.optim.grad_clip, optimizer)
                    engine.step()
            except torch.OutOfMemoryError as exc:
                raise out_of_memory(cfg, device, step + 1, str(exc)) from exc
            losses.append(loss.detach().float())
        nonfinite.add(grad_norm if zero_stage == 0 else engine.get_global_grad_norm())
        state["step"] += 1
        state["samples_seen"] += cfg.samples_per_step
        if ema is not None:
            with phase("train/ema"):
                ema.update()
        if cfg.fail_kind == "kill" and cfg.fail_at_step and state["step"] == cfg.fail_at_step and rank == min(1, world - 1):
            marker = Path(cfg.output) / "_fault_injected"
            if not marker.exists():
                marker.write_text("rank killed itself once to test recovery")
                # Ray Train's controller registers a reported checkpoint at its next poll of the
                # workers; die after that, as a real crash almost always does.
                time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 0.5)
                os.kill(os.getpid(), signal.SIGKILL)  # a real worker death, as an OOM kill would be

        if state["step"] % cfg.log_every == 0 or state["step"] == cfg.total_steps:
            with phase("train/log"):
                loss_val = torch.stack(losses).mean()
                if world > 1:
                    torch.distributed.all_reduce(loss_val, op=torch.distributed.ReduceOp.AVG)
                now = time.time()
                window = max(now - t_last, 1e-9)
                sps = (state["samples_seen"] - samples_last) / window
                t_last, samples_last = now, state["samples_seen"]
                if zero_stage:
                    grad_norm = engine.get_global_grad_norm()
                metrics = {"loss": float(loss_val), "lr": float(scheduler.get_last_lr()[0]),
                           "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                           "samples_per_s": sps, "tokens_per_s": sps * stage.tokens_per_sample(preview),
                           "samples_seen": state["samples_seen"],
                           # share of the window the GPU waited for the loader: > 0 means add loader processes
                           "data_wait": waited / window, "nonfinite_steps": nonfinite.read()}
                waited = 0.0
                counts = data_pos.get("counts", {})
                produced = sum(v for k, v in counts.items() if k.startswith("source"))
                for name, value in counts.items():  # what the loader actually produced (this rank)
                    if produced:
                        metrics[f"data_{name.replace('-', '_')}_share"] = value / produced
                if peak is not None:
                    metrics["mfu"] = stage.train_flops_per_sample(preview) * sps / world / peak
                    metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
                tracker.log_metrics(metrics, state["step"])
                nonfinite.check(state["step"], rank)
        table = profiler.step_ended(state["step"], last=state["step"] == stop_at)
        if table is not None:
            say(f"[train] profile of steps {cfg.profile_at + 1}-{cfg.profile_at + table['steps']} (rank {rank}): "
                f"{table['wall_ms_per_step']:.1f} ms a step, device busy {table['device_busy_ms_per_step']:.1f} ms; "
                + ", ".join(f"{k} {v['device_ms']:.1f}/{v['host_ms']:.1f}" for k, v in table["phases"].items())
                + f" ms device/host; in {Path(cfg.output) / 'profile'}")
        at_end = state["step"] == cfg.total_steps
        if cfg.sample_every and (state["step"] % cfg.sample_every == 0 or at_end) or at_end:
            _log_samples(stage, engine, preview, cfg, tracker, state["step"])
        if (cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0) or state["step"] == stop_at:
            with phase("train/checkpoint"):
                save(metrics)

    if state["step"] == cfg.total_steps:
        _export(stage, ema, cfg, tracker, rank, zero_stage == 3)
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


def _export(stage, ema, cfg: TrainConfig, tracker, rank: int, zero3: bool) -> None:
    """Write checkpoint_final/model.pt (EMA weights when kept) and log it to MLflow."""
    import deepspeed
    params = list(stage.parameters())
    ctx = deepspeed.zero.GatheredParameters(params) if zero3 else nullcontext()
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

