"""The registry of training stages (torchtitan's train specs): everything that differs between the base, the
upsampler and the 4D stage, in one entry each.

The job around a stage is the same for all of them: the driver (training/launch.py) resolves the weights the
stage starts from and checks its data before any worker starts, the workers (training/loop.py) build the
stage's module and loader and run DeepSpeed, and the exported checkpoint records what was trained on.
Adding a stage is one ``TRAIN_SPECS`` entry, its ``Stage`` module (training/stages.py), its example builder
(training/data.py), presets (training/config.py) and a three-line entry script (docs/extending.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipelines.common.config import ConfigError
from pipelines.common.errors import UserError
from training.config import STAGES, DataConfig, TrainConfig
from training.data import (CONTEXT_NAMES, ExampleBuilder, base_contexts, base_example, grid_example, shape_list,
                           upsampler_example)

from model.dit import CONTEXT_DYNAMIC, CONTEXT_FREEZE_TIME


def _check_clips(stage: str, cfg: DataConfig, descs: list[dict[str, Any]], contexts: bool) -> None:
    """Every source gives clips of data.frames frames; with ``contexts``, the freeze-time share can be met."""
    union: set[int] = set()
    for d in descs:
        got = base_contexts(d, cfg.frames)
        if not got:
            raise UserError(f"data source '{d['spec']}' gives no {cfg.frames}-frame clip (it holds "
                            f"{shape_list(d)}); the {stage} stage would skip it. Lower data.frames to the "
                            "source's views/frames or drop the source")
        union |= got
    if not contexts:
        return
    need = ({CONTEXT_FREEZE_TIME} if cfg.freeze_time_fraction > 0 else set()) | \
           ({CONTEXT_DYNAMIC} if cfg.freeze_time_fraction < 1 else set())
    for c in sorted(need - union):
        held = "; ".join(f"{d['spec']}: {shape_list(d)}" for d in descs)
        why = ("freeze-time clips are grid columns, so data.frames must be at most a grid's views"
               if c == CONTEXT_FREEZE_TIME else
               "dynamic clips are grid rows, so data.frames must be at most a grid's frames")
        raise UserError(f"no data source gives {CONTEXT_NAMES[c]} clips of {cfg.frames} frames ({held}), "
                        f"but data.freeze_time_fraction={cfg.freeze_time_fraction} asks for them: {why}")


def _check_windows(stage: str, cfg: DataConfig, descs: list[dict[str, Any]], contexts: bool) -> None:
    """Every source holds a grid of at least the 4D window."""
    for d in descs:
        if not any(k == "grid" and v >= cfg.views and t >= cfg.frames for k, v, t, _ in d["shapes"]):
            raise UserError(f"data source '{d['spec']}' has no grid of at least {cfg.views} views x {cfg.frames} "
                            f"frames (it holds {shape_list(d)}); the {stage} stage would skip it. Lower "
                            "data.views/data.frames or drop the source")


def _start_base(cfg: TrainConfig, output: Path) -> tuple[TrainConfig, list[str]]:
    """--init-from: a base checkpoint continued with a fresh schedule (its architecture replaces the preset's)."""
    if not cfg.init_from:
        return cfg, []
    from pipelines.common.checkpoints import load_checkpoint, resolve_checkpoint
    if cfg.model:
        raise UserError("--init-from takes the model (its architecture too) from the checkpoint; drop the "
                        f"model overrides ({', '.join(sorted(cfg.model))})")
    local = resolve_checkpoint(cfg.init_from, cfg.mlflow_uri, output / "init_checkpoint")
    cfg = dataclasses.replace(cfg, init_from=str(local))
    start = load_checkpoint(str(local))
    if start["stage"] != "base":
        raise UserError(f"init_from '{cfg.init_from}' holds a '{start['stage']}' model; the base stage continues "
                        "a base-stage checkpoint")
    return cfg, list((start.get("data_items") or {}).get("items", []))


def _start_fresh(cfg: TrainConfig, output: Path) -> tuple[TrainConfig, list[str]]:
    if cfg.init_from:
        raise UserError(f"--init-from continues a base or 4D model; the {cfg.stage} stage cannot start from one")
    return cfg, []


def _start_4d(cfg: TrainConfig, output: Path) -> tuple[TrainConfig, list[str]]:
    """The frozen base (--base-checkpoint) or a 4D checkpoint of the same variant (--init-from, phase 2).

    An MLflow run is fetched once, into the run folder that every worker can read (shared storage on a cluster).
    """
    from pipelines.common.checkpoints import load_checkpoint, resolve_checkpoint
    if cfg.init_from:
        local = resolve_checkpoint(cfg.init_from, cfg.mlflow_uri, output / "init_checkpoint")
        cfg = dataclasses.replace(cfg, init_from=str(local), base_checkpoint="")
    else:
        local = resolve_checkpoint(cfg.base_checkpoint, cfg.mlflow_uri, output / "base_checkpoint")
        cfg = dataclasses.replace(cfg, base_checkpoint=str(local))
    start = load_checkpoint(str(local))
    if cfg.init_from:
        from training.stages import check_fourd_init
        check_fourd_init(start, cfg.init_from, cfg.sync)
    elif start["stage"] != "base":
        raise UserError(f"base_checkpoint '{cfg.base_checkpoint}' holds a '{start['stage']}' model; pass a "
                        "base-stage checkpoint (or a 4D one with --init-from)")
    return cfg, list(start.get("data_items", {}).get("items", []))


def _build(name: str) -> Callable[[TrainConfig], Any]:
    def build(cfg: TrainConfig) -> Any:  # training.stages imports torch models: loaded in the workers only
        from training import stages
        return getattr(stages, name)(cfg)
    return build


def _check_upsampler_config(cfg: TrainConfig) -> None:
    if cfg.data.height % 4 or cfg.data.width % 4:
        raise ConfigError("upsampler: data.height and data.width must be divisible by 4 (x4 super-resolution)")


@dataclass(frozen=True)
class TrainSpec:
    """What one training stage is; the job around it is shared."""

    build: Callable[[TrainConfig], Any]
    """config -> the stage's ``training.stages.Stage`` module (model, loss, sampling, export)."""
    examples: ExampleBuilder
    """(grid, frames, data config, rng) -> one training example, or None when the grid cannot give one."""
    check_data: Callable[[str, DataConfig, list[dict[str, Any]], bool], None]
    """(stage, data config, source descriptions, contexts) -> raises a one-line UserError when a source would
    be skipped; run on the driver before any worker starts."""
    start_from: Callable[[TrainConfig, Path], tuple[TrainConfig, list[str]]] = _start_fresh
    """(config, run folder) -> (config with local weight paths, item ids those weights were trained on)."""
    check_config: Callable[[TrainConfig], None] = lambda cfg: None
    """Stage-specific option checks (TrainConfig.validate calls it)."""
    clips: bool = False
    """Reads data.clips (pseudo-4D clip shards) beside the grids."""
    contexts: bool = False
    """Draws each clip's context (freeze-time with probability data.freeze_time_fraction, else dynamic)."""
    describe: Callable[[TrainConfig], str] = lambda cfg: cfg.model_preset
    """What the start-up status line names as the trained model."""


TRAIN_SPECS: dict[str, TrainSpec] = {
    "base": TrainSpec(_build("BaseStage"), base_example, _check_clips, _start_base, clips=True, contexts=True),
    "upsampler": TrainSpec(_build("UpsamplerStage"), upsampler_example, _check_clips,
                           check_config=_check_upsampler_config),
    "4d": TrainSpec(_build("FourDStage"), grid_example, _check_windows, _start_4d,
                    describe=lambda cfg: f"sync '{cfg.sync}'"),
}
"""Every training stage by name (``--stage``; training/train_<stage>.py)."""
if tuple(TRAIN_SPECS) != STAGES:  # a stage needs both: its name (presets) and its spec
    raise ImportError(f"TRAIN_SPECS {tuple(TRAIN_SPECS)} and training.config.STAGES {STAGES} must name the same "
                      "stages in the same order")
