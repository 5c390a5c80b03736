"""The proof recipe end to end at tiny size on CPU: every step through the real jobs, then a re-run that
skips what is done. (Its proof-size presets are built and stepped in tests/test_presets.py.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_tiny_recipe_runs_every_step_and_continues(tmp_path: Path, capsys) -> None:
    from pipelines.common.checkpoints import load_checkpoint
    from training.recipes.proof import STEPS, main, variants, ProofConfig

    out = tmp_path / "proof"
    assert main(["--preset", "tiny", "--out", str(out)]) == 0
    for name in ("render", "render_heldout", "render_val", "pseudo4d", "pseudo4d_heldout", "pseudo4d_val",
                 "upsampler", "upsampler_heldout"):
        assert (out / "data" / name / "summary.json").is_file(), name
    # the base saw both contexts and both sources, and says so in its metrics
    metrics = [json.loads(line) for line in (out / "base" / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    assert 0 < last["data_context_freeze_time_share"] < 1
    assert last["data_source0_share"] > 0 and last["data_source1_share"] > 0
    # phase 2 continued from phase 1 (its items include phase 1's) and fine-tuned on renders
    cfg = ProofConfig(out=str(out))
    base_items = set(load_checkpoint(str(out / "base" / "checkpoint_final"))["data_items"]["items"])
    assert any(i.startswith("proc-") for i in base_items) and any(i.startswith("procedural-") for i in base_items)
    for name, ckpt in variants(cfg).items():
        c = load_checkpoint(str(ckpt))
        assert c["stage"] == "4d", name
        items = set(c["data_items"]["items"])
        assert items >= base_items and not any(i.startswith("proc-1000") for i in items), name  # held out
    # the sampler was chosen on the validation sets among the candidates, and evaluation used it
    choice = json.loads((out / "sampler" / "choice.json").read_text())
    assert set(choice["scores"]) == {"euler:1", "euler:2"} and choice["sampler"] in choice["scores"]
    assert choice["scores"][choice["sampler"]]["mean"] == max(s["mean"] for s in choice["scores"].values())
    val = json.loads((out / "sampler" / "euler_1" / "results.json").read_text())
    assert set(val["results"]["render"]) == {"soft", "hard", "sequential", "copy_first_row", "copy_first_column"}
    assert not set(val["sets"]["render"]["items"]) & set(json.loads((out / "eval" / "results.json").read_text())
                                                         ["sets"]["render"]["items"])  # not the held-out assets
    method, steps = choice["sampler"].split(":")
    used = (out / "eval" / "config.yaml").read_text()
    assert f"steps: {steps}\n" in used and f"method: {method}\n" in used
    # evaluation: both held-out sets, trained + training-free variants + copy baselines
    results = json.loads((out / "eval" / "results.json").read_text())["results"]
    assert set(results) == {"render", "pseudo4d"}
    want = {"soft", "hard", "sequential", "soft_pseudo_only", "train_free_hard", "train_free_soft",
            "train_free_sequential", "copy_first_row", "copy_first_column"}
    assert set(results["render"]) == want and set(results["pseudo4d"]) == want
    up = json.loads((out / "eval_upsampler" / "results.json").read_text())
    assert up["frames"] > 0 and up["upsampler"]["psnr"]["mean"] == up["upsampler"]["psnr"]["mean"]  # not NaN
    assert (out / "generated_x4" / "contact_sheet.png").is_file()
    # slim weights: one base, sync layers only per variant, loadable as whole 4D models
    sizes = json.loads((out / "weights" / "sizes.json").read_text())
    assert set(sizes) == {"base", "soft", "hard", "sequential", "soft_pseudo_only", "upsampler"}
    import gzip
    import io
    soft = torch.load(io.BytesIO(gzip.decompress((out / "weights" / "soft.pt.gz").read_bytes())), weights_only=False)
    assert soft["base_ref"] == "base.pt.gz" and not any(k.startswith("base.") for k in soft["state_dict"])
    full = load_checkpoint(str(out / "weights" / "soft.pt.gz"))
    assert any(k.startswith("base.") for k in full["state_dict"])
    # the same command again skips every finished step
    t0 = time.time()
    capsys.readouterr()
    assert main(["--preset", "tiny", "--out", str(out), "--steps", "base,phase1,phase2"]) == 0
    assert "started" not in capsys.readouterr().out and time.time() - t0 < 30
    assert list(STEPS)[:2] == ["renders", "pseudo4d"]
