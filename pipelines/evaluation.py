"""Evaluation as a library: held-out grids filled by every variant and scored per generated cell against the
truth, with the report, contact sheets and MLflow run. ``pipelines/evaluate_4d.py`` is its CLI."""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from model.fourd import TRAIN_FREE_SYNC_VARIANTS
from pipelines.common.config import (ConfigError, doc, ensure_output_dir, flatten, preset_table,
                                     write_resolved)
from pipelines.common.errors import UserError
from pipelines.generation import SamplerOptions


@dataclass
class EvalConfig(SamplerOptions):
    grids: list[str] = doc(text="held-out grid sets, comma-separated, each a path or name=path (a render output "
                                "folder, its shards/ folder or a tar glob), e.g. render=outputs/heldout_render,"
                                "pseudo4d=outputs/heldout_pseudo4d; each set is reported separately",
                           factory=list)
    checkpoints: list[str] = doc(text="trained variants as name=checkpoint (folder, model.pt or runs:/<id>)",
                                 factory=list)
    train_free: bool = doc(True, "also evaluate the training-free hard, soft and sequential variants on the "
                                 "first checkpoint's base")
    allow_train_items: bool = doc(False, "evaluate even when a held-out grid's item is among a checkpoint's "
                                         "training items (its scores then measure memorisation)")
    max_grids: int = doc(8, "held-out grids evaluated per set")
    items: list[str] = doc(text="evaluate only the grids of these items (comma-separated item ids, e.g. to score "
                                "and draw chosen grids again; default: every grid, up to --max-grids)",
                           factory=list)
    views: int = doc(0, "grid views evaluated (0 = the model's window)")
    frames: int = doc(0, "grid time steps evaluated (0 = the model's window)")
    compile: bool = doc(False, "torch.compile the models on a GPU (off: a few batches per variant do not repay "
                        "a compile per variant and batch shape, and parallel compiles starve other jobs' CPUs)")
    batch: int = doc(16, "held-out grids sampled together, one model call per step for all of them (a grid's "
                     "noise comes from its own seed, so the scores do not depend on it)")
    i3d_weights: str = doc("", "TorchScript I3D feature extractor for FVD (local path)")
    lpips_weights: str = doc("", "TorchScript LPIPS model (local path)")
    out: str = doc("outputs/eval", "report folder")
    mlflow_uri: str = doc("", "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite in the report folder; "
                          "'none': no tracking, report files only)")
    experiment: str = doc("4real-eval", "MLflow experiment")

    def validate(self) -> None:
        self.validate_sampler()
        if self.batch < 1:
            raise ConfigError(f"--batch must be >= 1 (grids sampled together), got {self.batch}")


PRESET_TABLE: dict[str, dict[str, Any]] = {
    # Tests: seconds on CPU. One grid per set, two Euler steps, report files only (no MLflow store).
    "tiny": dict(max_grids=1, steps=2, method="euler", batch=1, mlflow_uri="none", out="outputs/tiny/eval"),
    # `make demo` on 2 cores: 2 grids per set at 10 Euler steps, the demo's generation sampler.
    "demo": dict(max_grids=2, steps=10, method="euler", out="outputs/demo/eval"),
    # The proof run's evaluation (training/recipes/proof.py): 16 held-out grids per set, 20 Euler steps, the
    # sampler chosen on its validation sets (docs/results.md, step 'sampler').
    "proof": dict(max_grids=16, steps=20, method="euler", out="outputs/proof/eval"),
    # One GPU: twice the proof's grids per set (two batches), its sampler.
    "small": dict(max_grids=32, steps=20, method="euler", out="outputs/small/eval"),
    # A cluster's model: 64 grids per set; the sampler stays the one measured best (no paper-scale model has
    # been trained here to choose another on).
    "paper": dict(max_grids=64, steps=20, method="euler", out="outputs/paper/eval"),
}
"""The evaluate presets (pipelines.common.config.PRESET_NAMES), as field overrides of EvalConfig. A run without
--preset gets EvalConfig's own defaults, which are no preset."""

