"""The proof recipe's mechanics, fast: job lanes, a carried-in base, the phase-2 schedule flags."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipelines.common.errors import UserError
from training.recipes import proof
from training.recipes.proof import ProofConfig


def test_a_lane_runs_its_commands_in_order_beside_other_jobs(tmp_path: Path) -> None:
    cfg = ProofConfig(out=str(tmp_path))
    marks = tmp_path / "marks"
    write = "import sys, time; time.sleep({}); open(sys.argv[1], 'a').write('{}\\n')"
    proof._jobs(cfg, {
        "lane": [["-c", write.format(0.5, "first"), str(marks)], ["-c", write.format(0, "second"), str(marks)]],
        "single": ["-c", write.format(0, "single"), str(marks)],
    })
    lines = marks.read_text().split()
    assert lines.index("first") < lines.index("second") and "single" in lines  # the lane kept its order
    log = (tmp_path / "logs" / "lane.log").read_text()
    assert log.count("$ -c") == 2  # both commands logged in the lane's one log


def test_a_background_lane_runs_beside_the_next_step_until_a_step_drains_it(tmp_path: Path) -> None:
    """The upsampler's lane: phase 1 returns when its 4D jobs end, and the export waits for the lane."""
    cfg = ProofConfig(out=str(tmp_path))
    marks = tmp_path / "marks"
    write = "import sys, time; time.sleep({}); open(sys.argv[1], 'a').write('{}\\n')"
    proof._jobs(cfg, {"slow": ["-c", write.format(8, "slow"), str(marks)],
                      "fast": ["-c", write.format(0, "fast"), str(marks)]}, background=("slow",))
    assert marks.read_text().split() == ["fast"] and "slow" in proof._LANES  # returned with the lane running
    proof._jobs(cfg, {"next": ["-c", write.format(0, "next"), str(marks)]})  # a later step's jobs run beside it
    assert marks.read_text().split() == ["fast", "next"]
    proof._drain(cfg)
    assert marks.read_text().split() == ["fast", "next", "slow"] and not proof._LANES
    # a background lane that fails is reported by whichever step is polling, named as such
    proof._jobs(cfg, {"bad": ["-c", "import time, sys; time.sleep(3); sys.exit(3)"]}, background=("bad",))
    with pytest.raises(UserError, match=r"bad \(background lane of an earlier step\)"):
        proof._jobs(cfg, {"ok": ["-c", write.format(5, "ok"), str(marks)]})
    # run one after another, nothing is left behind
    proof._jobs(ProofConfig(out=str(tmp_path), parallel=False),
                {"slow2": ["-c", write.format(1, "slow2"), str(marks)]}, background=("slow2",))
    assert marks.read_text().split()[-1] == "slow2" and not proof._LANES


def test_a_failing_step_still_waits_for_a_background_lane(tmp_path: Path, monkeypatch) -> None:
    """Run 6: a phase-2 job failed while the upsampler's lane ran; the recipe must not exit and orphan it."""
    marks = tmp_path / "marks"
    write = "import sys, time; time.sleep(4); open(sys.argv[1], 'a').write('lane\\n')"

    def start_lane(cfg: ProofConfig) -> None:
        proof._jobs(cfg, {"lane": ["-c", write, str(marks)]}, background=("lane",))

    def fail(cfg: ProofConfig) -> None:
        raise UserError("phase 2 failed")

    monkeypatch.setattr(proof, "STEPS", {"start": start_lane, "fail": fail})
    with pytest.raises(UserError, match="phase 2 failed"):
        proof.main(["--out", str(tmp_path / "run"), "--steps", "start,fail"])
    assert marks.read_text().split() == ["lane"] and not proof._LANES


def test_a_failed_command_ends_its_lane_and_the_step_names_it(tmp_path: Path) -> None:
    cfg = ProofConfig(out=str(tmp_path))
    never = tmp_path / "never"
    with pytest.raises(UserError, match="lane: error: broken data"):
        proof._jobs(cfg, {"lane": [["-c", "import sys; print('error: broken data'); sys.exit(3)"],
                                   ["-c", f"open({str(never)!r}, 'w')"]]})
    assert not never.exists()


