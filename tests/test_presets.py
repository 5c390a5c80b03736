"""Every job offers the same preset names, and every preset builds; every preset of every training stage takes
its data shape and trains a step, so no preset ships broken.

On CPU the wide presets run at a reduced width and depth (patch size, frame size and clip/grid shape
unchanged): what breaks a preset is almost always a shape (frames not divisible by the patch, a window
larger than the data), which the reduced model meets exactly as the full one would.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from model.dit import DIT_PRESETS, VideoDiT
from pipelines import evaluate_4d, generate_4d, make_pseudo4d, render_objaverse
from pipelines.common.config import (PRESET_DOCS, PRESET_NAMES, ConfigError, build_preset, check_choices, run_cli,
                                     to_dict)
from pipelines.evaluation import EvalConfig
from pipelines.generation import GenerateConfig
from pipelines.make_pseudo4d import Pseudo4DConfig
from pipelines.render_objaverse import RenderJobConfig
from shardgen import make_grid_shards
from training.config import TrainConfig, for_stage, presets_for
from training.data import check_sources
from training.config import STAGES
from training.stages import build_stage

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


# ------------------------------------------------------------------------------------ every job's presets

JOBS: dict[str, tuple[type, Callable[[], dict[str, Callable[[], Any]]]]] = {
    "render": (RenderJobConfig, lambda: render_objaverse.PRESETS),
    "pseudo4d": (Pseudo4DConfig, lambda: make_pseudo4d.PRESETS),
    "generate": (GenerateConfig, lambda: generate_4d.PRESETS),
    "evaluate": (EvalConfig, lambda: evaluate_4d.PRESETS),
    **{f"train_{s}": (TrainConfig, lambda s=s: presets_for(s)) for s in STAGES},
}
"""Every job and its presets (name -> a function building the config), as the job's CLI uses them."""

NO_PRESET_DEFAULT = {"render": RenderJobConfig, "generate": GenerateConfig, "evaluate": EvalConfig}
"""Jobs whose run without --preset gets the config class's field defaults; every other job starts from demo."""


class Parsed(Exception):
    """Raised in place of the job's work once its command line is parsed (``cfg``: the resolved config)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__("parsed")
        self.cfg = cfg


def _parse(job: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a job's command line in this process, through run_cli as its script does, up to the parsed config:
    then ``Parsed`` stops it, so no test here ever starts a job's work."""
    import pipelines.common.config as config_module
    import training.launch

    def parse_and_stop(*args: Any, **kwargs: Any) -> Any:
        raise Parsed(config_module.parse_config(*args, **kwargs)[0])

    if job.startswith("train_"):
        monkeypatch.setattr(training.launch, "parse_config", parse_and_stop)
        monkeypatch.setattr(sys, "argv", [f"training/{job}.py", *argv])
        training.launch.main_for(job[len("train_"):], f"the {job} job")
        return
    module = {"render": render_objaverse, "pseudo4d": make_pseudo4d, "generate": generate_4d,
              "evaluate": evaluate_4d}[job]
    monkeypatch.setattr(module, "parse_config", parse_and_stop)
    run_cli(module.main, argv)


def test_the_preset_names_are_the_five_documented_ones() -> None:
    assert PRESET_NAMES == ("tiny", "demo", "proof", "small", "paper")
    assert set(PRESET_DOCS) == set(PRESET_NAMES) and all(PRESET_DOCS[n].strip() for n in PRESET_NAMES)


@pytest.mark.parametrize("job", JOBS)
def test_every_job_offers_exactly_the_preset_names(job: str) -> None:
    """The same names on every job, in the documented order (the order --help lists them in)."""
    assert tuple(JOBS[job][1]()) == PRESET_NAMES


@pytest.mark.parametrize("job", JOBS)
def test_every_preset_of_every_job_builds_and_validates(job: str) -> None:
    cls, presets = JOBS[job]
    built = {}
    for name, make in presets().items():
        cfg = make()
        assert type(cfg) is cls, (job, name)
        cfg.validate()
        check_choices(cfg)
        again = make()
        assert again == cfg and again is not cfg, (job, name)  # a fresh config per call: callers may change it
        built[name] = to_dict(cfg)
    # five different starting points: no preset is a stray copy of another
    assert len({repr(d) for d in built.values()}) == len(built), job


