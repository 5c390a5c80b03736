"""Generation and evaluation end to end from checkpoints the training tests produced (tiny preset, CPU)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.common.errors import UserError
from pipelines.common.visuals import to_uint8
from pipelines.generation import GenerateConfig, Generator4D, frames_to_tensor, generate_one
from pipelines.common.video import encode_video
from pipelines.common.shards import decode_grid, resolve_shards
from pipelines.common.shards import iter_tar_samples

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow]


def _grid(train_grids: Path, index: int = 0) -> np.ndarray:
    for i, (_, files) in enumerate(iter_tar_samples(resolve_shards(str(train_grids))[0])):
        if i == index:
            return decode_grid(files)[0]
    raise AssertionError


def _inputs(tmp: Path, grid: np.ndarray, corrupt_corner: bool = False, video: bool = True) -> tuple[str, str]:
    """First row as a video (or an image folder), first column as an image folder."""
    if video:
        row = tmp / "row.mp4"
        encode_video(row, grid[0], fps=8, crf=0)
    else:
        row = tmp / "row"
        row.mkdir()
        for t, frame in enumerate(grid[0]):
            Image.fromarray(frame).save(row / f"{t:03d}.png")
    col = tmp / "col"
    col.mkdir()
    for v, frame in enumerate(grid[:, 0]):
        if corrupt_corner and v == 0:
            frame = 255 - frame
        Image.fromarray(frame).save(col / f"{v:03d}.png")
    return str(row), str(col)


def _ckpt(run) -> str:
    return str(Path(run.output) / "checkpoint_final")


def test_generate_a_larger_grid_with_sliding_windows(fourd_run, train_grids: Path, tmp_path: Path) -> None:
    grid = _grid(train_grids)  # 4 views x 6 frames; the tiny model's window is 3 x 4
    row, col = _inputs(tmp_path, grid, video=False)  # lossless inputs, so "bit-exact" is checkable
    out = tmp_path / "gen"
    cfg = GenerateConfig(checkpoint=_ckpt(fourd_run), fixed_view=row, freeze_time=col, out=str(out), steps=2,
                         method="euler")
    gen = Generator4D(cfg)
    assert gen.window == (3, 4) and gen.window < grid.shape[:2]
    result = generate_one(gen, cfg, out)
    assert (result["views"], result["frames"]) == (4, 6)
    frames = sorted(p.name for p in (out / "frames").glob("*.png"))
    assert len(frames) == 24 and frames[0] == "v00t00.png" and frames[-1] == "v03t05.png"
    given = to_uint8(frames_to_tensor(grid, *gen.size))  # the inputs at the model's resolution
    for t in range(6):  # given cells come back bit-exact
        assert np.array_equal(np.asarray(Image.open(out / "frames" / f"v00t{t:02d}.png")), given[0, t])
    for v in range(4):
        assert np.array_equal(np.asarray(Image.open(out / "frames" / f"v{v:02d}t00.png")), given[v, 0])
    assert (out / "contact_sheet.png").stat().st_size > 0
    videos = {p.name for p in (out / "videos").glob("*.mp4")}
    assert {"row_v00.mp4", "row_v03.mp4", "col_t00.mp4", "col_t05.mp4", "bullet_time.mp4"} <= videos

    # A smaller run into the same folder leaves none of the first run's cells or videos behind.
    generate_one(gen, dataclasses.replace(cfg, views=2, frames=3), out)
    assert len(list((out / "frames").glob("*.png"))) == 6 and not (out / "videos" / "row_v03.mp4").exists()
    # A one-frame first row is refused in one line, before anything is written.
    one = tmp_path / "one_frame"
    one.mkdir()
    first = sorted(Path(row).iterdir())[0]
    (one / first.name).write_bytes(first.read_bytes())
    with pytest.raises(UserError, match="needs at least 2 of each"):
        generate_one(gen, dataclasses.replace(cfg, fixed_view=str(one)), tmp_path / "gen_one")
    assert not (tmp_path / "gen_one").exists()


def test_generate_with_the_upsampler(fourd_run, upsampler_run, train_grids: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    row, col = _inputs(tmp_path, _grid(train_grids), video=False)
    cfg = GenerateConfig(checkpoint=_ckpt(fourd_run), upsampler=_ckpt(upsampler_run), fixed_view=row,
                         freeze_time=col, out=str(tmp_path / "gen"), steps=1, upsampler_steps=1, method="euler",
                         views=3, frames=4)
    gen = Generator4D(cfg)

    def no_pyav(*args, **kwargs):  # a GPU node's image has no PyAV
        raise UserError("reading or writing video needs PyAV ('pip install av')")
    monkeypatch.setattr("pipelines.common.visuals.grid_videos", no_pyav)
    result = generate_one(gen, cfg, tmp_path / "gen")
    frame = np.asarray(Image.open(tmp_path / "gen" / "frames" / "v02t03.png"))
    assert frame.shape == (4 * gen.size[0], 4 * gen.size[1], 3)  # x4 super-resolution of every cell
    # without PyAV the frames and sheet are the result, and nothing claims videos were written
    assert result["videos"] == "" and result["bullet_time"] == ""
    assert "not written" in json.loads((tmp_path / "gen" / "meta.json").read_text())["videos"]


def test_inputs_must_share_their_first_frame(fourd_run, train_grids: Path, tmp_path: Path) -> None:
    row, col = _inputs(tmp_path, _grid(train_grids), corrupt_corner=True)
    proc = subprocess.run([sys.executable, "pipelines/generate_4d.py", "--checkpoint", _ckpt(fourd_run),
                           "--fixed-view", row, "--freeze-time", col, "--out", str(tmp_path / "x")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "do not share their first frame" in lines[0]


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        Generator4D(GenerateConfig(checkpoint=str(tmp_path / "nothing")))


def test_batch_generation_on_ray_data(ray_local, fourd_run, train_grids: Path, tmp_path: Path) -> None:
    pairs = []
    for i in range(2):
        d = tmp_path / f"in{i}"
        d.mkdir()
        pairs.append(_inputs(d, _grid(train_grids, i)))
    manifest = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"fixed_view": [pairs[0][0], pairs[1][0], str(tmp_path / "missing.mp4")],
                             "freeze_time": [pairs[0][1], pairs[1][1], pairs[1][1]],
                             "name": ["a", "b", "broken"]}), manifest)
    from pipelines.generation import run_batch
    cfg = GenerateConfig(checkpoint=_ckpt(fourd_run), manifest=str(manifest), out=str(tmp_path / "batch"),
                         steps=1, method="euler", views=3, frames=4)
    assert run_batch(cfg) == 0  # one bad pair is recorded, as the data jobs do; the others are written
    assert (tmp_path / "batch" / "a" / "contact_sheet.png").exists()
    assert (tmp_path / "batch" / "b" / "contact_sheet.png").exists()
    import json
    results = {r["name"]: r for r in json.loads((tmp_path / "batch" / "batch_results.json").read_text())}
    assert not results["broken"]["ok"] and "does not exist" in results["broken"]["error"]
    # nothing written at all is a failed run
    pq.write_table(pa.table({"fixed_view": [str(tmp_path / "missing.mp4")], "freeze_time": [pairs[1][1]],
                             "name": ["broken"]}), tmp_path / "bad.parquet")
    assert run_batch(dataclasses.replace(cfg, manifest=str(tmp_path / "bad.parquet"), out=str(tmp_path / "bad"))) == 1


def test_evaluation_compares_sync_variants(fourd_run, train_grids: Path, tmp_path: Path) -> None:
    import dataclasses

    import torch

    from pipelines.evaluation import EvalConfig, evaluate
    from shardgen import make_grid_shards
    # held-out renders: other items than the pseudo-4D training grids, RGBA so object PSNR applies
    heldout = make_grid_shards(tmp_path / "heldout", n=2, views=4, frames=6, size=32, rgba=True)
    cfg = EvalConfig(grids=[f"render={heldout}"], checkpoints=[f"soft={_ckpt(fourd_run)}"], max_grids=2, steps=1,
                     method="euler", out=str(tmp_path / "eval"))
    res = evaluate(cfg)
    rows = res["results"]["render"]
    assert set(rows) == {"soft", "train_free_hard", "train_free_soft", "train_free_sequential", "copy_first_row",
                         "copy_first_column"}
    soft = rows["soft"]
    assert soft["grids"] == 2 and np.isfinite(soft["psnr"]) and 0 < soft["ssim"] <= 1
    assert np.isfinite(soft["psnr_object"]) and soft["psnr_min"] <= soft["psnr"] <= soft["psnr_max"]
    assert np.isnan(soft["fvd"]) and "FVD not computed: no weights given" in res["notes"]["fvd"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| soft | 2 |" in report and "| train_free_soft |" in report and "n/a" in report and " ± " in report
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'eval' / 'mlflow.db'}")
    (rec,) = client.search_runs([client.get_experiment_by_name("4real-eval").experiment_id])
    assert "render/soft/psnr" in rec.data.metrics and "render/train_free_hard/ssim" in rec.data.metrics
    # Training records its items in the checkpoint, so scoring on the training grids is refused.
    ckpt = torch.load(Path(_ckpt(fourd_run)) / "model.pt", map_location="cpu", weights_only=False)
    assert ckpt["data_items"]["items"]
    with pytest.raises(UserError, match="variant 'soft' was trained on item 'procedural-"):
        evaluate(dataclasses.replace(cfg, grids=[str(train_grids)], out=str(tmp_path / "eval_train")))
    assert not (tmp_path / "eval_train" / "config.yaml").exists()  # a failed run writes no config for no report


@pytest.mark.parametrize("flags,needle", [
    (["--views", "-4"], "--views must be 0 or more"),
    (["--frames", "1"], "at least 2"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--method", "rk4"], "option 'method' must be one of euler, heun; got 'rk4'"),
])
def test_bad_generation_options_are_one_line_before_any_model_loads(tmp_path: Path, flags: list[str],
                                                                    needle: str) -> None:
    # The shipped checkpoint and grid: a bad option must be refused before they are read (no 7-minute run
    # on a negative --views, as before).
    proc = subprocess.run([sys.executable, "pipelines/generate_4d.py", "--checkpoint", "weights/proof/soft.pt.gz",
                           "--from-grid", "weights/proof/heldout", "--out", str(tmp_path / "x"), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "x").exists()