def test_a_carried_base_replaces_the_base_step(tmp_path: Path, capsys) -> None:
    cfg = ProofConfig(out=str(tmp_path), base_from="weights/proof/base.pt.gz")
    proof.step_base(cfg)  # would start a training job without base_from
    assert "taken from weights/proof/base.pt.gz" in capsys.readouterr().out
    assert not (tmp_path / "base").exists() and not (tmp_path / "logs").exists()
    assert proof._base(cfg) == "weights/proof/base.pt.gz"
    assert proof._base(ProofConfig(out=str(tmp_path))) == str(tmp_path / "base" / "checkpoint_final")


def test_a_carried_upsampler_replaces_its_training_everywhere(tmp_path: Path, monkeypatch) -> None:
    seen: dict = {}
    monkeypatch.setattr(proof, "_jobs", lambda cfg, jobs, **kw: seen.update(jobs))
    cfg = ProofConfig(out=str(tmp_path), base_from="b.pt", upsampler_from="weights/proof/upsampler.pt.gz")
    proof.step_phase1(cfg)
    assert "upsampler" not in seen and {"4d_soft_p1", "4d_hard_p1", "4d_sequential_p1"} <= set(seen)
    assert "upsampler_heldout" in seen  # its held-out clips are still made for the evaluation
    seen.clear()
    proof.step_eval(cfg)
    scoring = seen["eval_upsampler"][-1]  # the lane's last command (after its data, when that is missing)
    assert scoring[scoring.index("--checkpoint") + 1] == cfg.upsampler_from
    assert seen["generate_x4"][seen["generate_x4"].index("--upsampler") + 1] == cfg.upsampler_from
    seen.clear()
    proof.step_phase1(ProofConfig(out=str(tmp_path), base_from="b.pt"))
    assert "upsampler" in seen and "upsampler_heldout" not in seen  # trained: its lane makes both sets


