"""Ray Train + DeepSpeed (ZeRO-2, 2 CPU workers, gloo) on tiny presets: every stage, resume, recovery, MLflow."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import mlflow
import pytest
import torch

from pipelines.common.errors import UserError
from pipelines.common.checkpoints import load_checkpoint
from training.config import TrainConfig
from training.launch import run

pytestmark = [pytest.mark.ray, pytest.mark.slow]


from conftest import tiny_train_config as tiny


def _run_record(cfg: TrainConfig):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path(cfg.output).resolve()}/mlflow.db")
    exp = client.get_experiment_by_name(f"4real-{cfg.stage}")
    (run_,) = client.search_runs([exp.experiment_id])
    return client, run_


def _artifacts(client, run_id: str, path: str = "") -> list[str]:
    out = []
    for a in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def test_base_stage_runs_and_is_tracked_in_mlflow(base_run: TrainConfig) -> None:
    ckpt = load_checkpoint(str(Path(base_run.output) / "checkpoint_final"))
    assert ckpt["stage"] == "base" and ckpt["ema"] is True
    client, rec = _run_record(base_run)
    assert rec.info.status == "FINISHED"
    assert rec.data.params["stage"] == "base" and rec.data.params["zero_stage"] == "2"
    assert rec.data.params["data.frames"] == str(base_run.data.frames)
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "samples_seen"):
        assert key in rec.data.metrics, key
    assert any(k.startswith("system/") for k in rec.data.metrics), sorted(rec.data.metrics)
    history = client.get_metric_history(rec.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, base_run.total_steps + 1))
    arts = _artifacts(client, rec.info.run_id)
    assert "final_checkpoint/model.pt" in arts
    assert any(a.startswith("samples/") and a.endswith(".png") for a in arts)
    assert any(a.startswith("samples/") and a.endswith(".mp4") for a in arts)
    assert (Path(base_run.output) / "config.yaml").exists()
    assert "data_wait" in rec.data.metrics
    # the DeepSpeed config the job ran with, the user's extra entry as DeepSpeed read it
    ds = json.loads((Path(base_run.output) / "deepspeed.json").read_text())
    assert ds["config"]["zero_optimization"]["reduce_bucket_size"] == 300000
    assert ds["zero_optimization"]["reduce_bucket_size"] == 300000 and ds["zero_optimization"]["stage"] == 2
    assert "deepspeed.json" in arts


def test_profiled_steps_say_where_a_step_goes(base_run: TrainConfig) -> None:
    """profile_at: rank 0 writes a trace, a kernel table and the host/device time of each phase of a step."""
    out = Path(base_run.output) / "profile"
    table = json.loads((out / "phases_rank0.json").read_text())
    assert table["steps"] == 2 and table["wall_ms_per_step"] > 0
    assert {"data", "forward", "backward", "optimizer", "ema"} <= set(table["phases"]), table["phases"]
    assert all(v["host_ms"] > 0 for v in table["phases"].values())
    # the phases are nested inside the steps: together they cannot exceed the steps' wall time
    assert sum(v["host_ms"] for v in table["phases"].values()) <= table["wall_ms_per_step"] * 1.05
    trace = json.loads((out / "trace_rank0.json").read_text())
    assert any(e.get("name") == "train/forward" for e in trace["traceEvents"])
    assert "aten::" in (out / "kernels_rank0.txt").read_text()
    assert not (out / "phases_rank1.json").exists()  # rank 0 only, unless profile_all_ranks


def test_upsampler_stage_runs(upsampler_run: TrainConfig) -> None:
    ckpt = load_checkpoint(str(Path(upsampler_run.output) / "checkpoint_final"))
    assert ckpt["stage"] == "upsampler"
    _, rec = _run_record(upsampler_run)
    assert rec.info.status == "FINISHED" and "loss" in rec.data.metrics


def test_4d_stage_trains_only_the_sync_layers(base_run: TrainConfig, fourd_run: TrainConfig) -> None:
    base_ckpt = str(Path(base_run.output) / "checkpoint_final")
    four = load_checkpoint(str(Path(fourd_run.output) / "checkpoint_final"))
    base = load_checkpoint(base_ckpt)
    assert four["stage"] == "4d" and four["fourd_config"]["sync"] == "soft"
    sd = four["state_dict"]
    frozen = {k[len("base."):]: v for k, v in sd.items() if k.startswith("base.")}
    assert frozen.keys() == base["state_dict"].keys()
    assert all(torch.equal(frozen[k], base["state_dict"][k]) for k in frozen)  # the base never moved
    sync = {k: v for k, v in sd.items() if not k.startswith("base.")}
    assert sync and any(v.abs().sum() > 0 for v in sync.values())  # zero-initialised layers were trained
    _, rec = _run_record(fourd_run)  # the trainable count per variant is a run parameter
    assert rec.data.params["trainable_parameters"] == str(sum(v.numel() for v in sync.values()))
    assert int(rec.data.params["total_parameters"]) == sum(v.numel() for v in sd.values())


def test_missing_base_checkpoint_fails_before_workers_start(tmp_path: Path, train_grids: Path) -> None:
    from pipelines.common.errors import UserError
    cfg = tiny("4d", tmp_path, [str(train_grids)], base_checkpoint=str(tmp_path / "nope"))
    with pytest.raises(UserError, match="checkpoint .* not found"):
        run(cfg)


def test_relative_paths_reach_the_workers(ray_local, base_run: TrainConfig, train_grids: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train runs each worker in a folder of its own: a base checkpoint and grids given relative to the
    driver's directory must still be found there (they were not, until the driver made them absolute)."""
    (tmp_path / "base").symlink_to(Path(base_run.output) / "checkpoint_final")
    (tmp_path / "grids").symlink_to(train_grids)
    monkeypatch.chdir(tmp_path)
    cfg = tiny("4d", "run", ["grids"], base_checkpoint="base", total_samples=8)
    run(cfg)
    four = load_checkpoint(str(tmp_path / "run" / "checkpoint_final"))
    base = load_checkpoint(str(Path(base_run.output) / "checkpoint_final"))
    assert all(torch.equal(four["state_dict"][f"base.{k}"], v) for k, v in base["state_dict"].items())
    recorded = (tmp_path / "run" / "config.yaml").read_text()
    assert f"{tmp_path}/grids" in recorded and f"{tmp_path}/base" in recorded


