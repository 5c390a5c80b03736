"""The evaluation job on a tiny random base checkpoint (fast, CPU): variants, baselines, per-set reports,
spread, object PSNR and the refusal to score on training items."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from model import DIT_PRESETS
from model_helpers import tiny_dit
from pipelines.common.errors import UserError
from pipelines.eval_metrics import METRICS, PSNR_CAP_DB, grid_report, psnr
from pipelines.evaluation import (BASELINES, EvalConfig, check_train_items, copy_first_column, copy_first_row,
                                 evaluate, format_cell, given_mask, object_mask, paired, paired_rows,
                                 parse_checkpoints, parse_grid_sets, plan_variants)
from shardgen import make_grid_shards
from pipelines.common.checkpoints import save_checkpoint


def _base_ckpt(path: Path, data_items: list[str] | None, net: torch.nn.Module | None = None) -> str:
    """A base checkpoint as training exports it: tiny random DiT (or ``net``), a 3 x 4 window of 16 x 16 frames."""
    payload = {"stage": "base", "model_config": dataclasses.asdict(DIT_PRESETS["tiny"]),
               "state_dict": (net or tiny_dit()).state_dict(),
               "config": {"data": {"views": 3, "frames": 4, "height": 16, "width": 16}}}
    if data_items is not None:
        payload["data_items"] = {"items": sorted(data_items), "digest": "0" * 64}
    return str(save_checkpoint(path, payload).parent)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("heldout")
    return {"render": make_grid_shards(root / "render", n=2, views=4, frames=6, size=16, per_shard=2, rgba=True),
            "pseudo": make_grid_shards(root / "pseudo", n=2, views=4, frames=6, size=16, per_shard=2)}


def test_baselines_copy_the_nearest_given_cell() -> None:
    row, column = torch.rand(4, 3, 2, 2), torch.rand(3, 3, 2, 2)
    column[0] = row[0]
    by_row, by_col = copy_first_row(row, column), copy_first_column(row, column)
    for grid in (by_row, by_col):  # given cells exact
        assert torch.equal(grid[0], row) and torch.equal(grid[:, 0], column)
    assert torch.equal(by_row[2, 3], row[3]) and torch.equal(by_col[2, 3], column[2])
    assert set(BASELINES) == {"copy_first_row", "copy_first_column"}
    assert given_mask(3, 4).sum() == 3 + 4 - 1


def test_grid_sets_and_variants_are_parsed() -> None:
    assert parse_grid_sets("render=outputs/a,pseudo4d=outputs/b") == {"render": "outputs/a", "pseudo4d": "outputs/b"}
    assert parse_grid_sets(["x/heldout_render/shards", "y/heldout_render/shard-*.tar"]) == \
        {"heldout_render": "x/heldout_render/shards", "heldout_render_2": "y/heldout_render/shard-*.tar"}
    with pytest.raises(UserError, match="twice"):
        parse_grid_sets("a=x,a=y")
    names = [v.name for v in plan_variants(EvalConfig(checkpoints=["soft=c1", "hard=c2"]))]
    assert names == ["soft", "hard", "train_free_hard", "train_free_soft", "train_free_sequential",
                     "copy_first_row", "copy_first_column"]
    with pytest.raises(UserError, match="two variants are named 'copy_first_row'"):
        plan_variants(EvalConfig(checkpoints=["copy_first_row=c1"]))
    assert parse_checkpoints(["a=x, b=y", "c=z"]) == {"a": "x", "b": "y", "c": "z"}  # lists and commas alike
    for bad, why in [("a=x,a=y", "names 'a' twice"), ("a=x,b", "entry 'b' must look like name=path"),
                     ("a b=x", "name 'a b' may hold only"), (" , ", "give at least one --checkpoints")]:
        with pytest.raises(UserError, match=why):
            parse_checkpoints(bad)
    from pipelines.common.config import ConfigError
    with pytest.raises(ConfigError, match="--shift must be positive"):  # an option error, as in generation
        EvalConfig(checkpoints=["soft=c1"], shift=-1.0).validate()


def test_object_mask_follows_the_colour_resize() -> None:
    cells = np.zeros((1, 1, 32, 64, 4), np.uint8)
    cells[..., 8:24, 24:40, 3] = 255  # a 16 x 16 object in the middle of a 32 x 64 frame
    mask = object_mask(cells, 16, 16)  # scale 0.5, then a centre crop of 16 columns out of 32
    assert mask.shape == (1, 1, 1, 16, 16) and mask.dtype == torch.bool
    assert mask[0, 0, 0, 4:12, 4:12].all() and mask.sum() == 64
    assert object_mask(cells[..., :3], 16, 16) is None


def test_train_items_are_refused() -> None:
    heldout = {"item1": "held-out set 'render', grid item0001__0", "item9": "held-out set 'render', grid x"}
    items = {"items": ["item1", "item2"], "digest": "0" * 64}
    with pytest.raises(UserError) as err:
        check_train_items("soft", items, heldout, allow=False)
    msg = str(err.value)
    assert "\n" not in msg and "'soft'" in msg and "'item1'" in msg and "--allow-train-items true" in msg
    assert check_train_items("soft", items, heldout, allow=True) == ["item1"]
    assert check_train_items("soft", {"items": ["item5"], "digest": ""}, heldout, allow=False) == []
    assert check_train_items("soft", None, heldout, allow=False) == []


def test_evaluation_reports_every_variant_per_set(heldout: dict[str, Path], tmp_path: Path, capsys) -> None:
    ckpt = _base_ckpt(tmp_path / "base", data_items=None)
    out = tmp_path / "eval"
    cfg = EvalConfig(grids=[f"render={heldout['render']}", f"pseudo={heldout['pseudo']}"],
                     checkpoints=[f"base={ckpt}"], max_grids=2, steps=1, method="euler", device="cpu", out=str(out))
    res = evaluate(cfg)
    assert "records no training items" in capsys.readouterr().err
    variants = {"base", "train_free_hard", "train_free_soft", "train_free_sequential", "copy_first_row",
                "copy_first_column"}
    assert set(res["results"]) == {"render", "pseudo"}
    for set_name, rows in res["results"].items():
        assert set(rows) == variants
        for row in rows.values():
            assert row["grids"] == 2 and (row["views"], row["frames"]) == (3, 4)
            assert row["psnr_min"] <= row["psnr"] <= row["psnr_max"] and row["psnr_std"] >= 0
            assert row["ssim_min"] <= row["ssim"] <= row["ssim_max"]
    render, pseudo = res["results"]["render"], res["results"]["pseudo"]
    assert all(np.isfinite(r["psnr_object"]) for r in render.values())  # RGBA renders: object PSNR
    assert all(math.isnan(r["psnr_object"]) for r in pseudo.values())   # no alpha: n/a
    # a baseline row is the same metrics as a model row, computed on the copied grid
    from pipelines.generation import frames_to_tensor
    from pipelines.common.shards import LazyGrid, resolve_shards
    from pipelines.common.shards import iter_tar_samples
    _, files = next(iter_tar_samples(resolve_shards(str(heldout["render"]))[0]))
    cells = LazyGrid(files).cells(range(3), range(4))
    truth = frames_to_tensor(cells, 16, 16)
    expect = grid_report((copy_first_column(truth[0], truth[:, 0]) + 1) / 2, (truth + 1) / 2, given_mask(3, 4),
                         object_mask(cells, 16, 16))
    got = render["copy_first_column"]["per_grid"][0]
    for name, m in METRICS.items():
        if m.per_grid:
            assert got[name] == pytest.approx(expect[name], nan_ok=True)
    assert got["psnr"] <= PSNR_CAP_DB and float(psnr(truth, truth).min()) == math.inf

    saved = json.loads((out / "results.json").read_text())
    assert set(saved["results"]) == {"render", "pseudo"} and "psnr_std" in saved["results"]["render"]["base"]
    report = (out / "report.md").read_text()
    assert "## render:" in report and "## pseudo:" in report and "| copy_first_row | 2 |" in report
    assert format_cell(render["base"], "psnr") in report and " ± " in format_cell(render["base"], "psnr")
    assert "| train_free_sequential | 2 |" in report and "object PSNR" in report
    # every model row against copying the first row, grid by grid; baselines are not compared with themselves
    pairs = paired_rows(render)
    assert set(pairs) == variants - {"copy_first_row", "copy_first_column"}
    diffs = [g["psnr"] - c["psnr"] for g, c in zip(render["base"]["per_grid"], render["copy_first_row"]["per_grid"])]
    assert pairs["base"]["psnr"]["mean"] == pytest.approx(np.mean(diffs))
    assert pairs["base"]["psnr"]["better"] == sum(d > 0 for d in diffs)
    assert "Grid by grid against copy_first_row" in report
    assert f"| base | {pairs['base']['psnr']['mean']:.2f} ± " in report
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (rec,) = client.search_runs([client.get_experiment_by_name("4real-eval").experiment_id])
    keys = set(rec.data.metrics)
    assert {"render/base/psnr", "render/base/psnr_std", "pseudo/copy_first_row/ssim_max",
            "render/train_free_sequential/psnr_object"} <= keys
    assert "pseudo/base/psnr_object" not in keys  # n/a is not logged as a number
    assert rec.data.metrics["render/base/psnr_vs_copy_first_row"] == pytest.approx(pairs["base"]["psnr"]["mean"])
    assert {"render/base/psnr_vs_copy_first_row_t", "pseudo/train_free_soft/ssim_vs_copy_first_row"} <= keys
    assert not any(k.startswith("render/copy_first_column/") and "_vs_" in k for k in keys)


def test_paired_differences_are_grid_by_grid() -> None:
    p = paired([31.0, 32.0, 33.0], [30.0, 30.0, 30.0])
    assert p["mean"] == pytest.approx(2.0) and p["std"] == pytest.approx(1.0) and p["grids"] == 3
    assert p["t"] == pytest.approx(2.0 * math.sqrt(3)) and p["better"] == 3
    assert paired([1.0, 0.0], [0.0, 1.0])["better"] == 1 and paired([1.0, 0.0], [0.0, 1.0])["t"] == 0.0
    assert math.isnan(paired([2.0], [1.0])["std"]) and math.isnan(paired([2.0], [1.0])["t"])
    assert paired([2.0, 3.0], [1.0, 2.0])["t"] == math.inf and paired([1.0, 2.0], [2.0, 3.0])["t"] == -math.inf
    assert math.isnan(paired([1.0, 2.0], [1.0, 2.0])["t"])  # no difference at all
    with pytest.raises(ValueError, match="same grids"):
        paired([1.0, 2.0], [1.0])
    one = {"kind": "model", "per_grid": [{"psnr": 1.0, "ssim": 0.5}]}
    assert paired_rows({"m": one, "copy_first_row": dict(one, kind="baseline")}) == {}  # one grid: nothing to pair
    two = {"kind": "model", "views": 3, "frames": 4,
           "per_grid": [{"psnr": 1.0, "ssim": 0.5}, {"psnr": 3.0, "ssim": 0.7}]}
    ref = dict(two, kind="baseline", per_grid=[{"psnr": 0.0, "ssim": 0.5}, {"psnr": 1.0, "ssim": 0.6}])
    wide = dict(two, views=4)  # another window of the grids: other cells than the baseline's
    assert set(paired_rows({"m": two, "wide": wide, "copy_first_row": ref})) == {"m"}


def test_missing_mlflow_fails_before_any_grid_is_scored(heldout: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracking asked for but MLflow not installed (a GPU node's image): one line saying so, at the start;
    with tracking off the same evaluation runs."""
    ckpt = _base_ckpt(tmp_path / "base", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    cfg = EvalConfig(grids=[f"render={heldout['render']}"], checkpoints=[f"base={ckpt}"], max_grids=1, steps=1,
                     method="euler", device="cpu", train_free=False, out=str(tmp_path / "eval"))
    with pytest.raises(UserError, match="missing dependency 'mlflow'"):
        evaluate(cfg)
    assert not (tmp_path / "eval").exists()
    res = evaluate(dataclasses.replace(cfg, mlflow_uri="none"))
    assert "base" in res["results"]["render"]


def test_evaluation_refuses_training_items(heldout: dict[str, Path], tmp_path: Path) -> None:
    ckpt = _base_ckpt(tmp_path / "base", data_items=["item1", "other"])
    cfg = EvalConfig(grids=[f"render={heldout['render']}"], checkpoints=[f"base={ckpt}"], max_grids=2, steps=1,
                     method="euler", device="cpu", out=str(tmp_path / "eval"))
    with pytest.raises(UserError, match="variant 'base' was trained on item 'item1'"):
        evaluate(cfg)
    assert not (tmp_path / "eval" / "results.json").exists()  # refused before any generation
    res = evaluate(dataclasses.replace(cfg, allow_train_items=True, train_free=False))
    assert set(res["results"]["render"]) == {"base", "copy_first_row", "copy_first_column"}
    assert "item1" in res["notes"]["train_items/base"]


def test_cli_reports_sets_and_refuses_in_one_line(heldout: dict[str, Path], tmp_path: Path) -> None:
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    ckpt = _base_ckpt(tmp_path / "base", data_items=["item0"])
    args = [sys.executable, "pipelines/evaluate_4d.py", "--grids", f"render={heldout['render']},"
            f"pseudo={heldout['pseudo']}", "--checkpoints", f"base={ckpt}", "--max-grids", "1", "--steps", "1",
            "--method", "euler", "--device", "cpu", "--train-free", "false", "--out", str(tmp_path / "eval")]
    proc = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "'item0'" in lines[0] and "--allow-train-items" in lines[0]
    proc = subprocess.run(args + ["--allow-train-items", "true"], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(saved["results"]) == {"render", "pseudo"}
    assert set(saved["results"]["pseudo"]) == {"base", "copy_first_row", "copy_first_column"}


def test_grids_sampled_together_score_as_sampled_alone(heldout: dict[str, Path], tmp_path: Path) -> None:
    """--batch: the held-out grids share each model call, but each draws its noise from its own seed."""
    ckpt = _base_ckpt(tmp_path / "base", data_items=None)
    cfg = EvalConfig(grids=[f"pseudo={heldout['pseudo']}"], checkpoints=[f"base={ckpt}"], max_grids=2, steps=2,
                     method="heun", device="cpu", train_free=False, mlflow_uri="none")
    alone = evaluate(dataclasses.replace(cfg, batch=1, out=str(tmp_path / "alone")))["results"]["pseudo"]["base"]
    together = evaluate(dataclasses.replace(cfg, batch=2, out=str(tmp_path / "together")))["results"]["pseudo"]["base"]
    a, b = [g["psnr"] for g in alone["per_grid"]], [g["psnr"] for g in together["per_grid"]]
    assert a == pytest.approx(b, abs=1e-3) and a[0] != pytest.approx(a[1], abs=1e-3)  # per grid, not one grid twice
    other = evaluate(dataclasses.replace(cfg, batch=2, seed=7, out=str(tmp_path / "seed7")))["results"]["pseudo"]["base"]
    assert [g["psnr"] for g in other["per_grid"]] != pytest.approx(b, abs=1e-3)  # the seed reaches the noise
    from pipelines.common.config import ConfigError
    with pytest.raises(ConfigError, match="--batch must be >= 1"):
        dataclasses.replace(cfg, batch=0).validate()


def test_grids_the_render_filters_marked_are_skipped(tmp_path: Path) -> None:
    """Held-out grids the render job marked bad (an empty or static render) are not scored, as the training
    loader does not train on them; the report counts them, and a set of only marked grids is one clear error."""
    shards = make_grid_shards(tmp_path / "marked", n=3, views=4, frames=6, size=16, per_shard=3, rgba=True,
                              filtered={0: "empty", 2: "static"})
    ckpt = _base_ckpt(tmp_path / "base", data_items=[])
    cfg = EvalConfig(grids=[f"render={shards}"], checkpoints=[f"base={ckpt}"], max_grids=3, steps=1,
                     method="euler", device="cpu", train_free=False, out=str(tmp_path / "eval"))
    res = evaluate(cfg)
    info = res["sets"]["render"]
    assert info["count"] == 1 and info["items"] == ["item1"]
    assert info["skipped_filtered"] == {"empty": 1, "static": 1}
    assert res["results"]["render"]["base"]["grids"] == 1
    assert "1 grid(s) marked empty, 1 grid(s) marked static" in res["notes"]["filtered_render"]
    assert "marked empty" in (tmp_path / "eval" / "report.md").read_text()
    bad = make_grid_shards(tmp_path / "all_marked", n=2, views=4, frames=6, size=16, rgba=True,
                           filtered={0: "empty", 1: "leaves_frame"})
    with pytest.raises(UserError, match=r"every grid in .* was marked bad .*1 empty, 1 leaves_frame.*--filters ''"):
        evaluate(dataclasses.replace(cfg, grids=[f"render={bad}"], out=str(tmp_path / "eval2")))


def test_reports_of_one_set_merge_and_compare_grid_by_grid(heldout: dict[str, Path], tmp_path: Path) -> None:
    """benchmarks/heldout_paired.py: variants scored in separate evaluations of the same grids (parallel processes
    on one GPU) are merged and compared grid by grid; reports of other grids, or unknown variants, are refused."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import heldout_paired
    a_ckpt = _base_ckpt(tmp_path / "a", data_items=None)
    # b: the same architecture with every weight moved (a fresh adaLN-Zero model predicts alike whatever its seed)
    torch.manual_seed(1)
    net = tiny_dit()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b_ckpt = _base_ckpt(tmp_path / "b", data_items=None, net=net)
    cfg = EvalConfig(grids=[f"render={heldout['render']}"], max_grids=2, steps=1, method="euler", device="cpu",
                     train_free=False, mlflow_uri="none")
    evaluate(dataclasses.replace(cfg, checkpoints=[f"a={a_ckpt}"], out=str(tmp_path / "ev_a")))
    res_b = evaluate(dataclasses.replace(cfg, checkpoints=[f"b={b_ckpt}"], out=str(tmp_path / "ev_b")))
    reports = [str(tmp_path / "ev_a" / "results.json"), str(tmp_path / "ev_b" / "results.json")]
    png, out = tmp_path / "paired.png", tmp_path / "paired.json"
    assert heldout_paired.main([*reports, "--pairs", "a:b", "--figure", str(png), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert set(merged["rows"]) == {"a", "b", "copy_first_row", "copy_first_column"}
    assert set(merged["against_reference"]) == {"a", "b"}
    got = merged["pairs"]["a:b"]["psnr"]
    a_psnr = [g["psnr"] for g in merged["rows"]["a"]["per_grid"]]
    b_psnr = [g["psnr"] for g in res_b["results"]["render"]["b"]["per_grid"]]
    assert got["grids"] == 2 and got["mean"] == pytest.approx(np.mean(np.subtract(a_psnr, b_psnr)))
    assert got["mean"] != pytest.approx(0.0, abs=1e-6)  # two different models, not one compared with itself
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    items = [g["item"] for g in merged["rows"]["a"]["per_grid"]]
    assert len(set(items)) == 2 and items == [g["item"] for g in res_b["results"]["render"]["b"]["per_grid"]]

    # the grids a wins most and least against copying the first row, scored again alone and drawn side by side
    import heldout_extremes
    from PIL import Image
    sheets = tmp_path / "extremes.png"
    assert heldout_extremes.main(["--merged", str(out), "--grids", str(heldout["render"]), "--checkpoint", a_ckpt,
                                  "--variant", "a", "--steps", "1", "--device", "cpu", "--out", str(sheets)]) == 0
    ranked = sorted(merged["rows"]["a"]["per_grid"],
                    key=lambda g: g["psnr"] - {r["item"]: r["psnr"] for r in merged["rows"]["copy_first_row"]
                                               ["per_grid"]}[g["item"]])
    assert [i for _, i, _, _ in heldout_extremes.extremes(merged, "a")] == [ranked[-1]["item"], ranked[0]["item"]]
    one = Image.open(next((tmp_path / "ev_a").glob("render__a_grid0.png")))
    assert Image.open(sheets).size == (2 * one.width + 30, one.height + 40)  # two sheets of the eval's own layout
    # one grid scored alone (--items) with the seed of its place in the set scores as it did in the set
    for place, item, score, _ in heldout_extremes.extremes(merged, "a"):
        alone = evaluate(dataclasses.replace(cfg, checkpoints=[f"a={a_ckpt}"], items=[item], seed=place, max_grids=1,
                                             out=str(tmp_path / f"alone_{place}")))["results"]["render"]["a"]
        assert [g["item"] for g in alone["per_grid"]] == [item] and alone["psnr"] == pytest.approx(score, abs=1e-6)
    with pytest.raises(UserError, match="no grid of nowhere"):
        evaluate(dataclasses.replace(cfg, checkpoints=[f"a={a_ckpt}"], items=["nowhere"], out=str(tmp_path / "x")))
    bare = json.loads(out.read_text())
    for g in bare["rows"]["a"]["per_grid"]:
        g.pop("item")
    with pytest.raises(SystemExit, match="no item ids"):
        heldout_extremes.extremes(bare, "a")

    flipped = json.loads(Path(reports[1]).read_text())  # b's grids listed in another order: not comparable
    flipped["results"]["render"]["b"]["per_grid"].reverse()
    (tmp_path / "flipped.json").write_text(json.dumps(flipped))
    with pytest.raises(SystemExit, match="another order"):
        heldout_paired.main([reports[0], str(tmp_path / "flipped.json")])

    evaluate(dataclasses.replace(cfg, checkpoints=[f"c={a_ckpt}"], max_grids=1, out=str(tmp_path / "ev_one")))
    with pytest.raises(SystemExit, match="other grids"):
        heldout_paired.main([reports[0], str(tmp_path / "ev_one" / "results.json")])
    with pytest.raises(SystemExit, match="'zz'"):
        heldout_paired.main([*reports, "--pairs", "a:zz"])
    with pytest.raises(SystemExit, match="is not a:b"):
        heldout_paired.main([*reports, "--pairs", "ab"])
    with pytest.raises(SystemExit, match="no set 'pseudo'"):
        heldout_paired.main([*reports, "--set", "pseudo"])
