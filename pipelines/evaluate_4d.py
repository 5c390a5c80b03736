"""Evaluate 4D models against held-out ground-truth grids (rendered grids know every cell).

    python pipelines/evaluate_4d.py --grids outputs/render_heldout \\
        --checkpoints soft=runs/soft/checkpoint_final,hard=runs/hard/checkpoint_final,sequential=runs/seq/checkpoint_final \\
        --out outputs/eval [--i3d-weights i3d_torchscript.pt] [--lpips-weights lpips.pt]

For every variant (the trained ones given, plus the training-free hard and soft
variants on the same frozen base) each held-out grid is generated from its first
row and first column, and compared cell by cell: PSNR and SSIM per cell and
averaged over the generated cells, temporal consistency along rows, multi-view
consistency along columns, and FVD / LPIPS when their weights are given. The
comparison table goes to <out>/report.md, <out>/results.json and MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from a checkout without install

import torch  # noqa: E402

from pipelines.common.config import doc, flatten, parse_config, run_cli, write_resolved  # noqa: E402
from pipelines.common.errors import UserError  # noqa: E402


@dataclass
class EvalConfig:
    grids: str = doc("", "held-out grid shards (a render output folder, its shards/ folder or a tar glob)")
    checkpoints: list[str] = doc(text="trained variants as name=checkpoint (folder, model.pt or runs:/<id>)",
                                 factory=list)
    train_free: bool = doc(True, "also evaluate the training-free hard and soft variants on the same base")
    max_grids: int = doc(8, "held-out grids evaluated")
    views: int = doc(0, "grid views evaluated (0 = the model's window)")
    frames: int = doc(0, "grid time steps evaluated (0 = the model's window)")
    steps: int = doc(20, "sampling steps")
    method: str = doc("heun", "sampler: euler or heun")
    seed: int = doc(0, "noise seed (the same for every variant)")
    i3d_weights: str = doc("", "TorchScript I3D feature extractor for FVD (local path)")
    lpips_weights: str = doc("", "TorchScript LPIPS model (local path)")
    out: str = doc("outputs/eval", "report folder")
    mlflow_uri: str = doc("", "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite in the report folder)")
    experiment: str = doc("4real-eval", "MLflow experiment")
    device: str = doc("auto", "cuda, cpu or auto")


def _heldout(spec: str, limit: int) -> list[tuple[str, Any]]:
    from pipelines.common.shards import iter_tar_samples
    from training.data import LazyGrid, resolve_shards
    grids = []
    for shard in resolve_shards(spec):
        for key, files in iter_tar_samples(shard):
            grids.append((key, LazyGrid(files)))
            if len(grids) >= limit:
                return grids
    if not grids:
        raise UserError(f"no grids in '{spec}'")
    return grids


def _variants(cfg: EvalConfig) -> list[tuple[str, str, str]]:
    """(name, checkpoint, sync override) per variant."""
    out = []
    for item in cfg.checkpoints:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--checkpoints entry '{item}' must look like name=path (e.g. soft=runs/soft/checkpoint_final)")
        out.append((name, path, ""))
    if not out:
        raise UserError("give at least one --checkpoints name=path (the training-free variants reuse its base)")
    if cfg.train_free:
        out += [("train_free_hard", out[0][1], "train_free_hard"), ("train_free_soft", out[0][1], "train_free_soft")]
    return out


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    from pipelines.common.visuals import contact_sheet, to_uint8
    from pipelines.eval_metrics import MissingWeights, fvd, grid_report, lpips, nan_safe_mean
    from pipelines.generate_4d import GenerateConfig, Generator4D, frames_to_tensor

    out = Path(cfg.out).resolve()
    write_resolved(cfg, out)
    heldout = _heldout(cfg.grids, cfg.max_grids)
    results: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for name, ckpt, sync in _variants(cfg):
        t0 = time.time()
        gen = Generator4D(GenerateConfig(checkpoint=ckpt, sync=sync, steps=cfg.steps, method=cfg.method,
                                         device=cfg.device))
        V = cfg.views or gen.window[0]
        T = cfg.frames or gen.window[1]
        reports, gen_videos, real_videos, gen_cells, real_cells = [], [], [], [], []
        for i, (key, grid) in enumerate(heldout):
            gv, gt = grid.shape
            if gv < V or gt < T:
                raise UserError(f"held-out grid {key} is {gv}x{gt}, smaller than the evaluated {V}x{T}; "
                                "pass --views/--frames or render larger grids")
            truth = frames_to_tensor(grid.cells(range(V), range(T)), *gen.size)
            filled, given = gen.generate(truth[0], truth[:, 0], seed=cfg.seed + i)
            g01, t01 = (filled + 1) / 2, (truth + 1) / 2
            reports.append(grid_report(g01, t01, given))
            # FVD compares sets of equal-length videos: the rows, and the columns too when they are as long
            gen_videos += [g01[v] for v in range(V)] + ([g01[:, t] for t in range(T)] if V == T else [])
            real_videos += [t01[v] for v in range(V)] + ([t01[:, t] for t in range(T)] if V == T else [])
            todo = ~given.bool()
            gen_cells.append(g01[todo])
            real_cells.append(t01[todo])
            if i == 0:
                contact_sheet(to_uint8(torch.cat([truth, filled])), out / f"{name}_grid0.png",
                              given=torch.cat([given, given]).numpy().astype(bool))
        row = {"grids": len(reports), "views": V, "frames": T, "seconds": time.time() - t0,
               **{k: nan_safe_mean([r[k] for r in reports]) for k in
                  ("psnr", "ssim", "temporal_consistency_error", "multiview_consistency_error")}}
        try:
            row["fvd"] = fvd(torch.stack(gen_videos), torch.stack(real_videos), cfg.i3d_weights)
        except MissingWeights as exc:
            row["fvd"], notes["fvd"] = float("nan"), str(exc)
        try:
            row["lpips"] = float(lpips(torch.cat(gen_cells), torch.cat(real_cells), cfg.lpips_weights).mean())
        except MissingWeights as exc:
            row["lpips"], notes["lpips"] = float("nan"), str(exc)
        row["per_grid"] = reports
        results[name] = row
        print(f"[eval] {name}: PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.4f} over {len(reports)} grids "
              f"({row['seconds']:.1f}s)", flush=True)
    report = _markdown(results, notes, cfg)
    (out / "report.md").write_text(report)
    (out / "results.json").write_text(json.dumps({"results": results, "notes": notes}, indent=2, default=float))
    _log_mlflow(cfg, out, results)
    print(report)
    print(f"[eval] report: {out / 'report.md'}")
    return {"results": results, "notes": notes}


def _fmt(x: float, digits: int) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"


def _markdown(results: dict[str, Any], notes: dict[str, str], cfg: EvalConfig) -> str:
    lines = [f"# 4D evaluation on {cfg.grids}", "",
             "| variant | grids | PSNR (dB) ↑ | SSIM ↑ | temporal err ↓ | multi-view err ↓ | FVD ↓ | LPIPS ↓ |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['grids']} | {_fmt(r['psnr'], 2)} | {_fmt(r['ssim'], 4)} | "
                     f"{_fmt(r['temporal_consistency_error'], 4)} | {_fmt(r['multiview_consistency_error'], 4)} | "
                     f"{_fmt(r['fvd'], 1)} | {_fmt(r['lpips'], 4)} |")
    lines += ["", "PSNR and SSIM are averaged over generated cells (the given first row and column excluded). "
              "Consistency errors: mean |change between neighbouring frames| difference to the ground truth, "
              "along rows (time) and columns (views)."]
    lines += [f"- {k}: {v}" for k, v in notes.items()]
    return "\n".join(lines) + "\n"


def _log_mlflow(cfg: EvalConfig, out: Path, results: dict[str, Any]) -> None:
    """One MLflow run holding the table's numbers, the report and the first grid of each variant."""
    import os

    import mlflow
    from mlflow.entities import Metric, Param

    from training.tracking import ensure_experiment_at
    uri = cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(ensure_experiment_at(uri, cfg.experiment), run_name="sync-variants")
    rid, now = run.info.run_id, int(time.time() * 1000)
    metrics = [Metric(f"{name}/{k}", float(r[k]), now, 0) for name, r in results.items()
               for k in ("psnr", "ssim", "temporal_consistency_error", "multiview_consistency_error", "fvd", "lpips")
               if r[k] == r[k]]
    client.log_batch(rid, metrics=metrics, params=[Param(k, str(v)[:500]) for k, v in flatten(cfg).items()])
    client.log_artifact(rid, str(out / "report.md"))
    client.log_artifact(rid, str(out / "results.json"))
    for png in sorted(out.glob("*_grid0.png")):
        client.log_artifact(rid, str(png), artifact_path="grids")
    client.set_terminated(rid)


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(EvalConfig, {"default": EvalConfig}, argv, description=__doc__, default_preset="default")
    if not cfg.grids:
        raise UserError("give --grids: held-out grid shards with every cell rendered (e.g. a render job output)")
    evaluate(dataclasses.replace(cfg, out=str(Path(cfg.out).resolve())))
    return 0


if __name__ == "__main__":
    run_cli(main)