def test_a_4d_job_with_an_fp8_base_trains_and_exports_plain_weights(ray_local, base_run: TrainConfig,
                                                                     fourd_run: TrainConfig, train_grids: Path,
                                                                     tmp_path: Path) -> None:
    """fp8=true (the paper preset's 4D default) through the real job on two workers: DeepSpeed wraps blocks
    whose frozen layers carry FP8 copies, the sync layers train, and the export is the plain checkpoint (the
    FP8 copies are not state), so evaluation and generation load it without FP8."""
    cfg = tiny("4d", tmp_path, [str(train_grids)], base_checkpoint=str(Path(base_run.output) / "checkpoint_final"),
               fp8=True)
    assert cfg.num_workers == 2
    run(cfg)
    four = load_checkpoint(str(tmp_path / "checkpoint_final"))
    assert set(four["state_dict"]) == set(load_checkpoint(str(Path(fourd_run.output) / "checkpoint_final"))["state_dict"])
    base = load_checkpoint(str(Path(base_run.output) / "checkpoint_final"))
    assert all(torch.equal(four["state_dict"][f"base.{k}"], v) for k, v in base["state_dict"].items())
    # The same job in full precision (same data, order, noise): its sync layers differ, so FP8 did run (checked
    # when this test was written: with fp8=False in both runs the weights came out identical, diff 0.0); by
    # little, so it trained the same way.
    run(dataclasses.replace(cfg, fp8=False, output=str(tmp_path / "plain")))
    twin = load_checkpoint(str(tmp_path / "plain" / "checkpoint_final"))["state_dict"]
    sync = [k for k in four["state_dict"] if not k.startswith("base.")]
    diff = sum((four["state_dict"][k].float() - twin[k].float()).norm() ** 2 for k in sync) ** 0.5
    size = sum(twin[k].float().norm() ** 2 for k in sync) ** 0.5
    assert 0 < diff < 0.1 * size, (diff, size)