@pytest.mark.parametrize("job", JOBS)
def test_help_lists_the_five_presets_and_the_default(job: str, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        _parse(job, ["--help"], monkeypatch)
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help wherever it likes
    listed = ", ".join(f"{n} ({PRESET_DOCS[n]})" for n in PRESET_NAMES)
    assert f"--preset PRESET named starting config, one of: {listed}" in text, text[:2000]
    default = "None: no preset, the field defaults shown below" if job in NO_PRESET_DEFAULT else "demo"
    assert f"{listed} (default: {default}) --config" in text


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize("name", ["full", "default", "Tiny"])
def test_an_unknown_preset_is_one_clear_error(job: str, name: str, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The old names (pseudo-4D's full, render's, generate's and evaluate's default) included."""
    with pytest.raises(SystemExit) as exit_:
        _parse(job, ["--preset", name], monkeypatch)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: unknown preset '{name}'; choose one of: tiny, demo, proof, small, paper\n"


@pytest.mark.parametrize("job", JOBS)
def test_a_run_without_preset_starts_where_it_always_did(job: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Render, generate and evaluate: the config class's field defaults (no preset); pseudo-4D and the training
    stages: demo."""
    with pytest.raises(Parsed) as parsed:
        _parse(job, [], monkeypatch)
    expected = NO_PRESET_DEFAULT[job]() if job in NO_PRESET_DEFAULT else JOBS[job][1]()["demo"]()
    assert parsed.value.cfg == expected
    with pytest.raises(Parsed) as parsed:  # and --preset picks a preset
        _parse(job, ["--preset", "proof"], monkeypatch)
    assert parsed.value.cfg == JOBS[job][1]()["proof"]() != expected


def test_a_preset_is_built_from_its_table_without_changing_it() -> None:
    table = copy.deepcopy(make_pseudo4d.PRESET_TABLE)
    cfg = make_pseudo4d.PRESETS["tiny"]()
    assert (cfg.views, cfg.procedural.count, cfg.procedural.width) == (3, 3, 64)  # a nested section from the table
    assert cfg.transform == Pseudo4DConfig().transform  # a section the row leaves alone keeps its defaults
    cfg.procedural.count = 99
    assert make_pseudo4d.PRESETS["tiny"]().procedural.count == 3
    assert make_pseudo4d.PRESET_TABLE == table
    row = {"procedural": {"count": 2}, "procedural.width": 64}  # a section both nested and dotted
    assert build_preset(Pseudo4DConfig, row).procedural.width == 64
    assert row == {"procedural": {"count": 2}, "procedural.width": 64}


def test_training_table_values_resolve_per_stage() -> None:
    row = {"output": "outputs/x/{stage}", "batch_size": {"base": 64, "upsampler": 16, "4d": 8},
           "data": {"height": {"base": 64, "upsampler": 256, "4d": 64}, "views": 8}}
    assert for_stage(row, "upsampler") == {"output": "outputs/x/upsampler", "batch_size": 16,
                                           "data": {"height": 256, "views": 8}}
    assert for_stage(row, "4d")["batch_size"] == 8
    with pytest.raises(ConfigError, match="gives no value for the upsampler stage"):
        for_stage({"lr": {"base": 1e-3, "4d": 1e-2}}, "upsampler")
    with pytest.raises(ConfigError, match="unknown stage 'video'"):
        presets_for("video")
    assert [presets_for(s)["proof"]().batch_size for s in STAGES] == [{"base": 64, "upsampler": 16, "4d": 8}[s]
                                                                     for s in STAGES]
    assert all(presets_for(s)["tiny"]().stage == s and presets_for(s)["tiny"]().output == f"outputs/tiny/{s}"
               for s in STAGES)


def test_generate_and_evaluate_proof_presets_are_the_proof_runs_choice() -> None:
    """The proof presets sample as the proof run chose (docs/results.md, its recipe's eval_sampler) and
    evaluate as many grids per set as it does."""
    from training.recipes.proof import ProofConfig, parse_sampler
    chosen = parse_sampler(ProofConfig().eval_sampler)
    for cfg in (generate_4d.PRESETS["proof"](), evaluate_4d.PRESETS["proof"]()):
        assert (cfg.method, cfg.steps) == (chosen["method"], chosen["steps"])
    assert evaluate_4d.PRESETS["proof"]().max_grids == ProofConfig().eval_grids


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
