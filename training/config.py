"""Training configs: one dataclass for all three stages, with named presets per stage.

Progress is counted in samples seen (edm2 style), so changing the number of
workers or the batch size keeps the schedule's meaning.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

from model.fourd import SOFT_INITS, SYNC_VARIANTS, TRAINED_SYNC_VARIANTS
from pipelines.common.config import ConfigError, check_choices, doc, flatten, preset_table
from pipelines.common.shards import BACKGROUNDS
from pipelines.render_filters import FILTER_NAMES

STAGES = ("base", "upsampler", "4d")
"""The training stages' names: the presets' per-stage values are keyed by them, and training/specs.py's
TRAIN_SPECS holds one entry for each (checked there at import)."""

# Options that may change when a run folder's checkpoints are continued: where things go, how often the job
# logs, samples and checkpoints, how the loader is laid out. Any other difference makes the checkpoints a
# different run's, and continuing them needs --force (training/launch.py: check_resume).
RESUME_FREE = frozenset({
    "output", "run_name", "mlflow_uri", "experiment", "ray_address", "fail_at_step", "fail_kind", "max_failures",
    "keep_checkpoints", "log_every", "sample_every", "sample_steps", "checkpoint_every", "steps_this_run",
    "system_metrics_every", "resume_from", "force", "data.prefetch", "data.loader_processes",
    "data.decode_threads", "profile_at", "profile_steps", "profile_all_ranks",
    # a run it stopped continues with a higher limit, or 0 (training/loop.py: NonFiniteSteps)
    "optim.max_nonfinite_steps",
    # FP8 matmuls round the same weights differently; the checkpoints are the same with or without them
    "fp8",
    # kernel launch configurations only: the same arithmetic (a run started before the paper preset turned it on
    # resumes with it)
    "compile_tuning",
})
NUMERICS_FREE = frozenset({"fp8"})
"""Keys of RESUME_FREE that change a run's arithmetic from the resume on (not what its weights are): a resume
that changes one says so in a line and keeps the recorded config beside the new one, so the run's record shows
where the arithmetic changed (e.g. a 4D run started in bf16 before the paper preset turned fp8 on)."""
if not NUMERICS_FREE <= RESUME_FREE:  # option_changes relies on it (not an assert: python -O would drop it)
    raise RuntimeError(f"NUMERICS_FREE keys must be in RESUME_FREE too: {sorted(NUMERICS_FREE - RESUME_FREE)}")


def bound_options(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a flattened config that a run folder's checkpoints are tied to (all but RESUME_FREE) or
    that change its arithmetic (NUMERICS_FREE): what a resume compares. The one statement of that rule, for the
    driver's resume check (training/launch.py) and the non-finite stop's record (training/loop.py)."""
    return {k: v for k, v in flat.items() if k not in RESUME_FREE or k in NUMERICS_FREE}


def option_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Between two flattened configs of one run folder: the options whose change makes the checkpoints another
    run's, and the NUMERICS_FREE ones that change its arithmetic from here on; each sorted."""
    old, new = bound_options(old), bound_options(new)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return [k for k in changed if k not in NUMERICS_FREE], [k for k in changed if k in NUMERICS_FREE]


def run_fingerprint(cfg: TrainConfig) -> str:
    """A digest of a run's name and ``bound_options``: two configs of one run (one folder, one run name) that
    ``option_changes`` tells apart have different fingerprints (values are compared as their JSON, so 1 and 1.0
    differ here, which only drops a record). The non-finite stop's record keeps it, so that a retry of the same run
    is told from one continued with other options."""
    kept = bound_options(flatten(cfg))
    kept["run"] = cfg.run
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