def test_loss_falls_when_overfitting(ray_local, tmp_path: Path, one_grid: Path) -> None:
    cfg = tiny("base", tmp_path, [str(one_grid)], total_samples=480, **{"optim.lr": 3e-3, "optim.warmup_samples": 8,
                                                                           "data.mask_prob": 0.0})
    run(cfg)
    client, rec = _run_record(cfg)
    losses = [m.value for m in sorted(client.get_metric_history(rec.info.run_id, "loss"), key=lambda m: m.step)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)

    # The exported weights (EMA) must carry the training, not sit near the random init.
    from model.dit import DiTConfig, VideoDiT
    from training.data import TrainLoader
    from training.stages import BaseStage
    ckpt = load_checkpoint(str(tmp_path / "checkpoint_final"))
    batch, _ = next(iter(TrainLoader("base", cfg.data, 8)))

    def loss_of(net: VideoDiT) -> float:
        stage = BaseStage(cfg)
        stage.net = net
        with torch.no_grad():
            return float(sum(stage(batch, seed=s)[0] for s in range(8)) / 8)
    torch.manual_seed(cfg.seed)
    init = VideoDiT(DiTConfig(**ckpt["model_config"]))
    trained = VideoDiT(DiTConfig(**ckpt["model_config"]))
    trained.load_state_dict(ckpt["state_dict"])
    assert loss_of(trained) < 0.6 * loss_of(init)