PRESETS: dict[str, Callable[[], EvalConfig]] = preset_table(EvalConfig, PRESET_TABLE)


# ---------------------------------------------------------------- held-out sets

_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # safe in file names and MLflow metric keys


def parse_grid_sets(grids: list[str] | str) -> dict[str, str]:
    """``--grids`` entries (a list, or one comma-separated string) -> {set name: shard spec}.

    ``name=path`` names a set; a bare path is named after its folder (the folder above
    ``shards/``, the folder of a tar glob), made unique with a numeric suffix.
    """
    entries = grids.split(",") if isinstance(grids, str) else [e for g in grids for e in str(g).split(",")]
    entries = [e.strip() for e in entries if e.strip()]
    if not entries:
        raise UserError("give --grids: held-out grid shards with every cell rendered (e.g. a render job output), "
                        "several as name=path,name=path")
    sets: dict[str, str] = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        name, path = name.strip(), path.strip()
        if sep:
            if not name or not path or not _NAME.fullmatch(name):
                raise UserError(f"--grids entry '{entry}' must be a path or name=path with a name of letters, "
                                "digits, '_', '-' or '.' (e.g. render=outputs/heldout_render)")
            if name in sets:
                raise UserError(f"--grids names the set '{name}' twice; give each held-out set its own name")
        else:
            path, name = entry, _derived_name(entry)
            base, k = name, 2
            while name in sets:
                name, k = f"{base}_{k}", k + 1
        sets[name] = path
    return sets


def _derived_name(spec: str) -> str:
    parts = [p for p in Path(spec).parts if p not in ("", "/", ".")]
    while parts and (any(c in parts[-1] for c in "*?[{") or parts[-1].endswith(".tar") or parts[-1] == "shards"):
        parts.pop()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", parts[-1]).strip("_.") if parts else ""
    return name or "heldout"


def heldout_grids(spec: str, limit: int, skipped: dict[str, int],
                  items: list[str] | None = None) -> list[tuple[str, Any]]:
    """The first ``limit`` grids of ``spec`` (only those of ``items``, when given). Grids the render job's filters
    marked bad (empty, leaving the frame, static, distorted) are skipped as the training loader skips them: a
    blank or broken held-out grid would score every variant on nothing. ``skipped`` counts them by reason."""
    from pipelines.common.shards import LazyGrid, filtered_reason, iter_tar_samples, resolve_shards
    grids = []
    for shard in resolve_shards(spec):
        for key, files in iter_tar_samples(shard):
            grid = LazyGrid(files)
            if items and str(grid.meta.get("item_id")) not in items:
                continue
            reason = filtered_reason(grid.meta)
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            grids.append((key, grid))
            if len(grids) >= limit:
                return grids
    if not grids and skipped:
        raise UserError(f"every grid in '{spec}' was marked bad by the render job's filters ("
                        + ", ".join(f"{n} {r}" for r, n in sorted(skipped.items()))
                        + "); render more held-out assets, or render them again into a new --output with --filters '' "
                        "to keep them")
    if items and len(grids) < min(limit, len(items)):
        found = {str(g.meta.get("item_id")) for _, g in grids}
        raise UserError(f"--items: no grid of {', '.join(sorted(set(items) - found))} in '{spec}' (or only "
                        "grids its render filters marked); the set's index.parquet lists its items")
    if not grids:
        raise UserError(f"no grids in '{spec}'")
    return grids


def object_mask(frames: np.ndarray, height: int, width: int) -> torch.Tensor | None:
    """The object's pixels, alpha > 0.5, of uint8 RGBA cells [..., H, W, 4] -> bool [..., 1, height, width].

    The alpha goes through the very resize and centre crop of the colour
    (``pipelines.common.shards.to_tensor``, as a 3-channel image), so mask and cells align.
    None for cells without alpha (pseudo-4D grids): object PSNR is then n/a.
    """
    from pipelines.generation import frames_to_tensor
    if frames.shape[-1] != 4:
        return None
    alpha = np.repeat(frames[..., 3:4], 3, axis=-1)
    return (frames_to_tensor(alpha, height, width)[..., :1, :, :] + 1) / 2 > 0.5