# DeepSpeed entries the job derives from its own options (an extra entry there would silently disagree with
# the loader's batch, the LR schedule's step count or the precision the model was built for).
DEEPSPEED_OWN = {"train_micro_batch_size_per_gpu": "batch_size", "gradient_accumulation_steps": "grad_accum",
                 "train_batch_size": "batch_size and grad_accum", "gradient_clipping": "optim.grad_clip",
                 "zero_optimization.stage": "zero_stage", "torch_autocast.enabled": "precision",
                 "torch_autocast.dtype": "precision", "bf16": "precision", "fp16": "precision", "amp": "precision",
                 "optimizer": "optim (the job builds AdamW)", "scheduler": "optim (the job's cosine schedule)",
                 # the loop's clipping at stage 0 runs after the last micro-batch's backward, where DeepSpeed's
                 # managed accumulation has reduced the gradients; unmanaged, it would reduce them later
                 "managed_gradient_accumulation": "grad_accum"}
# The shape of the rest of the config the job builds (training/loop.py: _deepspeed_base; a test keeps the two
# in step): extra entries go inside its sections and replace its plain values, never the other way round.
DEEPSPEED_JOB_SECTIONS = ("zero_optimization", "torch_autocast", "timers", "timers.throughput")
DEEPSPEED_JOB_VALUES = ("zero_allow_untested_optimizer", "steps_per_print", "wall_clock_breakdown")
_EXPONENT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


def _scalar(value: Any) -> Any:
    """YAML (and so --set) reads 2e8 as a string: such a number becomes one (an int when whole, as DeepSpeed's
    sizes are); every other value stays as given."""
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() else number
    return value


def deepspeed_extra(extra: dict[str, Any], zero_stage: int | None = None,
                    overlap_comm: bool | None = None) -> dict[str, Any]:
    """TrainConfig.deepspeed as nested DeepSpeed config (dotted keys split, 2e8-style numbers read), or ConfigError.

    With ``zero_stage`` (and the job's ``overlap_comm``), ZeRO entries are also checked by DeepSpeed's own model
    of its ZeRO config, as the job will run it (some entries are valid at one stage only)."""
    out: dict[str, Any] = {}

    def put(path: list[str], value: Any) -> None:
        dotted = ".".join(path)
        if not all(path):
            raise ConfigError(f"deepspeed.{dotted}: a key has an empty part")
        for own, option in DEEPSPEED_OWN.items():
            if dotted == own or dotted.startswith(own + "."):
                raise ConfigError(f"deepspeed.{dotted} is set by the job from its own options; set {option} "
                                  f"instead")
        if isinstance(value, dict):
            for k, v in value.items():
                put(path + str(k).split("."), v)
            return
        if dotted in DEEPSPEED_JOB_SECTIONS:
            raise ConfigError(f"deepspeed.{dotted} is a section of the job's DeepSpeed config; set its entries, "
                              f"deepspeed.{dotted}.<name>=<value>")
        if path[0] in DEEPSPEED_JOB_VALUES and len(path) > 1:
            raise ConfigError(f"deepspeed.{path[0]} is a single value in the job's DeepSpeed config, not a section")
        node = out
        for i, key in enumerate(path[:-1]):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"deepspeed.{'.'.join(path[:i + 1])} is both a value and a section")
        if isinstance(node.get(path[-1]), dict):
            raise ConfigError(f"deepspeed.{dotted} is both a value and a section")
        node[path[-1]] = _scalar(value)

    for key, value in extra.items():
        put(str(key).split("."), value)
    if zero_stage is not None and isinstance(out.get("zero_optimization"), dict):
        # DeepSpeed refuses unknown or mistyped ZeRO entries only inside the workers; check them here, where a
        # typo is one clear error before any Ray or GPU work starts (deepspeed imported only when asked).
        from pydantic import ValidationError

        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        try:
            DeepSpeedZeroConfig(**{"stage": zero_stage, "overlap_comm": bool(overlap_comm),
                                   **out["zero_optimization"]})
        except ValidationError as e:
            problems = "; ".join((f"{'.'.join(map(str, err['loc']))}: " if err["loc"] else "") + err["msg"]
                                 for err in e.errors())
            raise ConfigError(f"deepspeed.zero_optimization: {problems} (DeepSpeed's ZeRO options: "
                              "https://www.deepspeed.ai/docs/config-json/)") from None
    return out


