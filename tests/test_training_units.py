"""The training loop's small pieces on their own: the learning-rate schedule, the EMA's decay warm-up and the
DeepSpeed config (the end-to-end runs in test_training.py exercise them only together)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from pipelines.common.config import ConfigError
from training.config import OptimConfig, TrainConfig
from training.loop import EMA, deepspeed_config, lr_at


def _cfg(**kw) -> TrainConfig:
    optim = OptimConfig(warmup_samples=40, min_lr_ratio=0.1)
    return dataclasses.replace(TrainConfig(total_samples=400, batch_size=2, grad_accum=1, num_workers=2,
                                           optim=optim), **kw)


def test_lr_warms_up_linearly_then_follows_a_cosine_to_its_floor() -> None:
    cfg = _cfg()  # 4 samples a step: 10 warm-up steps, 100 steps in all
    assert cfg.samples_per_step == 4 and cfg.total_steps == 100
    warm = [lr_at(s, cfg) for s in range(10)]
    assert warm[0] == pytest.approx(4 / 44) and warm[-1] == pytest.approx(40 / 44)
    assert all(b - a == pytest.approx(4 / 44) for a, b in zip(warm, warm[1:]))  # linear
    assert lr_at(10, cfg) == pytest.approx(1.0)  # the peak where warm-up ends
    mid = 10 + (100 - 10) // 2
    assert lr_at(mid, cfg) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-9)  # halfway down the cosine
    assert lr_at(100, cfg) == pytest.approx(0.1)  # the floor at the last step
    decay = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(b < a for a, b in zip(decay, decay[1:]))
    # progress is in samples: twice the workers (and half the steps) keeps the same curve
    wide = _cfg(num_workers=4)
    assert lr_at(25, wide) == pytest.approx(lr_at(50, cfg))
    assert lr_at(0, _cfg(optim=OptimConfig(warmup_samples=0))) == pytest.approx(1.0, abs=0.01)


def test_ema_decay_warms_up_so_a_short_run_exports_trained_weights() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("w", p)], decay=0.999, zero3=False)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()  # first update: decay min(0.999, 1/10) = 0.1, so the shadow moves 90% of the way
    torch.testing.assert_close(ema.shadow["w"], torch.full((3,), 0.9))
    for _ in range(200):
        ema.update()
    assert ema.shadow["w"].min() > 0.999  # a fixed 0.999 would still sit at 1 - 0.999**201 = 0.18
    assert ema.updates == 201 and ema.shadow["w"].dtype == torch.float32
    late = min(0.999, (1 + 5000) / (10 + 5000))
    assert late == pytest.approx(0.998, abs=1e-3) and math.isclose(min(0.999, 1e9 / (1e9 + 9)), 0.999)


def test_deepspeed_config_follows_the_training_config() -> None:
    cpu = deepspeed_config(_cfg(zero_stage=3, grad_accum=4, precision="fp32"))
    assert (cpu["train_micro_batch_size_per_gpu"], cpu["gradient_accumulation_steps"]) == (2, 4)
    assert cpu["zero_optimization"] == {"stage": 3, "overlap_comm": False}  # gloo on CPU: nothing to overlap
    assert cpu["torch_autocast"]["enabled"] is False and cpu["gradient_clipping"] == 1.0
    gpu = deepspeed_config(_cfg(use_gpu=True, precision="bf16", optim=OptimConfig(grad_clip=0.5)))
    assert gpu["zero_optimization"]["overlap_comm"] is True  # two GPUs: the reduction overlaps the backward
    one = deepspeed_config(_cfg(use_gpu=True, precision="bf16", num_workers=1, batch_size=4))
    assert one["zero_optimization"]["overlap_comm"] is False  # one GPU: nothing to reduce, no device sync a step
    # one worker runs ZeRO-2 as stage 0, where the loop clips on the device (DeepSpeed's clipping is off)
    assert one["zero_optimization"]["stage"] == 0 and one["gradient_clipping"] == 0.0
    assert deepspeed_config(_cfg(num_workers=1), zero_stage=2)["gradient_clipping"] == 1.0  # a resumed ZeRO-2 run
    # DeepSpeed's throughput timer (a device-wide sync at every forward and step) is off, unless asked for
    assert cpu["timers"] == {"throughput": {"enabled": False}}
    from pipelines.common.config import apply_overrides
    timed = apply_overrides(_cfg(), {"deepspeed.timers.throughput.enabled": True})
    assert deepspeed_config(timed)["timers"] == {"throughput": {"enabled": True}}
    forced = deepspeed_config(_cfg(use_gpu=True, num_workers=1, batch_size=4,
                                   deepspeed={"zero_optimization.overlap_comm": True}))
    assert forced["zero_optimization"]["overlap_comm"] is True
    assert {k: gpu["torch_autocast"][k] for k in ("enabled", "dtype")} == {"enabled": True, "dtype": "bfloat16"}
    # FP8 linears get their gradients reduced in bf16 like nn.Linear (DeepSpeed matches classes exactly)
    assert {"torch.nn.modules.linear.Linear", "model.fp8.Float8Linear"} <= set(
        gpu["torch_autocast"]["lower_precision_safe_modules"])
    assert gpu["gradient_clipping"] == 0.5
    assert "bf16" not in gpu and "fp16" not in gpu  # autocast over fp32 master weights, not cast weights


def test_extra_deepspeed_entries_merge_over_the_jobs_config_and_the_jobs_own_are_refused() -> None:
    from pipelines.common.config import ConfigError, apply_overrides
    cfg = apply_overrides(_cfg(use_gpu=True, precision="bf16"), {  # dotted, as --set gives them (YAML-read
        "deepspeed.zero_optimization.reduce_bucket_size": "2e8",       # values: 2e8 stays a string there)
        "deepspeed.zero_optimization.contiguous_gradients": False, "deepspeed.wall_clock_breakdown": True})
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 200000000,
                                       "contiguous_gradients": False}  # merged into the job's section
    assert ds["wall_clock_breakdown"] is True and ds["train_micro_batch_size_per_gpu"] == 2
    # kept nested and typed: config.yaml, MLflow and the resume check see one spelling
    assert cfg.deepspeed == {"zero_optimization": {"reduce_bucket_size": 200000000, "contiguous_gradients": False},
                             "wall_clock_breakdown": True}
    # a YAML file gives nested mappings and typed values: the same result
    nested = apply_overrides(_cfg(use_gpu=True, precision="bf16"), {"deepspeed": {"zero_optimization": {
        "reduce_bucket_size": 200000000, "contiguous_gradients": False}, "wall_clock_breakdown": True}})
    assert deepspeed_config(nested) == ds and nested.deepspeed == cfg.deepspeed
    # ZeRO entries are checked at the run's own stage (compute_grad_norm=false is valid at 1-2 only)
    assert apply_overrides(_cfg(zero_stage=2), {"deepspeed.zero_optimization.compute_grad_norm": False})
    with pytest.raises(ConfigError, match="compute_grad_norm=false is supported only with ZeRO Stage 1 or 2"):
        apply_overrides(_cfg(zero_stage=3), {"deepspeed.zero_optimization.compute_grad_norm": False})
    for key, option in (("zero_optimization.stage", "zero_stage"), ("train_micro_batch_size_per_gpu", "batch_size"),
                        ("bf16.enabled", "precision"), ("amp", "precision"), ("gradient_clipping", "optim.grad_clip")):
        with pytest.raises(ConfigError, match=f"deepspeed.{key} is set by the job.*set {option}"):
            apply_overrides(_cfg(), {f"deepspeed.{key}": "1"})
    with pytest.raises(ConfigError, match="deepspeed.zero_optimization: reduce_bucket_sise: Extra inputs"):
        apply_overrides(_cfg(), {"deepspeed.zero_optimization.reduce_bucket_sise": "2e8"})  # a typo, caught early
    # a value where the job has a section (it would replace the whole section, stage included), or a
    # section where it has a value, is refused
    for value in (False, '{"stage": 3}'):
        with pytest.raises(ConfigError, match="deepspeed.zero_optimization is a section of the job's"):
            apply_overrides(_cfg(), {"deepspeed": {"zero_optimization": value}})
    with pytest.raises(ConfigError, match="deepspeed.steps_per_print is a single value"):
        apply_overrides(_cfg(), {"deepspeed.steps_per_print.every": "1"})
    with pytest.raises(ConfigError, match="both a value and a section"):
        apply_overrides(_cfg(), {"deepspeed": {"tensorboard": 3, "tensorboard.enabled": True}})


def test_one_worker_runs_zero_1_and_2_as_stage_0_but_keeps_zero_3_and_offload() -> None:
    from pipelines.common.config import apply_overrides
    assert [_cfg(num_workers=1, zero_stage=z).zero_stage_run for z in (0, 1, 2, 3)] == [0, 0, 0, 3]
    assert [_cfg(num_workers=2, zero_stage=z).zero_stage_run for z in (0, 1, 2, 3)] == [0, 1, 2, 3]
    one = {"num_workers": 1, "zero_stage": 2}
    for entry, value in (("offload_optimizer.device", "cpu"), ("offload_param.device", "nvme"), ("cpu_offload", True)):
        offload = apply_overrides(_cfg(**one), {f"deepspeed.zero_optimization.{entry}": value})
        assert offload.zero_stage_run == 2, entry  # ZeRO-Offload is a one-GPU feature: the stage stays
    for entry, value in (("offload_optimizer.device", "none"), ("cpu_offload", False)):  # no offload after all
        assert apply_overrides(_cfg(**one), {f"deepspeed.zero_optimization.{entry}": value}).zero_stage_run == 0
    # ZeRO entries are checked at the stage that runs: compute_grad_norm=false (stages 1-2 only) on one worker
    # would reach DeepSpeed at stage 0 and fail in the workers, so it fails here, saying why
    from pipelines.common.config import ConfigError
    with pytest.raises(ConfigError, match="compute_grad_norm=false is supported only with ZeRO Stage 1 or 2.*"
                                          "one worker runs ZeRO stage 2 as stage 0"):
        apply_overrides(_cfg(**one), {"deepspeed.zero_optimization.compute_grad_norm": False})
    # the loop clips after the last micro-batch's backward: DeepSpeed must reduce there (managed accumulation)
    with pytest.raises(ConfigError, match="managed_gradient_accumulation is set by the job.*grad_accum"):
        apply_overrides(_cfg(), {"deepspeed.managed_gradient_accumulation": False})


def test_a_resume_runs_at_its_checkpoints_zero_stage() -> None:
    from training.loop import run_zero_stage
    one = _cfg(num_workers=1, zero_stage=2)
    assert run_zero_stage(one, None) == 0  # fresh: one worker runs stage 0
    assert run_zero_stage(one, {"step": 3, "zero_stage": 0}) == 0
    assert run_zero_stage(_cfg(num_workers=4, zero_stage=2), {"step": 3, "zero_stage": 0}) == 0  # kept on 4
    assert run_zero_stage(one, {"step": 3}) == 2  # written before the stage was recorded: the configured one


@pytest.mark.parametrize("fused", [False, True])
def test_clip_on_device_clips_like_torch_and_skips_a_non_finite_step(fused: bool) -> None:
    """The loop's clipping at ZeRO stage 0: the same update as torch's clip_grad_norm_ then AdamW (the fused AdamW,
    as on GPUs, clipping inside its step through grad_scale), the norm returned without a host read, and a step
    with a non-finite gradient updates nothing (the fused AdamW through found_inf; the unfused one by dropping
    the gradients)."""
    from training.loop import clip_on_device
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = torch.optim.AdamW(params, lr=0.1, fused=fused)
    ref_opt = torch.optim.AdamW(ref, lr=0.1)
    for a, b in zip(params, ref):
        a.grad = torch.randn_like(a) * 10
        b.grad = a.grad.clone()
    norm = clip_on_device(params, 1.0, opt)
    assert norm.item() == pytest.approx(torch.nn.utils.clip_grad_norm_(ref, 1.0).item())
    assert norm.item() > 1.0  # clipping was active
    if not fused:  # the fused AdamW clips inside its step (grad_scale): AdamW's moments below show it
        for a, b in zip(params, ref):
            torch.testing.assert_close(a.grad, b.grad)
    opt.step()
    ref_opt.step()
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b)
        # Adam's first update is blind to a global scale of the gradients; its moments are not
        torch.testing.assert_close(opt.state[a]["exp_avg"], ref_opt.state[b]["exp_avg"])
    before = [p.detach().clone() for p in params]
    moments = [opt.state[p]["exp_avg"].clone() for p in params]
    params[1].grad = torch.full_like(params[1], float("inf"))
    params[0].grad = torch.ones_like(params[0])
    assert not torch.isfinite(clip_on_device(params, 1.0, opt))
    opt.step()
    for a, b, m in zip(params, before, moments):
        torch.testing.assert_close(a.detach(), b)  # no update, no weight decay
        torch.testing.assert_close(opt.state[a]["exp_avg"], m)
        assert float(opt.state[a]["step"]) == 1  # the skipped step is not counted
    # the next finite step updates again; a parameter no loss reached (no gradient) still decays
    params[0].grad, params[1].grad = torch.ones_like(params[0]), None
    clip_on_device(params, 0.0, opt)  # 0: no clipping, the norm still measured
    opt.step()
    assert not torch.equal(params[0].detach(), before[0])
    # AdamW skips a parameter without a gradient; with the zero one it decays and follows its moments, as
    # under DeepSpeed
    assert torch.equal(params[1].grad, torch.zeros_like(params[1])) and not torch.equal(params[1].detach(), before[1])


def test_non_finite_steps_are_counted_per_window_and_a_long_run_of_them_stops_the_job(tmp_path) -> None:
    """The loop's count of steps whose gradient norm was not finite: per logging window, from device tensors (stage
    0) or host floats (DeepSpeed's norm), a UserError once ``limit`` came in a row (also across windows), and the
    record it leaves, which stops a retry of the same run at once but not one with other options or a higher limit."""
    from pipelines.common.errors import UserError
    from training.loop import NONFINITE_STOP, NonFiniteSteps
    nan, inf = float("nan"), float("inf")
    steps = NonFiniteSteps(torch.device("cpu"), 3, tmp_path, "opts")
    for norm in (torch.tensor(0.5), torch.tensor(nan), inf, None, torch.tensor(2.0), nan):
        steps.add(norm)
    assert steps.read() == 3  # NaN, inf and the last NaN; None is not counted
    steps.check(6, rank=0)  # two in a row at most: below the limit
    assert not (tmp_path / NONFINITE_STOP).exists()
    steps.add(torch.tensor(inf))
    steps.add(nan)
    assert steps.read() == 2
    other_rank = NonFiniteSteps(torch.device("cpu"), 3, tmp_path, "opts")
    other_rank.last_longest = 3
    with pytest.raises(UserError, match="3 optimizer steps in a row, by step 8,"):
        other_rank.check(8, rank=1)
    assert not (tmp_path / NONFINITE_STOP).exists()  # only rank 0 writes the record
    with pytest.raises(UserError, match="3 optimizer steps in a row, by step 8, had a non-finite gradient norm"):
        steps.check(8, rank=0)  # the window's last NaN carried over: three in a row
    assert json.loads((tmp_path / NONFINITE_STOP).read_text())["streak"] == 3
    steps.add(torch.tensor(1.0))  # a finite step ends the run
    assert steps.read() == 0
    steps.check(9, rank=0)

    record = (tmp_path / NONFINITE_STOP).read_text()
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match=r"by step 8, .* \(an earlier attempt stopped at step 8, .* not above its "
                                        r"streak of 3"):
        NonFiniteSteps(cpu, 3, tmp_path, "opts").refuse_restart()  # Ray Train's retry of the same run
    NonFiniteSteps(cpu, 3, tmp_path, "other opts").refuse_restart()  # e.g. a lower lr: goes on
    NonFiniteSteps(cpu, 4, tmp_path, "opts").refuse_restart()  # a limit above the streak
    NonFiniteSteps(cpu, 0, tmp_path, "opts").refuse_restart()  # 0, the check off
    assert (tmp_path / NONFINITE_STOP).read_text() == record  # a worker never drops it (the driver does, below)
    for odd in (record[:20], "[]", "null", "3", '{"streak": 3}', '{"streak": "x", "step": 8, "message": "m"}',
                '{"streak": Infinity, "step": 8, "message": "m"}'):  # not a whole record of ours: nothing to refuse
        (tmp_path / NONFINITE_STOP).write_text(odd)
        NonFiniteSteps(cpu, 3, tmp_path, "opts").refuse_restart()
    (tmp_path / NONFINITE_STOP).unlink()
    NonFiniteSteps(cpu, 3, tmp_path, "opts").refuse_restart()  # no record: nothing to do

    # what a retry of the same run keeps, and what makes another one: the options a resume compares (the resume
    # check's own rule), fp8 (arithmetic) and the run's name
    from pipelines.common.config import flatten
    from training.config import option_changes, run_fingerprint
    base = _cfg()
    same = (dataclasses.replace(base, log_every=7, output="x"), dataclasses.replace(base, profile_at=3))
    others = (dataclasses.replace(base, fp8=True), dataclasses.replace(base, run_name="b"),
              dataclasses.replace(base, optim=dataclasses.replace(base.optim, lr=1.0)),
              dataclasses.replace(base, batch_size=3))
    for cfg in same:
        assert run_fingerprint(cfg) == run_fingerprint(base) and option_changes(flatten(base), flatten(cfg)) == ([], [])
    for cfg in others:
        assert run_fingerprint(cfg) != run_fingerprint(base)
    assert option_changes(flatten(base), flatten(others[0])) == ([], ["fp8"])
    assert option_changes(flatten(base), flatten(others[2])) == (["optim.lr"], [])

    # the driver, before any worker starts: the same run and limit are refused and the record kept; the same run with
    # other options (--force with a lower lr here) or a higher limit drops the record and goes on; another run's
    # record in the same folder is kept
    from training.launch import check_nonfinite_stop, check_run_folder
    limited = dataclasses.replace(base, optim=dataclasses.replace(base.optim, max_nonfinite_steps=3))
    ours = json.loads(record) | {"fingerprint": run_fingerprint(limited), "run": limited.stage}
    (tmp_path / NONFINITE_STOP).write_text(json.dumps(ours))
    with pytest.raises(UserError, match=r"not above its streak of 3: raise it"):
        check_nonfinite_stop(limited, tmp_path)
    assert (tmp_path / NONFINITE_STOP).exists()
    higher = dataclasses.replace(limited, optim=dataclasses.replace(limited.optim, max_nonfinite_steps=4))
    check_nonfinite_stop(higher, tmp_path)
    assert not (tmp_path / NONFINITE_STOP).exists()
    (tmp_path / NONFINITE_STOP).write_text(json.dumps(ours))
    lower_lr = dataclasses.replace(limited, force=True, optim=dataclasses.replace(limited.optim, lr=1e-5))
    check_nonfinite_stop(dataclasses.replace(limited, run_name="other"), tmp_path)  # another run: not its record
    assert (tmp_path / NONFINITE_STOP).exists()
    check_nonfinite_stop(lower_lr, tmp_path)
    assert not (tmp_path / NONFINITE_STOP).exists()
    older = {k: v for k, v in ours.items() if k != "run"}  # a record that names no run is taken as this run's
    (tmp_path / NONFINITE_STOP).write_text(json.dumps(older))
    check_nonfinite_stop(dataclasses.replace(limited, run_name="other"), tmp_path)
    assert not (tmp_path / NONFINITE_STOP).exists()
    check_nonfinite_stop(limited, tmp_path)  # no record: nothing to do
    # the resume check comes first: other options without --force are refused as such, and the record stays
    import yaml
    from pipelines.common.config import to_dict
    folder = dataclasses.replace(limited, output=str(tmp_path))
    (tmp_path / "ray" / folder.run / "checkpoint_2026-11-25_10-00-00.000000").mkdir(parents=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(folder)))
    (tmp_path / NONFINITE_STOP).write_text(json.dumps(ours))
    with pytest.raises(UserError, match="holds checkpoints of a run with other options"):
        check_run_folder(dataclasses.replace(folder, optim=dataclasses.replace(folder.optim, lr=1e-5)), tmp_path)
    assert (tmp_path / NONFINITE_STOP).exists()
    with pytest.raises(UserError, match="not above its streak of 3"):
        check_run_folder(folder, tmp_path)

    off = NonFiniteSteps(torch.device("cpu"), 0, tmp_path)
    for _ in range(5):
        off.add(nan)
    assert off.read() == 5
    off.check(5, rank=0)  # 0: never stops
    with pytest.raises(ConfigError, match="max_nonfinite_steps must be 0"):
        _cfg(optim=OptimConfig(max_nonfinite_steps=-1)).validate()


def test_the_deepspeed_options_shape_matches_the_config_the_job_builds() -> None:
    from training.config import DEEPSPEED_JOB_SECTIONS, DEEPSPEED_JOB_VALUES, DEEPSPEED_OWN
    from training.loop import _deepspeed_base
    for cfg in (_cfg(), _cfg(use_gpu=True, precision="bf16")):
        base = _deepspeed_base(cfg, cfg.zero_stage_run)
        def sections(d: dict, prefix: str = "") -> set[str]:  # every nested section, dotted
            return {n for k, v in d.items() if isinstance(v, dict)
                    for n in {prefix + k} | sections(v, prefix + k + ".")}
        assert sections(base) == set(DEEPSPEED_JOB_SECTIONS)
        assert {k for k, v in base.items() if not isinstance(v, dict)} == set(DEEPSPEED_JOB_VALUES) | {
            k for k in DEEPSPEED_OWN if "." not in k and k in base}


def test_a_run_recorded_before_new_options_existed_resumes_without_force(tmp_path, capsys) -> None:
    """A config.yaml written before an option was added lacks its key: the option reads as its default, not
    as a difference, while a real difference is still refused. A resume that turns fp8 on (a paper-preset 4D
    run started before the preset did) goes on, says so, and keeps the recorded config."""
    import dataclasses

    import pytest
    import yaml

    from pipelines.common.config import to_dict
    from pipelines.common.errors import UserError
    from training.config import presets_for
    from training.launch import check_resume

    cfg = dataclasses.replace(presets_for("base")["tiny"](), output=str(tmp_path))
    run_dir = tmp_path / "ray" / cfg.run
    run_dir.mkdir(parents=True)
    recorded = to_dict(cfg)
    for key in ("fp8", "profile_at", "profile_steps", "profile_all_ranks", "compile_tuning"):
        recorded.pop(key)
    recorded["data"].pop("keep_filtered")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recorded))
    # Ray's run folder alone, as a run that failed before its first checkpoint leaves it: nothing to continue
    assert check_resume(dataclasses.replace(cfg, batch_size=cfg.batch_size * 2), tmp_path) is None
    (run_dir / "checkpoint_2026-11-25_10-00-00.000000").mkdir()
    assert check_resume(cfg, tmp_path) is None
    # another run name into the folder: its files (config.yaml, metrics, the MLflow run id) are the first run's
    with pytest.raises(UserError, match=rf"holds the run '{cfg.run}'; a run folder holds one run.*--run-name"):
        check_resume(dataclasses.replace(cfg, run_name="second"), tmp_path)
    assert check_resume(dataclasses.replace(cfg, profile_at=5), tmp_path) is None  # resume-free
    # a run started before the paper preset turned compile_tuning on resumes with it: launch settings only
    assert check_resume(dataclasses.replace(cfg, compile_tuning=True), tmp_path) is None
    with pytest.raises(UserError, match="batch_size"):
        check_resume(dataclasses.replace(cfg, batch_size=cfg.batch_size * 2), tmp_path)
    kept = check_resume(dataclasses.replace(cfg, fp8=True), tmp_path)
    assert kept is not None and kept.is_file() and not (tmp_path / "config.yaml").exists()
    assert "fp8" not in yaml.safe_load(kept.read_text())  # the record as it was
    assert "other arithmetic from here on (fp8 False -> True" in capsys.readouterr().out
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recorded))  # resumed again at once: a record of its own
    again = check_resume(dataclasses.replace(cfg, fp8=True), tmp_path)
    assert again is not None and again != kept and kept.is_file() and again.is_file()
    capsys.readouterr()
    # --force with other options and fp8 switched: one line that names both
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recorded))
    check_resume(dataclasses.replace(cfg, fp8=True, batch_size=cfg.batch_size * 2, force=True), tmp_path)
    (line,) = capsys.readouterr().out.splitlines()
    assert "--force" in line and "batch_size" in line and "other arithmetic from here on (fp8 False -> True)" in line


def test_fp8_is_the_paper_base_and_4d_default_and_a_gpu_without_fp8_is_told_how_to_turn_it_off(monkeypatch) -> None:
    """The paper preset runs the 4D stage's frozen base in FP8 (docs/performance.md, session 14) and trains the
    base in FP8 (session 21: docs/results.md, "FP8 at the base"), the upsampler in bf16; on a GPU
    without FP8 tensor cores the worker refuses at build time with the override that turns it off, and the
    driver ends the command in that line (not Ray's traceback: ``worker_user_error``)."""
    import model.fp8
    from pipelines.common.errors import UserError
    from training.config import presets_for
    from training.stages import build_stage

    assert presets_for("4d")["paper"]().fp8 and presets_for("base")["paper"]().fp8
    assert not presets_for("upsampler")["paper"]().fp8
    assert not presets_for("4d")["proof"]().fp8
    cfg = dataclasses.replace(presets_for("base")["tiny"](), fp8=True, use_gpu=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(model.fp8, "fp8_supported", lambda device: False)
    with pytest.raises(UserError, match="A100.*--set fp8=false"):
        build_stage(cfg)
    # What the driver gets back from Ray Train when a worker raised it
    from ray.train import WorkerGroupError
    from training.launch import worker_user_error
    with pytest.raises(UserError) as raised:
        build_stage(cfg)
    failed = WorkerGroupError("Training failed", {0: raised.value, 1: RuntimeError("NCCL timeout")})
    assert str(worker_user_error(failed)) == str(raised.value)
    assert worker_user_error(WorkerGroupError("Training failed", {0: RuntimeError("NCCL timeout")})) is None
    monkeypatch.setattr(model.fp8, "fp8_supported", lambda device: True)
    stage = build_stage(cfg)  # a GPU with FP8: the blocks' token matmuls are switched
    assert any(type(m).__name__ == "Float8Linear" for m in stage.modules())


def test_a_local_store_given_relative_is_made_absolute(tmp_path, monkeypatch) -> None:
    """Training workers log from a folder of their own: a relative SQLite file or store folder (flag or
    MLFLOW_TRACKING_URI) must name the driver's, and servers, URIs and 'none' pass as they are."""
    from pipelines.common.tracking import default_uri
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_uri("sqlite:///runs/mlflow.db", "out") == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert default_uri("sqlite:////abs/mlflow.db", "out") == "sqlite:////abs/mlflow.db"
    assert default_uri("./mlruns", "out") == f"{tmp_path}/mlruns"
    assert default_uri("", "out") == f"sqlite:///{tmp_path}/out/mlflow.db"
    assert default_uri("file:mlruns", "out") == f"file://{tmp_path}/mlruns"
    for uri in ("http://127.0.0.1:5000", "none", "databricks", "file:///abs/mlruns", "sqlite:///:memory:"):
        assert default_uri(uri, "out") == uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///team.db")
    assert default_uri("", "out") == f"sqlite:///{tmp_path}/team.db"


def test_the_paper_preset_compiles_tuned_and_the_stage_passes_it_on(monkeypatch) -> None:
    """compile_tuning (the paper preset's base and 4D stages, measured there) reaches each compiled block as
    model.dit.TUNED_COMPILE's inductor options; off, the blocks compile with torch's defaults."""
    from model.dit import TUNED_COMPILE
    from training.config import presets_for
    from training.stages import build_stage

    assert presets_for("base")["paper"]().compile_tuning and presets_for("4d")["paper"]().compile_tuning
    assert not presets_for("upsampler")["paper"]().compile_tuning
    assert not presets_for("base")["proof"]().compile_tuning
    calls: list[dict] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append(kw))
    cfg = dataclasses.replace(presets_for("base")["tiny"](), compile_blocks=True, compile_tuning=True)
    stage = build_stage(cfg)
    assert len(calls) == len(stage.net.blocks) and all(kw == {"options": TUNED_COMPILE} for kw in calls)
    calls.clear()
    build_stage(dataclasses.replace(cfg, compile_tuning=False))
    assert calls and all(kw == {} for kw in calls)


def test_a_resumed_optimizer_follows_the_config_and_the_schedule_counts_samples() -> None:
    """apply_optim_config: an optimizer and schedule restored from a checkpoint of lr 1e-3, betas (0.9, 0.99),
    weight decay 0 (what DeepSpeed's load_checkpoint brings back) continue with the config's values. resumed_step:
    a checkpoint's samples over this run's samples per step."""
    import dataclasses

    import pytest

    from training.config import presets_for
    from training.loop import apply_optim_config, lr_at, resumed_step

    old_cfg = presets_for("base")["tiny"]()
    new_cfg = dataclasses.replace(old_cfg, optim=dataclasses.replace(old_cfg.optim, lr=old_cfg.optim.lr / 10,
                                                                       beta1=0.8, beta2=0.95, weight_decay=0.1))

    def made(cfg):
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([p], lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                weight_decay=cfg.optim.weight_decay)
        return p, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, cfg))
    p, opt, sched = made(old_cfg)
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    q, opt2, sched2 = made(new_cfg)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["betas"] == (old_cfg.optim.beta1, old_cfg.optim.beta2)  # what a resume brought back
    apply_optim_config(opt2, sched2, new_cfg, 3)
    group = opt2.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["weight_decay"] == 0.1
    assert group["lr"] == pytest.approx(new_cfg.optim.lr * lr_at(3, new_cfg)) == sched2.get_last_lr()[0]
    q.grad = torch.ones(3)
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(new_cfg.optim.lr * lr_at(4, new_cfg))
    sps = new_cfg.samples_per_step
    assert resumed_step({"step": 4, "samples_seen": 4 * sps}, new_cfg) == 4
    assert resumed_step({"step": 8, "samples_seen": 4 * sps}, new_cfg) == 4  # steps of half the size
    assert resumed_step({"step": 2, "samples_seen": 4 * sps}, new_cfg) == 4
    assert resumed_step({"step": 3}, new_cfg) == 3  # a state without the count: its steps


def test_resume_from_is_checked_only_while_the_run_folder_has_no_checkpoint(tmp_path) -> None:
    """--resume-from names where a run starts; once its folder has checkpoints of its own the workers resume from
    those, and the folder given once may be gone (its own run pruned it): a re-run must not be refused for it."""
    import dataclasses

    import pytest

    from pipelines.common.errors import UserError
    from training.config import presets_for
    from training.launch import check_resume_from

    cfg = dataclasses.replace(presets_for("base")["tiny"](), output=str(tmp_path / "out"),
                              resume_from=str(tmp_path / "gone"))
    with pytest.raises(UserError, match=r"--resume-from .*gone does not exist; pass one of a run's"):
        check_resume_from(cfg, tmp_path / "out")
    (tmp_path / "out" / "ray" / cfg.run / "checkpoint_2026-11-25_10-00-00.000000").mkdir(parents=True)
    check_resume_from(cfg, tmp_path / "out")  # its own checkpoint now: nothing to check