def test_resume_matches_straight_training(ray_local, train_grids: Path, tmp_path: Path) -> None:
    straight = tiny("base", tmp_path / "straight", [str(train_grids)], total_samples=24)
    run(straight)
    halves = tiny("base", tmp_path / "halves", [str(train_grids)], total_samples=24, steps_this_run=3)
    run(halves)
    assert not (Path(halves.output) / "checkpoint_final").exists()
    # Other options into a folder with checkpoints: refused on the driver, the recorded config untouched
    recorded = (Path(halves.output) / "config.yaml").read_text()
    other = dataclasses.replace(halves, optim=dataclasses.replace(halves.optim, lr=halves.optim.lr * 2))
    with pytest.raises(UserError, match=r"other options \(optim.lr .* --force"):
        run(other)
    assert (Path(halves.output) / "config.yaml").read_text() == recorded
    run(halves)  # the same command again continues from the checkpoint: step, data position, LR, EMA
    a = load_checkpoint(str(Path(straight.output) / "checkpoint_final"))["state_dict"]
    b = load_checkpoint(str(Path(halves.output) / "checkpoint_final"))["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    ca, ra = _run_record(straight)
    cb, rb = _run_record(halves)  # one MLflow run continued, not two
    la = [m.value for m in sorted(ca.get_metric_history(ra.info.run_id, "loss"), key=lambda m: m.step)]
    lb = [m.value for m in sorted(cb.get_metric_history(rb.info.run_id, "loss"), key=lambda m: m.step)]
    assert lb == pytest.approx(la, rel=1e-4)
    # --force continues with the new options and keeps the old config beside the new one
    run(dataclasses.replace(other, force=True))
    kept = list(Path(halves.output).glob("config.before-*.yaml"))
    assert len(kept) == 1 and kept[0].read_text() == recorded
    assert f"lr: {other.optim.lr}" in (Path(halves.output) / "config.yaml").read_text()


def test_resume_from_another_folder_logs_a_run_of_its_own_with_its_own_optimizer_settings(
        ray_local, train_grids: Path, tmp_path: Path) -> None:
    """--resume-from a checkpoint of another run folder, with a tenfold learning rate and other betas: the run
    trains to its end and logs to an MLflow run of its own (its store has no run of the checkpoint's; a shared
    server's would have been written into), tagged with the one it came from, and its learning rate is the new
    config's at every step (DeepSpeed restores the saved optimizer's and scheduler's values)."""
    from training.loop import lr_at
    src = tiny("base", tmp_path / "src", [str(train_grids)], total_samples=24, steps_this_run=1, log_every=1)
    run(src)
    from training.launch import checkpoint_dirs
    ckpts = checkpoint_dirs(tmp_path / "src" / "ray" / src.run)
    assert ckpts, list((tmp_path / "src").rglob("*"))[:20]
    src_client, src_rec = _run_record(src)
    # a path that is no checkpoint: one line on the driver, naming the checkpoint there
    with pytest.raises(UserError, match=r"is not a checkpoint of this job .* the latest checkpoint there is .*"
                                        r"checkpoint_"):
        run(tiny("base", tmp_path / "bad", [str(train_grids)], resume_from=str(tmp_path / "src")))
    # a worker dies at the first step, before the new folder has a checkpoint: Ray's retry starts from the source
    # checkpoint again, and logs on to the MLflow run the first attempt made (one run, not two)
    dst = tiny("base", tmp_path / "dst", [str(train_grids)], total_samples=24, log_every=1,
               resume_from=str(ckpts[-1]), fail_at_step=2, max_failures=1,
               **{"optim.lr": src.optim.lr * 10, "optim.beta2": 0.95})
    summary = run(dst)
    assert (tmp_path / "dst" / "_fault_injected").exists()
    assert summary["metrics"]["samples_seen"] == 24
    client, rec = _run_record(dst)
    assert rec.info.run_id != src_rec.info.run_id and rec.data.tags.get("resumed_from_run") == src_rec.info.run_id
    assert rec.info.status == "FINISHED"
    rows = [json.loads(line) for line in (tmp_path / "dst" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, dst.total_steps + 1)), rows
    for r in rows:
        assert r["lr"] == pytest.approx(dst.optim.lr * lr_at(r["step"], dst), rel=1e-6), r
    # the source's run is left as it was: one logged step
    assert len(src_client.get_metric_history(src_rec.info.run_id, "loss")) == 1


def test_stage_0_clips_as_deepspeed_does_and_a_resume_keeps_its_checkpoints_stage(ray_local, train_grids: Path,
                                                                                   tmp_path: Path) -> None:
    """At ZeRO stage 0 the loop clips on the device (clip_on_device), DeepSpeed's clipping off. With clipping
    active every step: two workers accumulating two micro-batches train the same weights as DeepSpeed's ZeRO-2
    clipping does; one worker (ZeRO-2 asked, stage 0 run, no all-reduce) the same as DeepSpeed's ZeRO-3 on one
    worker. A one-worker checkpoint continued on two workers (where the config's stage 2 would run) stays at
    stage 0: DeepSpeed cannot load one stage's optimizer state into another."""
    def trained(name: str, **kw) -> dict:
        cfg = tiny("base", tmp_path / name, [str(train_grids)], **{"optim.grad_clip": 0.02, **kw})
        run(cfg)
        return load_checkpoint(str(tmp_path / name / "checkpoint_final"))["state_dict"]

    def same(a: dict, b: dict) -> None:
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)

    def ran_at(name: str) -> int:
        return json.loads((tmp_path / name / "deepspeed.json").read_text())["zero_optimization"]["stage"]

    same(trained("own", zero_stage=0, grad_accum=2, total_samples=24),
         trained("ds", zero_stage=2, grad_accum=2, total_samples=24))
    client, rec = _run_record(tiny("base", tmp_path / "own", []))
    norms = [m.value for m in client.get_metric_history(rec.info.run_id, "grad_norm")]
    assert len(norms) == 3 and min(norms) > 0.02  # clipping acted at every step
    assert json.loads((tmp_path / "own" / "deepspeed.json").read_text())["config"]["gradient_clipping"] == 0.0
    same(trained("one", num_workers=1, zero_stage=2, total_samples=8),
         trained("one_z3", num_workers=1, zero_stage=3, total_samples=8))
    assert (ran_at("one"), ran_at("one_z3")) == (0, 3)

    part = tiny("base", tmp_path / "part", [str(train_grids)], num_workers=1, steps_this_run=2, total_samples=8)
    run(part)
    two = dataclasses.replace(part, num_workers=2, steps_this_run=0, force=True)
    assert two.zero_stage_run == 2
    # twice the samples a step: the checkpoint's 2 steps are 1 here, and the run goes on to its 8 samples
    assert two.samples_per_step == 2 * part.samples_per_step and part.total_samples == 2 * two.samples_per_step
    summary = run(two)
    assert ran_at("part") == 0 and (tmp_path / "part" / "checkpoint_final").exists()
    assert summary["metrics"]["samples_seen"] == part.total_samples


