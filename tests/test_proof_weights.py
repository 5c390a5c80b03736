"""The proof run's shipped weights: they load, fit the size budget, generate, and reproduce the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights" / "proof"


def test_shipped_weights_load_and_fit_the_budget() -> None:
    from pipelines.common.checkpoints import load_checkpoint
    files = sorted(WEIGHTS.glob("*.pt.gz"))
    assert {f.name for f in files} == {"base.pt.gz", "soft.pt.gz", "hard.pt.gz", "sequential.pt.gz",
                                       "soft_pseudo_only.pt.gz", "upsampler.pt.gz"}
    assert sum(f.stat().st_size for f in files) <= 25e6
    base = load_checkpoint(str(WEIGHTS / "base.pt.gz"))
    for name in ("soft", "hard", "sequential", "soft_pseudo_only"):
        c = load_checkpoint(str(WEIGHTS / f"{name}.pt.gz"))
        assert c["stage"] == "4d" and c["fourd_config"]["sync"] == name.replace("_pseudo_only", "")
        for k, v in base["state_dict"].items():  # the shared base is put back exactly
            assert torch.equal(c["state_dict"][f"base.{k}"], v), (name, k)
        assert c["data_items"]["items"]  # what it was trained on, for evaluation's refusal
    assert load_checkpoint(str(WEIGHTS / "upsampler.pt.gz"))["stage"] == "upsampler"


@pytest.mark.slow
def test_shipped_soft_model_reproduces_its_table_row_on_a_held_out_grid() -> None:
    """docs/results.md's soft row, first rendered held-out grid: same weights, seed, steps and sampler (the
    table was computed on an H100 in bf16; here in fp32 on CPU)."""
    from pipelines.common.shards import iter_tar_samples
    from pipelines.eval_metrics import grid_report
    from pipelines.generation import GenerateConfig, Generator4D, frames_to_tensor
    from pipelines.common.shards import LazyGrid, resolve_shards
    table = json.loads((ROOT / "docs" / "results" / "proof_eval.json").read_text())["results"]["render"]["soft"]
    want = table["per_grid"][0]["psnr"]
    gen = Generator4D(GenerateConfig(checkpoint=str(WEIGHTS / "soft.pt.gz"), steps=20, method="euler", device="cpu"))
    key, files = next(iter_tar_samples(resolve_shards(str(WEIGHTS / "heldout"))[0]))
    grid = LazyGrid(files)
    assert grid.meta["item_id"] not in set(gen.data_items["items"])  # held out indeed
    V, T = gen.window
    truth = frames_to_tensor(grid.cells(range(V), range(T)), *gen.size)
    filled, given = gen.generate(truth[0], truth[:, 0], seed=0)
    got = grid_report((filled + 1) / 2, (truth + 1) / 2, given)["psnr"]
    assert abs(got - want) < 1.0, (got, want)
    assert got > table["psnr_min"] - 1.0