@dataclass
class DataConfig:
    grids: list[str] = doc(text="grid shard folders or tar globs (render/pseudo-4D outputs, their shards/ folder or "
                           "the job output folder)", factory=list)
    weights: list[float] = doc(text="sampling weight per entry of grids (empty = equal)", factory=list)
    clips: list[str] = doc(text="clip shard folders (pseudo-4D clips/) used by the base stage besides grid rows "
                           "and columns", factory=list)
    height: int = doc(32, "training frame height (frames are resized, aspect kept, centre-cropped)")
    width: int = doc(32, "training frame width")
    frames: int = doc(8, "frames per clip (base/upsampler) and time steps T of a grid window (4d)")
    views: int = doc(4, "views V of a grid window (4d)")
    background: Literal[(*BACKGROUNDS, "random")] = doc("white", "background for RGBA renders (random: a grey "
                                                         "level drawn per sample)")
    freeze_time_fraction: float = doc(0.5, "base stage: share of clips that are freeze-time videos (grid columns, "
                                      "context 1); the rest are dynamic (rows, context 0). The 4D model's view "
                                      "stream runs the base in the freeze-time context, so it must be trained")
    mask_prob: float = doc(0.5, "base stage: chance that a clip gets a random set of given (clean) frames")
    first_frame_only_prob: float = doc(0.15, "base stage: chance that only frame 0 is given: the pattern every "
                                       "row and column of a 4D grid but the first presents to the base")
    max_given: float = doc(0.5, "base stage: most frames given clean, as a fraction of the clip")
    shuffle_buffer: int = doc(64, "samples held for shuffling within a worker's shard stream")
    prefetch: int = doc(4, "batches decoded ahead in a background thread")
    loader_processes: int = doc(0, "processes decoding batches, each reading its own slice of the shards (0 = in "
                                "the training process); one process decodes ~200 64x64 base clips/s, so a GPU "
                                "training a small model needs several (docs/performance.md)")
    decode_threads: int = doc(1, "threads decoding the examples of a batch in each loader; batches do not depend "
                              "on it. Measured: no gain at 64x64 (Python work between the decodes holds the GIL); "
                              "it may help with large frames, where PNG decoding dominates")
    seed: int = doc(0, "data order seed (shard order, shuffling, masks)")
    keep_filtered: list[Literal[(*FILTER_NAMES, "all")]] = doc(
        text="renders the render job marked as bad (index.parquet: filtered) that are trained on anyway, by reason "
             f"({', '.join(FILTER_NAMES)}; 'all' keeps every one); empty: every marked sample is skipped, and "
             "the training metrics count the skips (data_filtered_<reason>_share)", factory=list)

    def kept_reasons(self) -> frozenset[str] | None:
        """The filter reasons whose samples are read (None: all of them), for ``shards.is_kept``."""
        return None if "all" in self.keep_filtered else frozenset(self.keep_filtered)


@dataclass
class OptimConfig:
    lr: float = doc(1e-4, "peak learning rate")
    min_lr_ratio: float = doc(0.1, "final learning rate as a fraction of the peak (cosine decay)")
    warmup_samples: int = doc(256, "samples of linear learning-rate warm-up")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    beta1: float = doc(0.9, "AdamW beta1")
    beta2: float = doc(0.99, "AdamW beta2")
    grad_clip: float = doc(1.0, "gradient norm clipping (0 = off)")
    ema_decay: float = doc(0.999, "EMA decay of the trained weights per step (0 = off)")
    max_nonfinite_steps: int = doc(100, "stop the run with an error once this many optimizer steps in a row had a "
                                   "non-finite gradient norm (their updates are skipped, so the model is not learning; "
                                   "checked when the loop logs; 0 = never stop)")