def test_a_run_whose_gradients_stay_non_finite_stops_and_says_why(ray_local, train_grids: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A diverged run: a learning rate of 1e30 makes the first update so large that every later forward overflows,
    so every later gradient norm is NaN and its update skipped; the model no longer learns while the job would run
    on. It stops after optim.max_nonfinite_steps such steps in a row with the reason, its metrics counting them.
    Ray Train's retry (max_failures 1, the default) then stops at once instead of skipping as many steps again,
    the same command run again is refused before any worker starts, and a re-run with a higher limit goes on. One
    worker (ZeRO stage 0, the loop's own clipping) and two (DeepSpeed's ZeRO-2 and its norm)."""
    from training.loop import NONFINITE_STOP
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        runs[workers] = cfg = tiny("base", out, [str(train_grids)], num_workers=workers, total_samples=64,
                                   log_every=1, checkpoint_every=0,
                                   **{"optim.lr": 1e30, "optim.max_nonfinite_steps": 3})
        assert cfg.max_failures == 1
        with pytest.raises(UserError, match=r"3 optimizer steps in a row, by step 4, had a non-finite gradient "
                                            r"norm .* \(an earlier attempt stopped at step 4, and the same run is "
                                            r"not retried"):
            run(cfg)
        rows = [json.loads(line) for f in sorted(out.glob("metrics*.jsonl")) for line in f.read_text().splitlines()]
        assert [r["nonfinite_steps"] for r in rows] == [0, 1, 1, 1], workers  # the retry trained no step
        assert math.isfinite(rows[0]["grad_norm"]) and not any(math.isfinite(r["grad_norm"]) for r in rows[1:])
        assert json.loads((out / NONFINITE_STOP).read_text())["streak"] == 3
        assert json.loads((out / NONFINITE_STOP).read_text())["run"] == "base-test"  # conftest.tiny's run name
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out.resolve()}/mlflow.db")
        statuses = [r.info.status for r in client.search_runs([client.get_experiment_by_name("4real-base").experiment_id])]
        assert "FAILED" in statuses and "RUNNING" not in statuses, statuses
    with monkeypatch.context() as m:  # the same command again: refused on the driver, Ray is not even started
        m.setattr("pipelines.common.job.init_ray", lambda *a, **k: pytest.fail("the refused re-run started Ray"))
        with pytest.raises(UserError, match=r"an earlier attempt stopped at step 4, and the same run is not retried"):
            run(runs[1])
    higher = dataclasses.replace(runs[1], max_failures=0, optim=dataclasses.replace(runs[1].optim, max_nonfinite_steps=5))
    with pytest.raises(UserError, match=r"5 optimizer steps in a row, by step 6,"):
        run(higher)  # the record of the stop is dropped, the run goes on (from step 1: no checkpoint was written)
    assert json.loads((tmp_path / "w1" / NONFINITE_STOP).read_text())["streak"] == 5  # this run's stop, recorded


def test_killed_worker_is_recovered_from_checkpoint(ray_local, train_grids: Path, tmp_path: Path) -> None:
    cfg = tiny("base", tmp_path, [str(train_grids)], total_samples=24, checkpoint_every=2, fail_at_step=3,
               max_failures=1)
    summary = run(cfg)
    assert (tmp_path / "_fault_injected").exists()  # rank 1 really died once
    assert Path(summary["final_checkpoint"]).exists()
    client, rec = _run_record(cfg)
    steps = sorted({m.step for m in client.get_metric_history(rec.info.run_id, "samples_seen")})
    assert steps[-1] == cfg.total_steps
    assert summary["metrics"]["samples_seen"] == cfg.total_steps * cfg.samples_per_step
    # the resumed attempt repeats the step the dead one had logged: each step is in the history once
    history = [m.step for m in client.get_metric_history(rec.info.run_id, "loss")]
    assert sorted(history) == sorted(set(history)) and max(history) == cfg.total_steps
    jsonl = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert jsonl == sorted(set(jsonl))


def test_a_step_out_of_gpu_memory_ends_in_one_error_saying_what_to_change(ray_local, train_grids: Path,
                                                                          tmp_path: Path) -> None:
    """torch's out-of-memory error in a step (simulated on CPU by fail_kind=oom, raised where a real one is: in the
    forward, on every rank) ends the job in one UserError that names the change keeping the samples per step."""
    cfg = tiny("base", tmp_path, [str(train_grids)], total_samples=24, fail_at_step=2, fail_kind="oom",
               max_failures=0, log_every=1)
    assert cfg.batch_size == 2 and cfg.grad_accum == 1 and cfg.num_workers == 2
    with pytest.raises(UserError) as err:
        run(cfg)
    msg = str(err.value)
    assert msg.startswith("the base stage ran out of GPU memory at step 2 on cpu: 2 4-frame clips at 16x16"), msg
    assert "--set batch_size=1 --set grad_accum=2 (the same 4 samples per optimizer step over the 2 workers" in msg, msg
    assert "--set activation_checkpointing=true" in msg and "only with --force" in msg, msg
    # torch's own message, cut at a sentence's end
    assert msg.endswith("torch: CUDA out of memory. Tried to allocate 2.00 GiB (fail_kind=oom: simulated). GPU 0 has "
                        "a total capacity of 79.18 GiB."), msg
    assert "\n" not in msg  # one line, not Ray's traceback
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]  # step 1 ran and was logged; step 2 failed


def test_out_of_memory_advice_follows_the_config(tmp_path: Path) -> None:
    from training.loop import out_of_memory
    cfg = tiny("4d", tmp_path, [], batch_size=6, grad_accum=3, activation_checkpointing=True, total_samples=72)
    long = "CUDA out of memory. Tried to allocate 2 GiB. " + "x" * 400 + ". Cut here."
    msg = str(out_of_memory(cfg, torch.device("cpu"), 7, long))
    assert f"at step 7 on cpu: 6 {cfg.data.views} x {cfg.data.frames} grids" in msg, msg
    assert "--set batch_size=3 --set grad_accum=6 (the same 36 samples" in msg, msg
    assert "activation checkpointing on" in msg and "--set activation_checkpointing" not in msg, msg
    assert msg.endswith("with --force). torch: CUDA out of memory. Tried to allocate 2 GiB."), msg
    one = tiny("base", tmp_path, [], batch_size=1, activation_checkpointing=True)
    assert "smaller frames or fewer of them" in str(out_of_memory(one, torch.device("cpu"), 1))
    odd = tiny("base", tmp_path, [], batch_size=9, total_samples=18)
    assert "--set batch_size=3 --set grad_accum=3 (the same 18 samples" in str(out_of_memory(odd, torch.device("cpu"), 1))


def test_a_resume_with_tracking_off_keeps_its_loss_history(ray_local, train_grids: Path, tmp_path: Path) -> None:
    """--mlflow-uri none (the proof recipe's setting): a run continued from its checkpoint is a resume, not a
    restart; metrics.jsonl keeps the first half and gets the rest, each step once."""
    cfg = tiny("base", tmp_path, [str(train_grids)], total_samples=24, steps_this_run=3, mlflow_uri="none",
               log_every=1)
    run(cfg)
    run(cfg)
    assert not list(tmp_path.glob("metrics.attempt-*.jsonl"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, cfg.total_steps + 1))


def test_a_restart_without_checkpoint_is_said_and_dead_runs_are_closed(ray_local, train_grids: Path,
                                                                       tmp_path: Path) -> None:
    """An attempt killed before its first checkpoint: the next one starts at step 1 in a new MLflow run, the
    dead attempt's run is KILLED and its metrics are kept aside. A job that dies for good leaves FAILED."""
    cfg = tiny("base", tmp_path / "restart", [str(train_grids)], total_samples=24, checkpoint_every=0,
               fail_at_step=3, max_failures=1, log_every=1)
    run(cfg)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path(cfg.output).resolve()}/mlflow.db")
    exp = client.get_experiment_by_name("4real-base")
    runs = sorted(client.search_runs([exp.experiment_id]), key=lambda r: r.info.start_time)
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]
    assert len(list(Path(cfg.output).glob("metrics.attempt-*.jsonl"))) == 1
    steps = [json.loads(line)["step"] for line in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 1 and steps[-1] == cfg.total_steps

    dies = tiny("base", tmp_path / "dies", [str(train_grids)], total_samples=24, checkpoint_every=0,
                fail_at_step=3, max_failures=0, log_every=1)
    with pytest.raises(Exception):
        run(dies)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path(dies.output).resolve()}/mlflow.db")
    (rec,) = client.search_runs([client.get_experiment_by_name("4real-base").experiment_id])
    assert rec.info.status == "FAILED"