# ---------------------------------------------------------------- variants

def given_mask(views: int, frames: int) -> torch.Tensor:
    """[V, T] with the first row (fixed-view video) and the first column (freeze-time video) given."""
    from model.fourd import grid_condition_mask
    return grid_condition_mask(1, views, frames)[0]


def copy_first_row(row: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """Baseline: cell (v, t) := cell (0, t), i.e. the scene never changes with the view; given cells kept."""
    grid = row[None].repeat(column.shape[0], *[1] * row.dim())
    grid[:, 0] = column
    grid[0] = row
    return grid


def copy_first_column(row: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """Baseline: cell (v, t) := cell (v, 0), i.e. nothing moves in time; given cells kept."""
    grid = column[:, None].repeat(1, row.shape[0], *[1] * (row.dim() - 1))
    grid[0] = row
    return grid


BASELINES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "copy_first_row": copy_first_row, "copy_first_column": copy_first_column,
}
"""Model-free variants ((row [T, 3, H, W], column [V, 3, H, W]) -> grid [V, T, 3, H, W]): the floor any 4D
model must clear. They run through the same loop and metrics as the models."""

PAIRED_REFERENCE = "copy_first_row"
"""The baseline every model row is also compared with grid by grid in the report. A set's grids differ far more
among themselves (an object alike from every view copies at 37 dB, one that is not at 23) than two variants differ
on one grid, so a mean margin over a few grids says little until the per-grid differences are seen."""

PAIRED_METRICS = ("psnr", "ssim")


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """``a`` minus ``b``, grid by grid (both over the same grids, in the same order): the differences' mean and
    sample standard deviation, ``t`` (the mean over its standard error, with ``grids`` - 1 degrees of freedom:
    from about 30 grids up, |t| above 2 is a margin that more grids of the same kind would keep; with a handful
    of grids it takes far more), and on how many grids ``a`` is higher. ``std`` and ``t`` are NaN for one grid;
    ``t`` is +-inf when every grid differs by the same non-zero amount, NaN when by none."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired comparison needs the same grids on both sides, got {len(a)} and {len(b)}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    std = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
    mean = float(d.mean())
    if std > 0:
        t = mean / (std / np.sqrt(len(d)))
    else:  # one grid (NaN std), or identical differences: a margin with no spread
        t = float("nan") if std != std or mean == 0 else math.copysign(math.inf, mean)
    return {"mean": mean, "std": std, "t": float(t), "better": int((d > 0).sum()), "grids": len(d)}


def paired_metrics(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Two rows of one set (``a`` minus ``b``), grid by grid, per ``PAIRED_METRICS``."""
    return {m: paired([g[m] for g in a["per_grid"]], [g[m] for g in b["per_grid"]]) for m in PAIRED_METRICS}


def paired_rows(rows: dict[str, dict[str, Any]], reference: str = PAIRED_REFERENCE) -> dict[str, dict[str, Any]]:
    """Every model row of one set against ``reference`` (a row of the same set), per ``PAIRED_METRICS``:
    ``{variant: {metric: paired(...)}}``; empty when the set has no such row or fewer than two grids. A row scored
    on another window of the grids (views x frames: a checkpoint trained on another window than the first, whose
    window the baselines use) is left out: its cells are not the reference's."""
    ref = rows.get(reference)
    if ref is None or len(ref["per_grid"]) < 2:
        return {}
    return {name: paired_metrics(r, ref) for name, r in rows.items()
            if r.get("kind") == "model" and (r.get("views"), r.get("frames")) == (ref.get("views"), ref.get("frames"))}


# (rows [B, T, 3, H, W], columns [B, V, 3, H, W] in [-1, 1], seeds) -> (grids [B, V, T, 3, H, W], given [V, T])
Filler = Callable[[torch.Tensor, torch.Tensor, list[int]], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Variant:
    """One table row: a model (checkpoint + sync override) or a baseline (a ``BASELINES`` key)."""

    name: str
    checkpoint: str = ""
    sync: str = ""
    baseline: str = ""


def parse_checkpoints(entries: list[str] | str, example: str = "soft=runs/soft/checkpoint_final") -> dict[str, str]:
    """``--checkpoints`` entries (a list, or one comma-separated string) -> {name: checkpoint}, in the order given.

    Every tool that compares named checkpoints (evaluate_4d.py, benchmarks/base_heldout.py) parses them here, so
    they take and refuse the same text: each entry is ``name=path``, names are unique and made of letters,
    digits, '_', '-' or '.' (they become file names and report columns).
    """
    items = entries.split(",") if isinstance(entries, str) else [e for g in entries for e in str(g).split(",")]
    out: dict[str, str] = {}
    for item in filter(None, (i.strip() for i in items)):
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise UserError(f"--checkpoints entry '{item}' must look like name=path (e.g. {example})")
        if not _NAME.fullmatch(name):
            raise UserError(f"--checkpoints name '{name}' may hold only letters, digits, '_', '-' and '.'")
        if name in out:
            raise UserError(f"--checkpoints names '{name}' twice; give each checkpoint its own name")
        out[name] = path
    if not out:
        raise UserError(f"give at least one --checkpoints name=path (e.g. {example})")
    return out


def plan_variants(cfg: EvalConfig) -> list[Variant]:
    """The trained variants given, the training-free ones on the first checkpoint, then the baselines."""
    trained = parse_checkpoints(cfg.checkpoints)  # names checked there: unique, safe in file and metric names
    taken = (TRAIN_FREE_SYNC_VARIANTS if cfg.train_free else ()) + tuple(BASELINES)
    for name in trained:
        if name in taken:
            raise UserError(f"two variants are named '{name}'; rename the --checkpoints entry (the names "
                            f"{', '.join(taken)} are taken)")
    out = [Variant(name, path) for name, path in trained.items()]
    if cfg.train_free:
        out += [Variant(sync, out[0].checkpoint, sync) for sync in TRAIN_FREE_SYNC_VARIANTS]
    return out + [Variant(name, baseline=name) for name in BASELINES]


# ---------------------------------------------------------------- training items

def check_train_items(variant: str, data_items: dict[str, Any] | None, heldout_items: dict[str, str],
                      allow: bool) -> list[str]:
    """Held-out items the variant was trained on; refuses (UserError) unless ``allow``.

    ``heldout_items`` maps item id -> where it was found (set and grid key). A
    checkpoint without ``data_items`` cannot be checked: the caller warns.
    """
    if not data_items:
        return []
    trained = set(data_items.get("items", ()))
    overlap = sorted(i for i in heldout_items if i in trained)
    if overlap and not allow:
        more = f" and {len(overlap) - 1} more held-out item(s)" if len(overlap) > 1 else ""
        raise UserError(f"variant '{variant}' was trained on item '{overlap[0]}' ({heldout_items[overlap[0]]}){more}"
                        ", so its scores would measure memorisation; evaluate on held-out data rendered with other "
                        "seeds/assets, or pass --allow-train-items true to override knowingly")
    return overlap


def _checkpoint_info(spec: str, cache: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Resolve a checkpoint once (runs:/ downloads here) and read its training items and geometry.

    Memory-mapped, so a large checkpoint is not read twice (Generator4D loads it for real).
    """
    if spec in cache:
        return cache[spec]
    from pipelines.generation import checkpoint_geometry
    from pipelines.common.checkpoints import load_checkpoint, resolve_checkpoint
    path = resolve_checkpoint(spec)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:
        ckpt = load_checkpoint(str(path))  # raises its one-line UserError
    window, size = checkpoint_geometry(ckpt)
    cache[spec] = info = {"path": str(path), "data_items": ckpt.get("data_items"), "window": window, "size": size}
    return info


# ---------------------------------------------------------------- evaluation

def _filler(variant: Variant, info: dict[str, Any] | None, cfg: EvalConfig) -> Filler:
    if variant.baseline:
        copy = BASELINES[variant.baseline]
        return lambda rows, columns, seeds: (torch.stack([copy(r, c) for r, c in zip(rows, columns)]),
                                             given_mask(columns.shape[1], rows.shape[1]))
    from pipelines.generation import GenerateConfig, Generator4D
    assert info is not None
    gen = Generator4D(GenerateConfig(checkpoint=info["path"], sync=variant.sync, steps=cfg.steps,
                                     method=cfg.method, shift=cfg.shift, device=cfg.device,
                                     compile=cfg.compile, window_plan=cfg.window_plan))
    return gen.generate_batch


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    from pipelines.common.visuals import contact_sheet, to_uint8
    from pipelines.eval_metrics import METRICS, GridSample, MissingWeights, grid_report, spread
    from pipelines.generation import frames_to_tensor

    cfg.validate()  # parse_config already did, for the command line; evaluate() is also a library call
    if cfg.mlflow_uri.lower() != "none":  # found missing after the grids are scored, it would cost the run
        from pipelines.common.errors import require
        require("mlflow")
    # config.yaml is written with the report, not before: a failed run leaves the folder's config describing
    # the report that is there
    out = ensure_output_dir(Path(cfg.out).resolve())
    sets = parse_grid_sets(cfg.grids)
    variants = plan_variants(cfg)
    skipped: dict[str, dict[str, int]] = {name: {} for name in sets}
    heldout = {name: heldout_grids(spec, cfg.max_grids, skipped[name], cfg.items) for name, spec in sets.items()}
    notes: dict[str, str] = {}
    for name, counts in skipped.items():
        if counts:
            notes[f"filtered_{name}"] = (f"held-out set '{name}': skipped " + ", ".join(
                f"{n} grid(s) marked {r}" for r, n in sorted(counts.items())) + " by the render job's filters")

    # Refuse training data before spending any time on generation.
    heldout_items: dict[str, str] = {}
    unlabelled = 0
    for set_name, grids in heldout.items():
        for key, grid in grids:
            item = grid.meta.get("item_id")
            if item is None:
                unlabelled += 1
            else:
                heldout_items.setdefault(str(item), f"held-out set '{set_name}', grid {key}")
    if unlabelled:
        notes["unlabelled_grids"] = f"{unlabelled} held-out grid(s) carry no item_id; they could not be checked " \
                                    "against the checkpoints' training items"
    infos: dict[str, dict[str, Any]] = {}
    warned: set[str] = set()
    for v in variants:
        if not v.checkpoint:
            continue
        info = _checkpoint_info(v.checkpoint, infos)
        if info["data_items"] is None:
            if v.checkpoint not in warned:
                warned.add(v.checkpoint)
                print(f"[eval] warning: checkpoint {v.checkpoint} records no training items (data_items); cannot "
                      "verify that the held-out grids were not trained on", file=sys.stderr, flush=True)
                notes[f"train_items/{v.name}"] = "checkpoint records no training items: not verified held-out"
            continue
        overlap = check_train_items(v.name, info["data_items"], heldout_items, cfg.allow_train_items)
        if overlap:
            notes[f"train_items/{v.name}"] = (f"trained on {len(overlap)} held-out item(s) ({', '.join(overlap[:5])}"
                                              f"{', ...' if len(overlap) > 5 else ''}); evaluated anyway "
                                              "(--allow-train-items)")
    first = infos[variants[0].checkpoint]

    truths: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def truth_of(set_name: str, i: int, V: int, T: int, size: tuple[int, int]):
        k = (set_name, i, V, T, size)
        if k not in truths:
            key, grid = heldout[set_name][i]
            gv, gt = grid.shape
            if gv < V or gt < T:
                raise UserError(f"held-out grid {key} of set '{set_name}' is {gv}x{gt}, smaller than the evaluated "
                                f"{V}x{T}; pass --views/--frames or render larger grids")
            cells = grid.cells(range(V), range(T))
            truths[k] = (frames_to_tensor(cells, *size), object_mask(cells, *size))
        return truths[k]

    weights = {"i3d": cfg.i3d_weights, "lpips": cfg.lpips_weights}
    results: dict[str, dict[str, Any]] = {name: {} for name in sets}
    for variant in variants:
        info = infos[variant.checkpoint] if variant.checkpoint else None
        window, size = (info or first)["window"], (info or first)["size"]
        V, T = cfg.views or window[0], cfg.frames or window[1]
        fill = _filler(variant, info, cfg)
        for set_name, grids in heldout.items():
            t0 = time.time()
            reports, samples = [], []
            for start in range(0, len(grids), cfg.batch):
                idx = range(start, min(start + cfg.batch, len(grids)))
                batch = [truth_of(set_name, i, V, T, size) for i in idx]
                truth = torch.stack([t for t, _ in batch])
                filled, given = fill(truth[:, 0], truth[:, :, 0], [cfg.seed + i for i in idx])
                for i, (one, (cells, objects)) in zip(idx, zip(filled, batch)):
                    sample = GridSample((one + 1) / 2, (cells + 1) / 2, given, objects)
                    key, grid = grids[i]  # which grid each score is, for per-grid comparisons and pictures
                    reports.append({"item": str(grid.meta.get("item_id", key)), "key": key,
                                    **grid_report(sample.gen, sample.truth, given, objects)})
                    samples.append(sample)
                    if i == 0:
                        contact_sheet(to_uint8(torch.cat([cells, one])), out / f"{set_name}__{variant.name}_grid0.png",
                                      given=torch.cat([given, given]).numpy().astype(bool))
            row: dict[str, Any] = {"grids": len(reports), "views": V, "frames": T,
                                   "kind": "baseline" if variant.baseline else "model",
                                   "checkpoint": variant.checkpoint, "sync": variant.sync or None,
                                   "train_items_digest": ((info or {}).get("data_items") or {}).get("digest")}
            for name, metric in METRICS.items():
                if metric.per_grid:
                    s = spread([r[name] for r in reports])
                    row[name] = s.pop("mean")
                    row.update({f"{name}_{k}": x for k, x in s.items()})
                else:
                    try:
                        row[name] = metric.fn(samples, weights)
                    except MissingWeights as exc:
                        row[name], notes[name] = float("nan"), str(exc)
            row["seconds"] = time.time() - t0
            row["per_grid"] = reports
            results[set_name][variant.name] = row
            print(f"[eval] {set_name}/{variant.name}: PSNR {_fmt(row['psnr'], 2)} dB, SSIM {_fmt(row['ssim'], 4)} "
                  f"over {len(reports)} grids ({row['seconds']:.1f}s)", flush=True)
    set_info = {name: {"grids": sets[name], "count": len(heldout[name]), "skipped_filtered": skipped[name],
                       "items": sorted({str(g.meta["item_id"]) for _, g in heldout[name] if "item_id" in g.meta})}
                for name in sets}
    report = _markdown(results, set_info, notes)
    (out / "report.md").write_text(report)
    payload = {"sets": set_info, "results": results, "notes": notes}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=float))
    write_resolved(cfg, out)
    _log_mlflow(cfg, out, results)
    print(report)
    print(f"[eval] report: {out / 'report.md'}")
    return payload


def _fmt(x: float | None, digits: int) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def format_cell(row: dict[str, Any], name: str) -> str:
    """A table cell: 'mean ± std [min, max]' for per-grid metrics, the value for set-level ones."""
    from pipelines.eval_metrics import METRICS
    m = METRICS[name]
    mean = row.get(name, float("nan"))
    if not m.per_grid or mean != mean:
        return _fmt(mean, m.digits)
    text = _fmt(mean, m.digits)
    if row.get(f"{name}_std", float("nan")) == row.get(f"{name}_std", float("nan")):
        text += f" ± {_fmt(row[f'{name}_std'], m.digits)}"
    return text + f" [{_fmt(row[f'{name}_min'], m.digits)}, {_fmt(row[f'{name}_max'], m.digits)}]"


def _markdown(results: dict[str, dict[str, Any]], set_info: dict[str, dict[str, Any]], notes: dict[str, str]) -> str:
    from pipelines.eval_metrics import METRICS
    lines = ["# 4D evaluation", ""]
    header = "| variant | grids | " + " | ".join(m.label for m in METRICS.values()) + " |"
    rule = "| " + " | ".join(["---"] * (len(METRICS) + 2)) + " |"
    for set_name, rows in results.items():
        lines += [f"## {set_name}: `{set_info[set_name]['grids']}`", "", header, rule]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['grids']} | " + " | ".join(format_cell(r, k) for k in METRICS) + " |")
        lines.append("")
        pairs = paired_rows(rows)
        if pairs:
            lines += [f"Grid by grid against {PAIRED_REFERENCE}: the difference's mean ± std, t (mean over its "
                      "standard error) and the grids where the variant is higher.", "",
                      "| variant | " + " | ".join(f"{METRICS[m].label.rstrip(' ↑')} diff | t | higher on"
                                                   for m in PAIRED_METRICS) + " |",
                      "| " + " | ".join(["---"] * (1 + 3 * len(PAIRED_METRICS))) + " |"]
            for name, p in pairs.items():
                cells = [f"{_fmt(p[m]['mean'], METRICS[m].digits)} ± {_fmt(p[m]['std'], METRICS[m].digits)} | "
                         f"{_fmt(p[m]['t'], 1)} | {p[m]['better']} / {p[m]['grids']}" for m in PAIRED_METRICS]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["Per-grid metrics: mean ± std [min, max] over the set's grids (std needs two grids). All metrics are "
              "over generated cells only (the given first row and column excluded): PSNR/SSIM per cell; object "
              "PSNR over the object's pixels (ground-truth alpha > 0.5, renders only); consistency errors: mean "
              "|change between neighbouring cells| difference to the ground truth along rows (time) and columns "
              "(views), over neighbour pairs with at least one generated cell; HF energy: mean squared Laplacian "
              "relative to the ground truth's (< 1 = blurrier). copy_first_row / copy_first_column copy the "
              "nearest given cell (no model)."]
    lines += [f"- {k}: {v}" for k, v in notes.items()]
    return "\n".join(lines) + "\n"


def _log_mlflow(cfg: EvalConfig, out: Path, results: dict[str, dict[str, Any]]) -> None:
    """One MLflow run holding the tables' numbers (``<set>/<variant>/<metric>``), the report and first grids."""
    if cfg.mlflow_uri.lower() == "none":  # tracking off (e.g. a GPU node without MLflow): files only
        return
    import mlflow
    from mlflow.entities import Metric, Param

    from pipelines.eval_metrics import METRICS
    from pipelines.common.tracking import default_uri, ensure_experiment_at
    uri = default_uri(cfg.mlflow_uri, out)
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(ensure_experiment_at(uri, cfg.experiment), run_name="sync-variants")
    rid, now = run.info.run_id, int(time.time() * 1000)
    metrics = []
    for set_name, rows in results.items():
        for variant, r in rows.items():
            for name, m in METRICS.items():
                keys = [name] + ([f"{name}_{k}" for k in ("std", "min", "max")] if m.per_grid else [])
                metrics += [Metric(f"{set_name}/{variant}/{k}", float(r[k]), now, 0) for k in keys
                            if r.get(k) is not None and r[k] == r[k]]
        for variant, p in paired_rows(rows).items():
            metrics += [Metric(f"{set_name}/{variant}/{m}_vs_{PAIRED_REFERENCE}{suffix}", float(p[m][k]), now, 0)
                        for m in PAIRED_METRICS for k, suffix in (("mean", ""), ("t", "_t"))
                        if p[m][k] == p[m][k]]
    params = [Param(k, str(v)[:500]) for k, v in flatten(cfg).items()]
    for i in range(0, max(len(metrics), 1), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(rid, metrics=metrics[i:i + 1000], params=params if i == 0 else [])
    client.log_artifact(rid, str(out / "report.md"))
    client.log_artifact(rid, str(out / "results.json"))
    for png in sorted(out.glob("*_grid0.png")):
        client.log_artifact(rid, str(png), artifact_path="grids")
    client.set_terminated(rid)
