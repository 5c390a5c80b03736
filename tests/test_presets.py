"""Every preset of every stage builds, takes its data shape and trains a step, so no preset ships broken.

On CPU the wide presets run at a reduced width and depth (patch size, frame size and clip/grid shape
unchanged): what breaks a preset is almost always a shape (frames not divisible by the patch, a window
larger than the data), which the reduced model meets exactly as the full one would.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from model.dit import DIT_PRESETS, VideoDiT
from shardgen import make_grid_shards
from training.config import STAGES, TrainConfig, presets_for
from training.data import check_sources
from training.stages import build_stage

PRESET_NAMES = sorted(presets_for("base"))
NARROW = {"width": 32, "heads": 2, "depth": 1}


def _narrow(cfg: TrainConfig) -> TrainConfig:
    return dataclasses.replace(cfg, model=dict(NARROW), compile_blocks=False, activation_checkpointing=False)


def _batch(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    d = cfg.data
    if cfg.stage == "4d":
        x = torch.rand(1, d.views, d.frames, 3, d.height, d.width) * 2 - 1
        mask = torch.zeros(1, d.views, d.frames)
        mask[:, 0], mask[:, :, 0] = 1, 1
        return {"x": x, "mask": mask, "context": torch.zeros(1, dtype=torch.long)}
    x = torch.rand(1, d.frames, 3, d.height, d.width) * 2 - 1
    batch = {"x": x, "mask": torch.zeros(1, d.frames), "context": torch.ones(1, dtype=torch.long)}
    if cfg.stage == "upsampler":
        batch["lowres"] = torch.nn.functional.avg_pool2d(x.flatten(0, 1), 4).view(1, d.frames, 3, d.height // 4,
                                                                                 d.width // 4)
    return batch


@pytest.mark.parametrize("stage", ["base", "upsampler", "4d"])
def test_every_preset_but_tiny_checkpoints_during_its_run(stage: str) -> None:
    """A killed run resumes from its last checkpoint; with checkpoint_every 0 it would restart from step 1
    (tiny runs in seconds, so it only checkpoints at the end)."""
    for name, make in presets_for(stage).items():
        cfg = make()
        steps = cfg.total_steps
        if name != "tiny":
            assert 0 < cfg.checkpoint_every <= steps // 2, (stage, name, cfg.checkpoint_every, steps)


@pytest.mark.parametrize("stage", STAGES)
def test_every_preset_trains_a_whole_number_of_steps(stage: str) -> None:
    """total_samples that is not a multiple of the samples per step is refused with the two nearest lengths,
    not floored in silence; every preset passes."""
    from pipelines.common.config import ConfigError
    for name, make in presets_for(stage).items():
        cfg = make()
        cfg.validate()
        assert cfg.total_steps * cfg.samples_per_step == cfg.total_samples, (stage, name)
    cfg = dataclasses.replace(presets_for(stage)["demo"](), total_samples=2_401 if stage != "4d" else 801)
    with pytest.raises(ConfigError, match=r"not a whole number of steps of 16 samples .*use (2400 or 2416|800 or 816)"):
        cfg.validate()


def test_every_stage_has_the_same_preset_names() -> None:
    assert all(sorted(presets_for(s)) == PRESET_NAMES for s in STAGES)
    assert {"tiny", "demo", "proof", "small", "paper"} <= set(PRESET_NAMES)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_builds_and_trains_a_step(stage: str, name: str) -> None:
    cfg = _narrow(presets_for(stage)[name]())
    cfg.validate()
    torch.manual_seed(0)
    if stage == "4d":
        base_cfg = dataclasses.replace(DIT_PRESETS[cfg.model_preset], **NARROW)
        base = VideoDiT(base_cfg)
        for p in base.parameters():  # a trained-looking base: adaLN-Zero would block every gradient
            torch.nn.init.normal_(p, std=0.05)
        from training.stages import FourDStage
        stage_mod = FourDStage(cfg, base=base)
    else:
        stage_mod = build_stage(cfg)
    batch = _batch(cfg)
    loss, _ = stage_mod(batch, seed=0)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in stage_mod.trainable_parameters()]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_base_preset_trains_both_contexts_on_the_data_we_make(tmp_path: Path, name: str) -> None:
    """Renders are 8 views x 16 frames and pseudo-4D grids 8 x 8: every base preset must get freeze-time
    columns (the 4D model's view stream runs the base in that context) and use every source."""
    cfg = presets_for("base")[name]()
    renders = make_grid_shards(tmp_path / "render", n=2, views=8, frames=16, size=8)
    pseudo = make_grid_shards(tmp_path / "pseudo", n=2, views=8, frames=8, size=8)
    data = dataclasses.replace(cfg.data, grids=[str(renders), str(pseudo)])
    check_sources("base", data)  # raises on a skipped source or a missing context
    assert 0 < data.freeze_time_fraction < 1