def test_zero3_checkpointing_accumulation_and_base_from_mlflow(ray_local, base_run: TrainConfig, train_grids: Path,
                                                              tmp_path: Path) -> None:
    """ZeRO-3 (gathered EMA and export), bf16 autocast (the GPU precision path, here on CPU), activation
    checkpointing, gradient accumulation, and a 4D run whose base comes from the base stage's MLflow run."""
    _, rec = _run_record(base_run)
    cfg = tiny("4d", tmp_path, [str(train_grids)], base_checkpoint=f"runs:/{rec.info.run_id}", zero_stage=3,
               activation_checkpointing=True, grad_accum=2, total_samples=16, precision="bf16",
               mlflow_uri=f"sqlite:///{Path(base_run.output).resolve()}/mlflow.db", sync="hard")
    run(cfg)
    four = load_checkpoint(str(tmp_path / "checkpoint_final"))
    base = load_checkpoint(str(Path(base_run.output) / "checkpoint_final"))
    assert four["fourd_config"]["sync"] == "hard"
    assert all(torch.equal(four["state_dict"][f"base.{k}"], v) for k, v in base["state_dict"].items())
    hard = {k: v for k, v in four["state_dict"].items() if not k.startswith("base.")}
    assert hard and all(v.numel() > 0 for v in hard.values())  # gathered from ZeRO-3 partitions, not empty