@dataclass
class TrainConfig:
    stage: str = doc("base", "which model to train: base, upsampler or 4d (training/specs.py: TRAIN_SPECS)")
    output: str = doc("outputs/train", "run folder: Ray Train checkpoints, final checkpoint, MLflow store")
    run_name: str = doc("", "Ray Train / MLflow run name (default: the stage); re-running with the same name resumes")
    model_preset: str = doc("tiny", "model size preset (model/: tiny, demo, proof, small, paper)")
    model: dict = doc(text="overrides of the model preset's fields, e.g. --set model.depth=4", factory=dict)
    sync: Literal[TRAINED_SYNC_VARIANTS] = doc("soft", "4d: synchronization variant to train (the training-free "
                                               "ones run on a base checkpoint in generation and evaluation)")
    soft_init: Literal[SOFT_INITS] = doc("zero", "4d soft sync initialisation (schedule: Eq. 13's weights)")
    base_checkpoint: str = doc("", "4d: base model weights: a checkpoint folder/model.pt or runs:/<mlflow run id>")
    init_from: str = doc("", "start from this checkpoint's weights (folder, model.pt, .pt.gz or runs:/<id>) but "
                         "not its data position, step or optimizer. 4d: a 4D checkpoint of the same variant, the "
                         "second phase of section 4.1 (pseudo-4D, then renders); its base is used, so "
                         "--base-checkpoint is not needed. base: a base checkpoint to train further with a new "
                         "schedule (a pretrained video model, or a longer run); its model config replaces the "
                         "preset's")
    resume_from: str = doc("", "start from this Ray Train checkpoint folder when the run folder has none")
    total_samples: int = doc(256, "training length in samples seen (all workers together)")
    steps_this_run: int = doc(0, "stop after this many optimizer steps and checkpoint (0 = train to the end); "
                              "re-running the same command continues, e.g. under a time-limited scheduler")
    batch_size: int = doc(2, "micro-batch per worker")
    grad_accum: int = doc(1, "micro-batches accumulated per optimizer step")
    num_workers: int = doc(2, "Ray Train workers")
    use_gpu: bool = doc(False, "one GPU per worker (NCCL); otherwise CPU workers over gloo")
    cpus_per_worker: float = doc(1.0, "CPUs reserved per worker")
    zero_stage: Literal[0, 1, 2, 3] = doc(2, "DeepSpeed ZeRO stage (1 and 2 run as 0 on a single worker, where "
                                          "they would partition nothing, unless ZeRO-Offload is set: "
                                          "TrainConfig.zero_stage_run)")
    precision: Literal["bf16", "fp32"] = doc("fp32", "bf16 autocast needs a GPU or a recent CPU")
    deepspeed: dict = doc(text="DeepSpeed config entries merged over the one the job builds (training/loop.py: "
                          "deepspeed_config), dotted keys for nested ones, e.g. --set "
                          "deepspeed.zero_optimization.reduce_bucket_size=2e8; the batch, accumulation, ZeRO stage, "
                          "precision and clipping come from their own options; torch_autocast."
                          "lower_precision_safe_modules replaces the job's list", factory=dict)
    fp8: bool = doc(False, "run the transformer blocks' token matmuls in FP8 (model/fp8.py; H100-class GPUs): tensorwise "
                    "scaling for trained layers, rowwise for the 4D stage's frozen base; the same weights and checkpoints. "
                    "On at the paper preset's 4D stage (+7% through the job, 45.1% MFU on an H100 against 42.2% in session 18, "
                    "45.5-46.0% since session 19; sync layers trained with it score 0.04 dB below bf16's on held-out grids, "
                    "docs/performance.md) and at its base stage (46.1-46.2% MFU through the job against 44.1% in bf16, "
                    "session 21; 12 GB less memory; a proof base trained from scratch with it scores 0.7% higher per-clip "
                    "loss and 0.05-0.08 dB lower PSNR on held-out clips than in bf16, the size of another seed's "
                    "difference, docs/results.md)")
    activation_checkpointing: bool = doc(False, "recompute block activations in the backward pass")
    compile_blocks: bool = doc(False, "torch.compile the transformer blocks (about 1.8x faster steps on H100; "
                               "see docs/performance.md)")
    compile_tuning: bool = doc(False, "with compile_blocks: inductor tunes each generated kernel's block sizes on the GPU "
                               "at compile time (model/dit.py: TUNED_COMPILE; on an H100 +2.8% on the bare base step, "
                               "+2.0-2.5% through the base job, 1-1.5 minutes more of a fresh compile per worker)")
    log_every: int = doc(1, "optimizer steps between metric logs")
    sample_every: int = doc(0, "optimizer steps between sample grids logged to MLflow (0 = only at the end)")
    sample_steps: int = doc(4, "Euler steps used for the logged samples")
    checkpoint_every: int = doc(0, "optimizer steps between Ray Train checkpoints (0 = only at the end)")
    keep_checkpoints: int = doc(2, "Ray Train checkpoints kept")
    max_failures: int = doc(1, "worker failures Ray Train recovers from (restart from the latest checkpoint)")
    system_metrics_every: float = doc(10.0, "seconds between MLflow system metric samples (CPU, memory, GPU)")
    mlflow_uri: str = doc("", "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite in the output "
                          "folder; 'none' switches tracking off)")
    experiment: str = doc("", "MLflow experiment (default: 4real-<stage>)")
    seed: int = doc(0, "model init and noise seed")
    ray_address: str = doc("", "Ray cluster (default: RAY_ADDRESS, else a private local Ray)")
    profile_at: int = doc(0, "profile optimizer steps from this one (0 = off): a Chrome trace, the top kernels and "
                          "device/host ms per phase of a step (data, forward, backward, optimizer, EMA) in "
                          "<output>/profile/; pick a step after compilation and warm-up")
    profile_steps: int = doc(3, "steps profiled from profile_at")
    profile_all_ranks: bool = doc(False, "profile every rank, not only rank 0")
    fail_at_step: int = doc(0, "testing: a fault at this optimizer step (0 = off), as fail_kind says")
    fail_kind: Literal["kill", "oom"] = doc("kill", "testing: what fail_at_step does: kill (rank 1 dies on the first "
                                                    "attempt) or oom (the step raises the GPU's out-of-memory error "
                                                    "on every rank and attempt)")
    force: bool = doc(False, "continue the run folder's checkpoints although the config differs from the one "
                      "they were trained with (the old config.yaml is kept beside the new one)")
    data: DataConfig = doc(text="input data", factory=DataConfig)
    optim: OptimConfig = doc(text="optimizer and schedule", factory=OptimConfig)

    @property
    def run(self) -> str:
        """The run's name: ``run_name``, or the stage's. Ray Train's run folder (<output>/ray/<run>), the MLflow run's
        name and the non-finite stop's record all use it."""
        return self.run_name or self.stage

    def validate(self) -> None:
        from training.specs import TRAIN_SPECS  # the registry imports this module
        if self.stage not in TRAIN_SPECS:
            raise ConfigError(f"unknown stage '{self.stage}'; choose one of {', '.join(TRAIN_SPECS)}")
        if self.data.weights and len(self.data.weights) != len(self.data.grids):
            raise ConfigError(f"data.weights has {len(self.data.weights)} entries but data.grids has "
                              f"{len(self.data.grids)}; give one weight per grid folder")
        for name in ("batch_size", "grad_accum", "num_workers", "total_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.optim.max_nonfinite_steps < 0:
            raise ConfigError(f"optim.max_nonfinite_steps must be 0 (never stop) or more, got "
                              f"{self.optim.max_nonfinite_steps}")
        if self.total_samples % self.samples_per_step:
            # a silent floor would train less than asked and make "progress in samples" lie
            n = self.samples_per_step
            lo, hi = self.total_samples // n * n, (self.total_samples // n + 1) * n
            raise ConfigError(f"total_samples={self.total_samples} is not a whole number of steps of {n} samples "
                              f"(batch_size x grad_accum x num_workers); use {lo or hi}" + (f" or {hi}" if lo else ""))
        if self.sync in SYNC_VARIANTS and self.sync not in TRAINED_SYNC_VARIANTS:
            raise ConfigError(f"sync variant '{self.sync}' cannot be trained; train one of "
                              f"{', '.join(TRAINED_SYNC_VARIANTS)} (the training-free ones run on a base "
                              "checkpoint in generation and evaluation)")
        check_choices(self)
        # The entries' shape, none of them the job's own, ZeRO entries valid at this stage; kept in their nested,
        # typed form, so config.yaml, MLflow and the resume check see one spelling of each.
        self.deepspeed = deepspeed_extra(self.deepspeed)
        try:
            deepspeed_extra(self.deepspeed, self.zero_stage_run, self.overlap_comm)
        except ConfigError as e:
            if self.zero_stage_run == self.zero_stage:
                raise
            raise ConfigError(f"{e} (one worker runs ZeRO stage {self.zero_stage} as stage 0, where it would "
                              "partition nothing: TrainConfig.zero_stage_run)") from None
        if not 0.0 <= self.data.freeze_time_fraction <= 1.0:
            raise ConfigError(f"data.freeze_time_fraction must be in [0, 1], got {self.data.freeze_time_fraction}")
        if not 0.0 <= self.data.first_frame_only_prob <= 1.0:
            raise ConfigError(f"data.first_frame_only_prob must be in [0, 1], got {self.data.first_frame_only_prob}")
        if self.data.loader_processes < 0 or self.data.decode_threads < 1:
            raise ConfigError(f"data.loader_processes must be >= 0 and data.decode_threads >= 1, got "
                              f"{self.data.loader_processes} and {self.data.decode_threads}")
        for name in ("frames", "views", "height", "width"):
            if getattr(self.data, name) < 1:
                raise ConfigError(f"data.{name} must be at least 1, got {getattr(self.data, name)}")
        TRAIN_SPECS[self.stage].check_config(self)

    @property
    def overlap_comm(self) -> bool:
        """DeepSpeed's ``overlap_comm`` for this job: reduce gradients on a side stream, overlapped with the
        backward, only with several GPUs. On one there is nothing to reduce, and with it ZeRO 1/2 waits for the
        whole device at the end of every backward, so the GPU idles while the host runs the optimizer step
        (measured, docs/performance.md "Session 13"). ``--set deepspeed.zero_optimization.overlap_comm=...``
        still overrides it."""
        return self.use_gpu and self.num_workers > 1

    @property
    def zero_stage_run(self) -> int:
        """The ZeRO stage a fresh run of this config runs: ``zero_stage``, except stages 1 and 2 on a single
        worker, which run as stage 0. With one data-parallel rank they partition nothing, yet DeepSpeed's
        version keeps a second fp32 copy of the weights (10 GB at the paper base), runs a Python hook per
        gradient tensor and an optimizer step that waits for the GPU (docs/performance.md, "Session 15"); at
        stage 0 the loop clips on the device (``clip_on_device``) and nothing waits. Kept: stage 3, and any
        stage with ZeRO-Offload entries (``deepspeed.zero_optimization.offload_*``), which exist for one GPU.
        A resumed run keeps the stage its checkpoint was written with (DeepSpeed cannot load one stage's
        optimizer state into another)."""
        zero = self.deepspeed.get("zero_optimization") or {}
        # offload_optimizer/offload_param with a device (DeepSpeed's default device is "none"), or the older
        # cpu_offload flags DeepSpeed still reads
        offload = any((k.startswith("offload_") and isinstance(v, dict) and str(v.get("device", "none")) != "none")
                      or (k in ("cpu_offload", "cpu_offload_param") and bool(v)) for k, v in zero.items())
        return 0 if self.num_workers == 1 and self.zero_stage in (1, 2) and not offload else self.zero_stage

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.num_workers

    @property
    def total_steps(self) -> int:
        return max(1, self.total_samples // self.samples_per_step)  # validate() refuses a remainder


PRESET_TABLE: dict[str, dict[str, Any]] = {
    "tiny": dict(model_preset="tiny", total_samples=16, batch_size=2, num_workers=2, system_metrics_every=0.2,
                 output="outputs/tiny/{stage}",
                 data=dict(frames=4, views=3, height={"base": 16, "upsampler": 32, "4d": 16},
                           width={"base": 16, "upsampler": 32, "4d": 16}, shuffle_buffer=8),
                 optim=dict(lr={"base": 1e-3, "upsampler": 1e-3, "4d": 1e-2}, warmup_samples=4)),
    # minutes per stage on 2 CPU cores: enough to see learning, not for quality. The base takes 600 steps (about
    # 3 minutes): after 150 its fills were pastel noise over the background; after 600 they are the background
    # with object-coloured blobs where the object stands (docs/results.md, "What make demo's own model shows").
    "demo": dict(model_preset={"base": "demo", "upsampler": "tiny", "4d": "demo"},
                 total_samples={"base": 9600, "upsampler": 2400, "4d": 800}, batch_size=8, num_workers=2,
                 output="outputs/demo/train_{stage}", sample_every=100, log_every=10,
                 # a killed demo run resumes losing seconds, not restarting from step 1
                 checkpoint_every={"base": 100, "upsampler": 50, "4d": 20},
                 # 4 frames: the demo's freeze-time columns have 4 views, so both contexts train
                 data=dict(frames=4, views=4, height=32, width=32),
                 optim=dict(lr=2e-3, warmup_samples=160)),
    # One H100 within the GPU limits of docs/results.md (run 2): base 576 K clips in ~11 min at ~1,000
    # clips/s; phase 1 (three 4D variants and the upsampler side by side) ~7 min; phase 2 ~3 min.
    "proof": dict(model_preset="proof", num_workers=1, use_gpu=True, precision="bf16", zero_stage=2,
                  compile_blocks=True, log_every={"base": 50, "upsampler": 50, "4d": 20},
                  checkpoint_every={"base": 500, "upsampler": 500, "4d": 100}, output="outputs/proof/{stage}",
                  total_samples={"base": 576_000, "upsampler": 48_000, "4d": 9_600},
                  # the upsampler's 32 clips per step as 2 x 16: with its 256 x 256 convolutional head a
                  # batch of 32 took 25 GB, and beside the four phase-2 jobs the GPU ran out (run 6)
                  batch_size={"base": 64, "upsampler": 16, "4d": 8}, grad_accum={"base": 1, "upsampler": 2, "4d": 1},
                  data=dict(frames={"base": 8, "upsampler": 4, "4d": 8}, views=8,
                            height={"base": 64, "upsampler": 256, "4d": 64},
                            width={"base": 64, "upsampler": 256, "4d": 64}, shuffle_buffer=64, prefetch=4,
                            loader_processes=8),
                  # EMA windows (1 / (1 - decay) steps) a fraction of each run: a 0.999 EMA of a
                  # 1200-step run would still hold much of its first half.
                  optim=dict(lr={"base": 6e-4, "upsampler": 4e-4, "4d": 5e-4},
                             warmup_samples={"base": 8000, "upsampler": 2000, "4d": 400},
                             ema_decay={"base": 0.998, "upsampler": 0.997, "4d": 0.995})),
    "small": dict(model_preset="small", total_samples=2_000_000, batch_size=8, num_workers=1, use_gpu=True,
                  precision="bf16", zero_stage=2, log_every=20, compile_blocks=True, sample_every=2000,
                  checkpoint_every=2000, output="outputs/small/{stage}",
                  data=dict(frames=8, views=8, height={"base": 36, "upsampler": 144, "4d": 36},
                            width={"base": 64, "upsampler": 256, "4d": 64}),
                  optim=dict(lr=2e-4, warmup_samples=20_000)),
    "paper": dict(model_preset="paper",
                  # 65 K steps of 32 x 24 clips; the 4D model 40 K steps of 4 x 24 grids. Per GPU, 32 base clips
                  # and 4 grids: smaller batches left GEMMs too small and the per-step costs (optimizer,
                  # DeepSpeed's per-tensor gradient work, the 4D forward's kernel launches) too large a share of
                  # a step: 4D MFU 36% at 2 grids, 42% at 3, 43% at 4 (73 of 80 GB; docs/performance.md, issue 15)
                  # The 4D recipe changed with it: the same grids in half the optimizer steps at the same learning
                  # rate, and what counts steps (checkpoint_every, sample_every, the EMA's decay) spans twice the
                  # grids; not yet checked for quality at this scale.
                  total_samples={"base": 49_920_000, "upsampler": 49_920_000, "4d": 20_000 * 24 * 8},
                  # The upsampler's 16 clips a step as 2 micro-batches of 8: at 288x512 its 8-frame clips are
                  # 18,432 tokens each, and 16 at once ran an 80 GB H100 out of memory in the first forward (they
                  # take 132 GiB, measured on an H200); 8 take 68 GiB, at 46.6% MFU against 46.8% (session 22).
                  batch_size={"base": 32, "upsampler": 8, "4d": 4}, grad_accum={"base": 1, "upsampler": 2, "4d": 1},
                  num_workers=24, use_gpu=True,
                  # loader processes: decoding in the training process contended for its GIL with the
                  # host thread that queues the GPU's kernels (-11% samples/s at the base, measured)
                  cpus_per_worker=7,
                  precision="bf16", compile_blocks=True, zero_stage=2, log_every=50, sample_every=5000,
                  # inductor's kernel tuning at compile time: base job +2.0-2.5%, 4D job +0.5% (within noise), for
                  # 1-1.5 minutes more of a fresh compile (docs/performance.md, session 21). The upsampler: at most
                  # +0.2 points, alternated on one H100 (45.7 against 45.5%; 45.8-46.0 against 45.8-45.9%, session 23): off
                  compile_tuning={"base": True, "upsampler": False, "4d": True},
                  # The 4D stage's frozen base in FP8: +7% samples/s through the job (45.1% MFU on an H100 against 42.2%, session 18;
                  # 45.5-46.0% with session 19's SwiGLU kernel);
                  # on the proof model, sync layers trained so scored 0.04 dB PSNR below bf16's on held-out grids
                  # (docs/performance.md, session 14). At the base, FP8 (tensorwise) takes the job from 44.1% to
                  # 46.1-46.2% (session 21); a proof base trained from scratch in FP8 scores 0.7% higher per-clip loss
                  # and 0.05-0.08 dB lower PSNR on held-out clips than in bf16, the size of another bf16 seed's
                  # difference (docs/results.md, session 21): on.
                  fp8={"base": True, "upsampler": False, "4d": True},
                  checkpoint_every=2000, output="outputs/paper/{stage}",
                  data=dict(frames=8, views=8, height={"base": 72, "upsampler": 288, "4d": 72},
                            width={"base": 128, "upsampler": 512, "4d": 128},
                            loader_processes={"base": 6, "upsampler": 6, "4d": 4}),
                  optim=dict(lr=1e-4, warmup_samples=100_000)),
}
"""The training presets of all three stages (pipelines.common.config.PRESET_NAMES), as field overrides of
TrainConfig (nested sections as nested dicts): tiny (tests, seconds), demo (the default of a run without
--preset), proof (the GPU proof run of docs/results.md), small (1 GPU), paper. A value that differs per stage
is a dict keyed by stage (``STAGES``), ``{"base": ..., "upsampler": ..., "4d": ...}``, and
``{stage}`` in a string is the stage's name (``for_stage``).

Base clips are 8 frames at every GPU preset: the data sources have 8 views (renders 8 x 16, pseudo-4D 8 x 8),
so 8 is the longest freeze-time column they hold, and the 4D model runs the base on 8-frame rows and
columns of its 8 x 8 window. (16-frame base clips would see no freeze-time column at all.)
"""


def for_stage(value: Any, stage: str) -> Any:
    """A preset table entry resolved for one stage: a per-stage dict (keyed by stage names) gives the stage's
    value, other dicts resolve entry by entry, and ``{stage}`` in a string becomes the stage's name."""
    if isinstance(value, Mapping):
        if value and set(value) <= set(STAGES):
            if stage not in value:
                raise ConfigError(f"a preset table entry {dict(value)} gives no value for the {stage} stage; add one")
            return for_stage(value[stage], stage)
        return {k: for_stage(v, stage) for k, v in value.items()}
    if isinstance(value, str):
        return value.replace("{stage}", stage)
    return value


def presets_for(stage: str) -> dict[str, Callable[[], TrainConfig]]:
    """Named presets of one stage (``PRESET_TABLE`` resolved for it): name -> a function building a fresh
    config (callers may change it)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}'; choose one of {', '.join(STAGES)}")
    return preset_table(TrainConfig, {name: {"stage": stage, **for_stage(row, stage)}
                                      for name, row in PRESET_TABLE.items()})
