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
    assert json.loads((out / "meta.json").read_text())["window_plan"] == "even"  # the default, recorded
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


PROOF = ROOT / "weights" / "proof"


def _proof_pair(folder: Path, corrupt: bool = False) -> tuple[str, str]:
    """A 2-frame first row and a 2-view first column (image folders) from the shipped held-out grid; ``corrupt``
    makes the column's second image a file PIL cannot decode."""
    from pipelines.generation import _first_grid
    grid, _ = _first_grid(str(PROOF / "heldout"))
    row, col = folder / "row", folder / "col"
    for d, frames in ((row, grid[0, :2]), (col, grid[:2, 0])):
        d.mkdir(parents=True)
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(d / f"{i:03d}.png")
    if corrupt:
        (col / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return str(row), str(col)


def test_sync_override_to_another_trained_variant_is_refused(tmp_path: Path) -> None:
    # soft.pt.gz holds soft sync layers only: --sync hard used to run hard layers at their initial values and
    # label the outputs "sync: hard". Refused in one line, saying what to do instead.
    soft = str(PROOF / "soft.pt.gz")
    proc = subprocess.run([sys.executable, "pipelines/generate_4d.py", "--checkpoint", soft, "--sync", "hard",
                           "--from-grid", str(PROOF / "heldout"), "--out", str(tmp_path / "x")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in ("--sync hard", "'hard' sync layers", "holds 'soft'", "trained with sync 'hard'", "drop --sync"):
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "x" / "frames").exists()
    # The checkpoint's own variant and the training-free ones still load, as before.
    assert Generator4D(GenerateConfig(checkpoint=soft, sync="soft", device="cpu")).sync == "soft"
    assert Generator4D(GenerateConfig(checkpoint=soft, sync="train_free_hard", device="cpu")).sync == "train_free_hard"


def test_a_checkpoint_missing_sync_weights_is_refused(tmp_path: Path) -> None:
    import torch

    from pipelines.common.checkpoints import load_checkpoint
    ckpt = load_checkpoint(str(PROOF / "soft.pt.gz"))
    ckpt.pop("base_ref")  # load_checkpoint merged the base in: the copy stands alone
    del ckpt["state_dict"]["soft.3.linear.weight"]
    (tmp_path / "ckpt").mkdir()
    torch.save(ckpt, tmp_path / "ckpt" / "model.pt")
    with pytest.raises(UserError, match=r"lacks 1 weights of its 'soft' sync layers .*soft\.3\.linear\.weight"):
        Generator4D(GenerateConfig(checkpoint=str(tmp_path / "ckpt"), device="cpu"))


def test_batch_records_a_corrupt_image_as_that_pairs_failure(ray_local, tmp_path: Path) -> None:
    from pipelines.generation import run_batch
    pairs = {name: _proof_pair(tmp_path / name, corrupt=name == "corrupt") for name in ("a", "corrupt", "b")}
    manifest = tmp_path / "pairs.parquet"
    rows, cols = zip(*pairs.values())
    pq.write_table(pa.table({"fixed_view": list(rows), "freeze_time": list(cols), "name": list(pairs)}), manifest)
    cfg = GenerateConfig(checkpoint=str(PROOF / "soft.pt.gz"), manifest=str(manifest), out=str(tmp_path / "batch"),
                         steps=1, method="euler", views=2, frames=2, device="cpu", compile=False)
    assert run_batch(cfg) == 0  # the batch finishes: a decode error of one pair's input used to fail the Ray task
    assert (tmp_path / "batch" / "a" / "contact_sheet.png").exists()
    assert (tmp_path / "batch" / "b" / "contact_sheet.png").exists()
    results = {r["name"]: r for r in json.loads((tmp_path / "batch" / "batch_results.json").read_text())}
    assert results["a"]["ok"] and results["b"]["ok"] and not results["corrupt"]["ok"]
    assert "could not decode image" in results["corrupt"]["error"], results["corrupt"]
    assert str(Path(pairs["corrupt"][1]) / "001.png") in results["corrupt"]["error"]


def test_batch_actor_records_any_error_of_a_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Not only UserErrors: whatever one pair raises is recorded as its failure (type and message), not raised
    # into Ray Data, where it would fail the task and the batch before batch_results.json is written.
    from pipelines.common.config import to_dict
    from pipelines.generation import _BatchActor
    actor = _BatchActor(to_dict(GenerateConfig(checkpoint=str(PROOF / "soft.pt.gz"), out=str(tmp_path), device="cpu",
                                               compile=False)))

    def broken(*args, **kwargs):
        raise RuntimeError("boom in pair")
    monkeypatch.setattr("pipelines.generation.generate_one", broken)
    result = actor({"fixed_view": "r", "freeze_time": "c", "name": "x"})
    assert result == {"name": "x", "ok": False, "error": "RuntimeError: boom in pair", "contact_sheet": ""}


def test_batch_refuses_duplicate_and_path_like_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import generation
    row, col = _proof_pair(tmp_path / "in")
    names = ["a", "b", "a", "../up", "x/y", "", "batch_results.json"]
    manifest = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"fixed_view": [row] * len(names), "freeze_time": [col] * len(names), "name": names}),
                   manifest)

    def no_ray(*args, **kwargs):
        raise AssertionError("the names are checked before Ray starts")
    monkeypatch.setattr("pipelines.common.job.init_ray", no_ray)
    cfg = GenerateConfig(checkpoint=str(PROOF / "soft.pt.gz"), manifest=str(manifest), out=str(tmp_path / "batch"))
    with pytest.raises(UserError) as err:
        generation.run_batch(cfg)
    message = str(err.value)
    assert "\n" not in message and "duplicated 'a' (2 rows)" in message and "'b'" not in message
    for name in ("'../up'", "'x/y'", "''", "'batch_results.json'"):
        assert name in message, message
    assert not (tmp_path / "batch").exists()


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