def test_second_phase_starts_from_4d_weights_not_its_data_position(ray_local, fourd_run: TrainConfig,
                                                                   train_grids: Path, tmp_path: Path) -> None:
    """Section 4.1's recipe: pseudo-4D, then a fine-tune from that 4D checkpoint (weights only)."""
    from pipelines.common.errors import UserError
    phase1 = str(Path(fourd_run.output) / "checkpoint_final")
    with pytest.raises(UserError, match="trained with sync 'soft', this run trains 'hard'"):
        run(tiny("4d", tmp_path / "wrong", [str(train_grids)], init_from=phase1, sync="hard"))
    # lr 0: the exported sync weights must be exactly phase 1's, so they were taken over
    cfg = tiny("4d", tmp_path / "p2", [str(train_grids)], init_from=phase1, total_samples=8,
               **{"optim.lr": 0.0})
    summary = run(cfg)
    first = load_checkpoint(phase1)
    second = load_checkpoint(str(Path(cfg.output) / "checkpoint_final"))
    for k, v in first["state_dict"].items():
        assert torch.equal(second["state_dict"][k], v), k
    assert summary["metrics"]["samples_seen"] == cfg.total_samples  # its own schedule from step 0
    items = set(second["data_items"]["items"])
    assert items and items >= set(first["data_items"]["items"])


def test_activation_checkpointing_reaches_the_base_model(tmp_path: Path) -> None:
    from training.stages import BaseStage
    for flag in (True, False):
        stage = BaseStage(tiny("base", tmp_path, ["unused"], activation_checkpointing=flag))
        assert stage.net.cfg.checkpointing is flag  # the model reads its own copy of the config


