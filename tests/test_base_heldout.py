"""benchmarks/base_heldout.py on the shipped proof base and the held-out grid shipped beside it (CPU): it scores
every checkpoint on the same clips and draws, so the same weights twice pair exactly, and it tells the trained
base from the same architecture at random weights by loss and by PSNR."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from model import VideoDiT
from model.dit import DiTConfig
from pipelines.common.checkpoints import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import base_heldout  # noqa: E402

BASE, HELDOUT = ROOT / "weights/proof/base.pt.gz", ROOT / "weights/proof/heldout"


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> str:
    """The proof base's architecture and training config with freshly initialised weights (adaLN-Zero: the
    blocks start as identities, so it predicts a velocity from the embeddings alone)."""
    ckpt = load_checkpoint(str(BASE))
    torch.manual_seed(0)
    net = VideoDiT(DiTConfig(**ckpt["model_config"]))
    payload = {**ckpt, "state_dict": net.state_dict()}
    return str(save_checkpoint(tmp_path_factory.mktemp("untrained") / "model.pt", payload).parent)


def test_trained_base_beats_its_untrained_architecture_on_the_same_clips(untrained: str, tmp_path: Path,
                                                                          capsys) -> None:
    out = tmp_path / "r.json"
    rc = base_heldout.main(["--checkpoints", f"trained={BASE},again={BASE},untrained={untrained}",
                            "--grids", f"heldout={HELDOUT}", "--clips", "3", "--batch", "2", "--draws", "1",
                            "--steps", "2", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    s = json.loads(out.read_text())["sets"]["heldout"]
    assert s["clips"] == 3 and len(s["checkpoints"]["trained"]["per_clip"]["loss"]) == 3  # 2 + a batch cut to 1
    # the same weights score exactly alike clip by clip: same clips, same draws, same noise
    assert s["checkpoints"]["again"]["per_clip"] == s["checkpoints"]["trained"]["per_clip"]
    same = s["paired"]["again"]
    assert same["loss_ratio"]["mean"] == 1.0 and same["psnr_diff"]["std"] == 0.0
    # training shows on every clip
    t, u = s["checkpoints"]["trained"], s["checkpoints"]["untrained"]
    assert u["loss"] > 2 * t["loss"] and u["psnr"] < t["psnr"] - 3
    assert s["paired"]["untrained"]["loss_ratio"]["better"] == 0
    printed = capsys.readouterr().out
    assert "untrained vs trained, per clip: loss ratio" in printed and "(lower on 0/3)" in printed


def test_clips_follow_the_seed_and_the_checkpoints_clip_geometry() -> None:
    data = load_checkpoint(str(BASE))["config"]["data"]
    a = base_heldout.heldout_clips(str(HELDOUT), data, 5, 3, seed=7)
    b = base_heldout.heldout_clips(str(HELDOUT), data, 5, 3, seed=7)
    c = base_heldout.heldout_clips(str(HELDOUT), data, 5, 3, seed=8)
    assert [len(x["x"]) for x in a] == [3, 2]
    assert a[0]["x"].shape[1:] == (data["frames"], 3, data["height"], data["width"])
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert not all(torch.equal(x["x"], y["x"]) and torch.equal(x["mask"], y["mask"]) for x, y in zip(a, c))


def test_checkpoints_of_other_clip_sizes_are_refused(tmp_path: Path) -> None:
    ckpt = load_checkpoint(str(BASE))
    other = {**ckpt, "config": {**ckpt["config"], "data": {**ckpt["config"]["data"], "height": 32}}}
    path = save_checkpoint(tmp_path / "model.pt", other)
    with pytest.raises(SystemExit, match="different clips would not compare"):
        base_heldout.evaluate({"a": str(BASE), "b": str(path)}, {"heldout": str(HELDOUT)}, clips=2, batch=2,
                              draws=1, steps=1, device="cpu")
    with pytest.raises(SystemExit, match="error: --checkpoints entry 'b' must look like name=path"):
        base_heldout.main(["--checkpoints", f"a={BASE},b", "--grids", f"heldout={HELDOUT}"])
    with pytest.raises(SystemExit, match="error: --grids entry 'bad name=x'"):  # evaluate_4d.py's parser and rule
        base_heldout.main(["--checkpoints", f"a={BASE}", "--grids", "bad name=x"])