def test_phase_two_schedule_defaults_and_flags(tmp_path: Path, monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr(proof, "_jobs", lambda cfg, jobs, **kw: seen.update(jobs))
    proof.step_phase2(ProofConfig(out=str(tmp_path)))
    cmd = seen["4d_soft_p2"]
    # renders and pseudo-4D half and half, the renders' part a quarter of the preset's 9,600 grids
    assert cmd[cmd.index("--total-samples") + 1] == "4800"
    assert cmd[cmd.index("--data.weights") + 1] == "0.5,0.5"
    grids = cmd[cmd.index("--data.grids") + 1].split(",")
    assert [Path(g).name for g in grids] == ["render", "pseudo4d"]
    seen.clear()
    proof.step_phase2(ProofConfig(out=str(tmp_path), render_assets=168))  # run 6: three folders of 56 assets
    cmd = seen["4d_soft_p2"]
    assert cmd[cmd.index("--data.weights") + 1] == "0.166667,0.166667,0.166667,0.5"
    grids = cmd[cmd.index("--data.grids") + 1].split(",")
    assert [Path(g).name for g in grids] == ["render", "render_p1", "render_p2", "pseudo4d"]
    seen.clear()
    proof.step_phase2(ProofConfig(out=str(tmp_path), render_assets=70))  # a short last part weighs less
    cmd = seen["4d_hard_p2"]
    assert cmd[cmd.index("--data.weights") + 1] == "0.4,0.1,0.5"
    assert proof.render_parts(ProofConfig(render_assets=70)) == {"render": (0, 56), "render_p1": (56, 14)}
    assert "--optim.lr" not in cmd  # phase 1's learning rate
    seen.clear()
    proof.step_phase2(ProofConfig(out=str(tmp_path), phase2_pseudo_share=0.0))  # the paper's: renders alone
    cmd = seen["4d_hard_p2"]
    assert cmd[cmd.index("--total-samples") + 1] == "2400" and cmd[cmd.index("--data.weights") + 1] == "1"
    assert [Path(g).name for g in cmd[cmd.index("--data.grids") + 1].split(",")] == ["render"]
    with pytest.raises(UserError, match="phase2-pseudo-share"):
        proof.main(["--out", str(tmp_path / "x"), "--phase2-pseudo-share", "1"])
    seen.clear()
    proof.step_phase2(ProofConfig(out=str(tmp_path), phase2_samples=1440, phase2_lr=1e-4))
    for name in ("4d_soft_p2", "4d_hard_p2", "4d_sequential_p2", "4d_soft_pseudo_only"):
        cmd = seen[name]
        assert cmd[cmd.index("--total-samples") + 1] == "1440" and cmd[cmd.index("--optim.lr") + 1] == "0.0001"
    assert "pseudo4d" in seen["4d_soft_pseudo_only"][seen["4d_soft_pseudo_only"].index("--data.grids") + 1]


def test_figures_from_a_run_folder(tmp_path: Path) -> None:
    import json

    import numpy as np
    from PIL import Image

    from training.recipes import proof_figures
    run = tmp_path / "run"
    (run / "base").mkdir(parents=True)
    rows = [{"step": s, "loss": 1.0 / s, "samples_seen": 64.0 * s} for s in range(1, 40)]
    rows.insert(5, {"step": 3, "loss": 9.0, "samples_seen": 192.0})  # a resumed run logs step 3 again
    rows.append({"step": 39, "system/cpu": 1.0})  # rows without a loss are skipped
    # a killed run's last line can be cut short mid-write
    (run / "base" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 40, "lo')
    x, y = proof_figures.read_losses(run / "base" / "metrics.jsonl")
    assert len(x) == 39 and y[2] == 9.0 and x[-1] == 64 * 39  # one point per step, the last logged value
    (run / "eval").mkdir()
    truth, filled = np.zeros((40, 60, 3), np.uint8), np.full((40, 60, 3), 255, np.uint8)
    for variant in ("soft", "copy_first_row"):
        Image.fromarray(np.concatenate([truth, filled])).save(run / "eval" / f"render__{variant}_grid0.png")
    assert proof_figures.main(["--run", str(run), "--out", str(tmp_path / "figs")]) == 0
    sheet = np.asarray(Image.open(tmp_path / "figs" / "proof_render_variants.png"))
    assert sheet.shape[1] == 3 * (270 + 8)  # truth, soft, copy first row
    assert (tmp_path / "figs" / "proof_loss_curves.png").stat().st_size > 10_000
    assert proof_figures.main(["--run", str(tmp_path / "missing")]) == 2


def test_samplers_are_parsed_and_bad_ones_refused() -> None:
    assert proof.parse_sampler("heun:20") == {"method": "heun", "steps": 20, "shift": 0.0}
    assert proof.parse_sampler("euler:50:2") == {"method": "euler", "steps": 50, "shift": 2.0}
    for bad in ("heun", "rk4:20", "euler:0", "euler:x", "euler:20:-1", "euler:20:1:3", "euler:20:nan", "euler:20:inf"):
        with pytest.raises(UserError, match="must read method:steps"):
            proof.parse_sampler(bad)


def test_evaluation_uses_the_chosen_sampler_and_shipped_weights(tmp_path: Path, monkeypatch) -> None:
    cfg = ProofConfig(out=str(tmp_path), variants_from="weights/proof", eval_sampler="euler:20")
    assert proof.chosen_sampler(cfg) == ("euler:20", {"method": "euler", "steps": 20, "shift": 0.0})
    (tmp_path / "sampler").mkdir()
    inputs = proof._sampler_inputs(cfg)
    (tmp_path / "sampler" / "choice.json").write_text(json.dumps({"sampler": "heun:50", "scores": {},
                                                                  "inputs": inputs}))
    assert proof.chosen_sampler(cfg)[0] == "heun:50"
    # a choice made for other variants or candidates is stale: the configured sampler is used instead
    other = ProofConfig(out=str(tmp_path), variants_from="elsewhere", eval_sampler="euler:20")
    assert proof.chosen_sampler(other)[0] == "euler:20"
    assert proof.chosen_sampler(dataclasses.replace(cfg, samplers=["euler:20"]))[0] == "euler:20"
    assert proof.variants(cfg)["soft"] == Path("weights/proof/soft.pt.gz")
    seen = {}
    monkeypatch.setattr(proof, "_jobs", lambda c, jobs, **kw: seen.update(jobs))
    proof.step_eval(cfg)
    ev = seen["eval"]
    assert ev[ev.index("--method") + 1] == "heun" and ev[ev.index("--steps") + 1] == "50"
    assert "soft=weights/proof/soft.pt.gz" in ev[ev.index("--checkpoints") + 1]
    gen = seen["generate_x4"]
    assert gen[gen.index("--method") + 1] == "heun" and gen[gen.index("--steps") + 1] == "50"
    # no upsampler data yet (phase 1 skipped): the evaluation lane makes its held-out clips first
    lane = seen["eval_upsampler"]
    assert "pipelines/make_pseudo4d.py" in lane[0] and "training.recipes.upsampler_eval" in lane[1]