def test_a_base_continues_from_base_weights_with_its_own_schedule(ray_local, base_run: TrainConfig,
                                                                   fourd_run: TrainConfig, train_grids: Path,
                                                                   tmp_path: Path) -> None:
    """--init-from on the base stage: a pretrained (or shorter) base trained further, weights only."""
    from pipelines.common.errors import UserError
    first_path = str(Path(base_run.output) / "checkpoint_final")
    with pytest.raises(UserError, match="holds a '4d' model; the base stage continues a base-stage checkpoint"):
        run(tiny("base", tmp_path / "wrong", [str(train_grids)], init_from=str(Path(fourd_run.output) /
                                                                                "checkpoint_final")))
    with pytest.raises(UserError, match="drop the model overrides"):
        run(tiny("base", tmp_path / "wrong2", [str(train_grids)], init_from=first_path, model={"depth": 3}))
    with pytest.raises(UserError, match="the upsampler stage cannot start from one"):
        run(tiny("upsampler", tmp_path / "wrong3", [str(train_grids)], init_from=first_path))
    # lr 0: the exported weights must be exactly the first run's, so they were taken over
    cfg = tiny("base", tmp_path / "more", [str(train_grids)], init_from=first_path, total_samples=8,
               **{"optim.lr": 0.0})
    summary = run(cfg)
    first = load_checkpoint(first_path)
    second = load_checkpoint(str(Path(cfg.output) / "checkpoint_final"))
    assert second["model_config"] == first["model_config"]
    for k, v in first["state_dict"].items():
        assert torch.equal(second["state_dict"][k], v), k
    assert summary["metrics"]["samples_seen"] == cfg.total_samples  # its own schedule from step 0
    assert set(second["data_items"]["items"]) >= set(first["data_items"]["items"])


def test_flow_shift_reaches_base_and_4d_training_and_generation(tmp_path: Path) -> None:
    """The model's noise-level shift is drawn in training (base and 4D stage, which inherits the base's) and
    sampled with in generation, from the checkpoint (run 4 of docs/results.md: without it the proof base
    sampled garbage from pure noise)."""
    from pipelines.generation import GenerateConfig, Generator4D
    from pipelines.common.checkpoints import save_checkpoint
    from training.stages import BaseStage, FourDStage

    clips = {"x": torch.zeros(256, 4, 3, 8, 8), "mask": torch.zeros(256, 4), "context": torch.zeros(256, dtype=torch.long)}
    t_mean = {}
    for shift in (1.0, 3.0):
        stage = BaseStage(tiny("base", tmp_path / "b", [], model={"flow_shift": shift}))
        assert stage.net.cfg.flow_shift == shift
        t_mean[shift] = float(stage(clips, seed=0)[1]["t_mean"])
        ckpt = save_checkpoint(tmp_path / f"base{shift}", {"stage": "base", "ema": True, "state_dict":
                                                           stage.net.state_dict(), "model_config":
                                                           dataclasses.asdict(stage.net.cfg)})
    assert t_mean[3.0] > t_mean[1.0] + 0.1, t_mean
    grids = {"x": torch.zeros(64, 3, 4, 3, 8, 8), "mask": torch.zeros(64, 3, 4)}
    four = FourDStage(tiny("4d", tmp_path / "f", [], base_checkpoint=str(ckpt.parent)))
    plain = FourDStage(tiny("4d", tmp_path / "f1", [], base_checkpoint=str(tmp_path / "base1.0")))
    assert float(four(grids, seed=0)[1]["t_mean"]) > float(plain(grids, seed=0)[1]["t_mean"]) + 0.1
    # generation takes the checkpoint's shift, --shift overrides it, and a checkpoint from before the field
    # (no flow_shift in its model_config) samples as it was trained: unshifted
    gen = GenerateConfig(checkpoint=str(ckpt.parent), sync="train_free_soft", device="cpu")
    assert Generator4D(gen).shift == 3.0
    assert Generator4D(dataclasses.replace(gen, shift=2.0)).shift == 2.0
    legacy = load_checkpoint(str(ckpt.parent))
    del legacy["model_config"]["flow_shift"]
    save_checkpoint(tmp_path / "legacy", legacy)
    assert Generator4D(dataclasses.replace(gen, checkpoint=str(tmp_path / "legacy"))).shift == 1.0
