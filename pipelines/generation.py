"""Generation as a library: the 4D model (and upsampler) loaded from checkpoints, grids filled by sliding
windows, outputs written, and the Ray Data batch path. ``pipelines/generate_4d.py`` is its CLI; evaluation
and the demo import this module."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from model.rectified_flow import SAMPLER_METHODS
from model.sliding_window import WINDOW_PLANS
from pipelines.common.config import ConfigError, check_choices, doc, preset_table
from pipelines.common.errors import UserError


@dataclass
class SamplerOptions:
    """The 4D sampler's options, one definition for generation and evaluation (both configs inherit them)."""

    steps: int = doc(20, "sampling steps of the 4D model")
    method: Literal[SAMPLER_METHODS] = doc("euler", "sampler: Euler (one model call per step) or Heun (two). "
                                           "Euler at 20 steps scored above Heun at 20 and both at 50 on the "
                                           "proof run's validation sets, at half Heun's cost (docs/results.md)")
    shift: float = doc(0.0, "noise-level shift of the 4D sampler's schedule (0 = the flow_shift the model was "
                       "trained with, from its checkpoint)")
    seed: int = doc(0, "noise seed (evaluation: the same for every variant)")
    device: str = doc("auto", "cuda, cpu or auto")
    window_plan: Literal[tuple(WINDOW_PLANS)] = doc(
        "even", "how sliding windows tile a grid larger than the model's: even (windows of about equal length "
        "sharing one row/column, every generated frame kept) or flush (full-size windows, the last flush with "
        "the edge: what it regenerates under its overlap is discarded, which left a seam between the last two "
        "views; the same PSNR: docs/results.md, 'Sliding windows')")

    def validate_sampler(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {self.steps}")
        if self.shift < 0:
            raise ConfigError(f"--shift must be positive (or 0 for the model's own), got {self.shift}")
        check_choices(self)


@dataclass
class GenerateConfig(SamplerOptions):
    checkpoint: str = doc("", "4D checkpoint: a checkpoint_final folder, model.pt, or runs:/<mlflow run id>")
    sync: str = doc("", "override the checkpoint's sync variant (e.g. train_free_soft or train_free_sequential "
                     "on a base checkpoint)")
    upsampler: str = doc("", "optional x4 upsampler checkpoint (folder, model.pt or runs:/<id>)")
    fixed_view: str = doc("", "first row: a video file or a folder of images (time runs, view fixed)")
    freeze_time: str = doc("", "first column: a video file or a folder of images (time frozen, camera moves)")
    from_grid: str = doc("", "take the first row and column of the first grid in these shards instead")
    manifest: str = doc("", "batch mode: Parquet with columns fixed_view, freeze_time, name (Ray Data, one model "
                        "per actor)")
    out: str = doc("outputs/generated", "output folder")
    views: int = doc(0, "grid views V to generate (0 = length of the freeze-time video)")
    frames: int = doc(0, "grid time steps T (0 = length of the fixed-view video)")
    upsampler_steps: int = doc(0, "sampling steps of the upsampler (0 = its own default, saved with it: 2 for "
                               "the proof upsampler, chosen on validation clips; docs/results.md, run 6)")
    overlap: int = doc(1, "rows/columns shared by neighbouring sliding windows")
    corner_psnr: float = doc(20.0, "the two inputs' first frames must agree to this PSNR (dB) after resizing")
    fps: int = doc(8, "frame rate of the MP4s")
    compile: bool = doc(True, "torch.compile the model's blocks on a GPU: pays off over many grids of one size "
                        "(each new batch or window shape compiles again; even windows of a larger grid take up "
                        "to four shapes, e.g. 6x6, 6x7, 7x6 and 7x7 at 12 x 30)")
    concurrency: int = doc(1, "batch mode: model actors")
    gpus_per_actor: float = doc(0.0, "batch mode: GPUs per actor (1 on GPU nodes)")

    def validate(self) -> None:
        """Checked when the options are parsed, before any model is loaded (a negative --views used to run on
        and slice the grid from its end)."""
        for name in ("views", "frames", "overlap"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be 0 or more, got {getattr(self, name)}")
        if self.upsampler_steps < 0:
            raise ConfigError(f"--upsampler-steps must be 0 (the upsampler's own) or more, got {self.upsampler_steps}")
        for name in ("fps", "concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        self.validate_sampler()
        if self.views == 1 or self.frames == 1:
            raise ConfigError("--views and --frames must be at least 2 (a 4D grid has a given first row and "
                              "column and something to generate), or 0 for the inputs' lengths")


PRESET_TABLE: dict[str, dict[str, Any]] = {
    # Tests: seconds on CPU. Two Euler steps (one model call each) and one upsampler step: enough to run every
    # path (sliding windows, upsampler, outputs) whatever the result looks like.
    "tiny": dict(steps=2, method="euler", upsampler_steps=1, compile=False, out="outputs/tiny/generated"),
    # `make demo` on 2 cores: 10 Euler steps, what the demo runs the shipped proof model with (pipelines/demo.py).
    "demo": dict(steps=10, method="euler", compile=False, out="outputs/demo/generated"),
    # The proof run's sampler: 20 Euler steps, chosen on its validation sets over heun:20 and the 50-step ones
    # (docs/results.md, step 'sampler'); the upsampler at its own saved steps.
    "proof": dict(steps=20, method="euler", out="outputs/proof/generated"),
    # One GPU: the proof's measured sampler; a --manifest batch runs one actor on the GPU.
    "small": dict(steps=20, method="euler", concurrency=1, gpus_per_actor=1.0, out="outputs/small/generated"),
    # A cluster: --manifest batches over 8 GPU actors. The sampler stays the one measured best (no paper-scale
    # model has been trained here to choose another on).
    "paper": dict(steps=20, method="euler", concurrency=8, gpus_per_actor=1.0, out="outputs/paper/generated"),
}
"""The generate presets (pipelines.common.config.PRESET_NAMES), as field overrides of GenerateConfig. A run
without --preset gets GenerateConfig's own defaults, which are no preset."""

PRESETS: dict[str, Callable[[], GenerateConfig]] = preset_table(GenerateConfig, PRESET_TABLE)


def _read_image(file: Path, folder: str) -> np.ndarray:
    """One image of a user's input folder -> uint8 [H, W, 3]; a file PIL cannot decode is the user's to fix (a
    UserError naming it), not a crash: in a batch it would otherwise fail the whole Ray task."""
    from PIL import Image
    try:
        with Image.open(file) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"could not decode image '{file}' of input '{folder}' ({type(exc).__name__}: {exc}); "
                        "replace or remove the file") from None


def read_frames(path: str) -> np.ndarray:
    """A video file or a folder of images -> uint8 [N, H, W, 3]."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"input '{path}' does not exist; pass a video file or a folder of images")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if not files:
            raise UserError(f"folder '{path}' holds no .png/.jpg images")
        frames = [_read_image(f, path) for f in files]
        if len({f.shape for f in frames}) != 1:
            raise UserError(f"images in '{path}' differ in size; all frames of an input must have one size")
        return np.stack(frames)
    import av
    try:
        with av.open(str(p)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise UserError(f"could not decode video '{path}' ({exc}); pass an mp4/webm/mov/avi or an image folder") \
            from None
    if not frames:
        raise UserError(f"video '{path}' has no frames")
    return np.stack(frames)


def frames_to_tensor(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    from pipelines.common.shards import to_tensor
    import random
    return to_tensor(frames, height, width, "white", random.Random(0))


def checkpoint_geometry(ckpt: dict[str, Any]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(views, frames) of the trained window and (height, width) of the frames, from a checkpoint's training config."""
    train_cfg = ckpt.get("config", {}).get("data", {})
    return ((int(train_cfg.get("views", 8)), int(train_cfg.get("frames", 8))),
            (int(train_cfg.get("height", 72)), int(train_cfg.get("width", 128))))


class Generator4D:
    """Loads the 4D model (and optional upsampler) once; fills grids of any size."""

    def __init__(self, cfg: GenerateConfig) -> None:
        from model.fourd import SYNC_VARIANTS, TRAIN_FREE_SYNC_VARIANTS, FourDConfig, FourDModel
        from pipelines.common.checkpoints import (BASE_PREFIX, base_from_checkpoint, load_checkpoint, sync_state,
                                                  upsampler_from_checkpoint)
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if cfg.device == "auto" else cfg.device))
        ckpt = load_checkpoint(cfg.checkpoint)
        if ckpt["stage"] not in ("4d", "base"):
            raise UserError(f"checkpoint '{cfg.checkpoint}' holds a '{ckpt['stage']}' model; pass a 4D checkpoint "
                            f"(or a base checkpoint with --sync {' / '.join(TRAIN_FREE_SYNC_VARIANTS)})")
        fourd_cfg = dict(ckpt.get("fourd_config", {"sync": "train_free_soft"}))
        own_sync = fourd_cfg.get("sync", FourDConfig.sync)  # what the checkpoint was trained (or exported) as
        if cfg.sync:
            if cfg.sync not in SYNC_VARIANTS:  # FourDConfig would raise a bare ValueError
                raise UserError(f"--sync {cfg.sync} is no sync variant; use one of {', '.join(SYNC_VARIANTS)}")
            fourd_cfg["sync"] = cfg.sync
        asked = fourd_cfg["sync"]
        if ckpt["stage"] == "base" and asked not in TRAIN_FREE_SYNC_VARIANTS:
            raise UserError("a base checkpoint has no synchronization layers; use --sync "
                            f"{' / '.join(TRAIN_FREE_SYNC_VARIANTS)}, or pass a 4D checkpoint")
        if ckpt["stage"] == "4d" and asked != own_sync and asked not in TRAIN_FREE_SYNC_VARIANTS:
            # Another trained variant's layers are not in this checkpoint: they would run at their initial
            # values while the outputs say "sync: <variant>" (checked before the base is built: it costs nothing).
            raise UserError(f"--sync {asked} asks for trained '{asked}' sync layers, but checkpoint "
                            f"'{cfg.checkpoint}' holds '{own_sync}' ones; pass the checkpoint trained with sync "
                            f"'{asked}', drop --sync to run its own '{own_sync}', or use a "
                            f"training-free variant ({' / '.join(TRAIN_FREE_SYNC_VARIANTS)})")
        base = base_from_checkpoint(ckpt, cfg.checkpoint)
        model = FourDModel(base, FourDConfig(**fourd_cfg))
        if ckpt["stage"] == "4d":
            # strict=False: the base is loaded above (its keys are all "missing" here), and a training-free
            # override leaves the checkpoint's own sync layers unused ("unexpected"). Every sync layer the model
            # has must come from the checkpoint, though: a missing one would run untrained.
            missing, unexpected = model.load_state_dict(sync_state(ckpt), strict=False)
            missing_sync = [k for k in missing if not k.startswith(BASE_PREFIX)]
            if missing_sync:
                raise UserError(f"checkpoint '{cfg.checkpoint}' lacks {len(missing_sync)} weights of its "
                                f"'{asked}' sync layers (e.g. {missing_sync[:3]}); they would run "
                                "untrained. Re-export it from its training run")
            if unexpected and asked == own_sync:
                raise UserError(f"checkpoint '{cfg.checkpoint}' does not match the 4D model "
                                f"(unexpected {unexpected[:3]})")
        self.model = model.to(self.device).eval()
        # The measured fast path (docs/performance.md): bf16 autocast and compiled blocks on GPUs.
        self.autocast = self.device.type == "cuda"
        if self.autocast and cfg.compile:
            self.model.compile_blocks()
        self.window, self.size = checkpoint_geometry(ckpt)
        self.sync = asked
        self.shift = cfg.shift or base.cfg.flow_shift
        # the training items (and the base's) when the checkpoint records them: evaluation refuses to score on them
        self.data_items: dict[str, Any] | None = ckpt.get("data_items")
        self.upsampler = None
        if cfg.upsampler:
            self.upsampler = upsampler_from_checkpoint(load_checkpoint(cfg.upsampler), cfg.upsampler)
            self.upsampler.to(self.device).eval()

    @torch.no_grad()
    def generate(self, row: torch.Tensor, column: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """row [T, 3, H, W], column [V, 3, H, W] in [-1, 1] -> grid [V, T, 3, H', W'] and the given mask [V, T]."""
        grids, known = self.generate_batch(row[None], column[None], [seed])
        return grids[0], known

    @torch.no_grad()
    def generate_batch(self, rows: torch.Tensor, columns: torch.Tensor,
                       seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [B, T, 3, H, W], columns [B, V, 3, H, W] -> grids [B, V, T, 3, H', W'] and the given mask [V, T].

        The B grids are sampled together, one model call per step for all of them: a proof-size grid leaves a
        GPU mostly idle, so evaluating 16 grids at once costs little more than one. Each grid draws its noise
        from its own seed, so a grid comes out the same whatever batch it is sampled in (up to the arithmetic's
        rounding; ``generate`` is a batch of one).
        """
        from model import rectified_flow as rf
        from model.fourd import grid_condition_mask
        from model.sliding_window import fill_grid
        B, V, T = rows.shape[0], columns.shape[1], rows.shape[1]
        if columns.shape[0] != B or len(seeds) != B:
            raise ValueError(f"{B} rows need as many columns and seeds, got {columns.shape[0]} and {len(seeds)}")
        grid = torch.zeros(B, V, T, *rows.shape[2:])
        grid[:, 0] = rows
        grid[:, :, 0] = columns
        grid[:, 0, 0] = rows[:, 0]  # the corner is the fixed-view video's first frame
        known = grid_condition_mask(B, V, T)
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]

        def window_fn(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            x, mask = x.to(self.device), mask.to(self.device)
            noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                out = rf.sample(lambda xt, t, c, m: self.model(xt, t, cond=c, mask=m).float(), noise,
                                self.cfg.steps, method=self.cfg.method, cond=x, mask=mask, shift=self.shift)
            return out.float().cpu()
        filled, _ = fill_grid(grid, known, self.window, window_fn, (self.cfg.overlap, self.cfg.overlap),
                              self.cfg.window_plan)
        filled = filled.clamp(-1, 1)
        if self.upsampler is not None:
            # Every row is a fixed-view video: a grid's rows go in as one batch [V, T, C, h, w] (clips inside,
            # batched). Shared noise: all views start from the same draw, so views that agree at low res
            # also agree in the detail the upsampler invents (independent draws flicker from view to view).
            # The condition is corrupted at the level the upsampler was trained for (its sample_aug_level).
            ups = []
            for b in range(B):
                up_gen = torch.Generator(device=self.device).manual_seed(seeds[b])
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                    ups.append(self.upsampler.upsample(filled[b].to(self.device), self.cfg.upsampler_steps or None,
                                                       self.cfg.method, generator=up_gen,
                                                       aug_level=self.upsampler.cfg.sample_aug_level,
                                                       shared_noise=True).float().cpu())
            filled = torch.stack(ups)
        return filled, known[0]


def check_corner(row0: np.ndarray, col0: np.ndarray, size: tuple[int, int], min_psnr: float) -> float:
    """The two inputs must start on the same frame (the grid's corner); returns their PSNR."""
    from pipelines.eval_metrics import psnr
    a = (frames_to_tensor(row0[None], *size) + 1) / 2
    b = (frames_to_tensor(col0[None], *size) + 1) / 2
    value = float(psnr(a, b)[0])
    if value < min_psnr:
        raise UserError(f"the fixed-view and freeze-time inputs do not share their first frame (PSNR {value:.1f} dB "
                        f"< {min_psnr} dB); both must start at the grid's corner: the same moment from the same "
                        "camera. Trim one input or pass --corner-psnr to loosen the check")
    return value


def write_outputs(grid: torch.Tensor, given: torch.Tensor, out: Path, fps: int, meta: dict[str, Any]) -> dict:
    from PIL import Image

    from pipelines.common.visuals import contact_sheet, grid_videos, to_uint8
    import shutil
    out.mkdir(parents=True, exist_ok=True)
    frames = to_uint8(grid)
    if (out / "meta.json").is_file():  # an earlier generation's folder: a smaller grid must not sit among its cells
        for stale in ("frames", "videos"):
            shutil.rmtree(out / stale, ignore_errors=True)
    (out / "frames").mkdir(exist_ok=True)
    for v in range(frames.shape[0]):
        for t in range(frames.shape[1]):
            Image.fromarray(frames[v, t]).save(out / "frames" / f"v{v:02d}t{t:02d}.png")
    sheet = contact_sheet(frames, out / "contact_sheet.png", given=given.numpy().astype(bool))
    try:
        videos = grid_videos(frames, out / "videos", fps=fps)
        bullet = str(videos["bullet_time"][0])
    except UserError as exc:  # no PyAV (e.g. a GPU node's image): the frames and the sheet are the result
        print(f"[generate] no MP4s written: {exc}", file=sys.stderr)
        meta = {**meta, "videos": f"not written: {exc}"}
        bullet = ""
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return {"contact_sheet": str(sheet), "videos": str(out / "videos") if bullet else "", "bullet_time": bullet}


def _first_grid(spec: str) -> tuple[np.ndarray, dict]:
    from pipelines.common.shards import iter_tar_samples
    from pipelines.common.shards import decode_grid, resolve_shards
    for shard in resolve_shards(spec):
        for _, files in iter_tar_samples(shard):
            return decode_grid(files)
    raise UserError(f"no grid samples in '{spec}'")


def _inputs(cfg: GenerateConfig, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    if cfg.from_grid:
        grid, meta = _first_grid(cfg.from_grid)
        g = frames_to_tensor(grid, *size)
        return g[0], g[:, 0], {"from_grid": cfg.from_grid, "source_item": meta.get("item_id")}
    if not (cfg.fixed_view and cfg.freeze_time):
        raise UserError("give both --fixed-view and --freeze-time (or --from-grid, or --manifest)")
    row, col = read_frames(cfg.fixed_view), read_frames(cfg.freeze_time)
    corner = check_corner(row[0], col[0], size, cfg.corner_psnr)
    return frames_to_tensor(row, *size), frames_to_tensor(col, *size), {"corner_psnr_db": corner}


def generate_one(gen: Generator4D, cfg: GenerateConfig, out: Path) -> dict:
    t0 = time.time()
    row, col, info = _inputs(cfg, gen.size)
    if cfg.frames:
        if cfg.frames > row.shape[0]:
            raise UserError(f"--frames {cfg.frames} exceeds the fixed-view video's {row.shape[0]} frames")
        row = row[:cfg.frames]
    if cfg.views:
        if cfg.views > col.shape[0]:
            raise UserError(f"--views {cfg.views} exceeds the freeze-time video's {col.shape[0]} frames")
        col = col[:cfg.views]
    if row.shape[0] < 2 or col.shape[0] < 2:
        raise UserError(f"the first row has {row.shape[0]} frame(s) and the first column {col.shape[0]}; a 4D grid "
                        "needs at least 2 of each (a given row and column and something to generate)")
    grid, given = gen.generate(row, col, cfg.seed)
    meta = {"views": int(grid.shape[0]), "frames": int(grid.shape[1]), "window": list(gen.window),
            "window_plan": cfg.window_plan, "sync": gen.sync, "steps": cfg.steps, "method": cfg.method,
            "seconds": time.time() - t0, **info}
    paths = write_outputs(grid, given, out, cfg.fps, meta)
    return {**meta, **paths}


class _BatchActor:
    """Ray Data actor: one model per actor, many input pairs."""

    def __init__(self, cfg_dict: dict) -> None:
        from pipelines.common.config import from_dict
        self.cfg = from_dict(GenerateConfig, cfg_dict)
        self.gen = Generator4D(self.cfg)

    def __call__(self, row: dict) -> dict:
        cfg = dataclasses.replace(self.cfg, fixed_view=row["fixed_view"], freeze_time=row["freeze_time"],
                                  manifest="", from_grid="")
        out = Path(self.cfg.out) / str(row["name"])
        try:
            result = generate_one(self.gen, cfg, out)
            return {"name": row["name"], "ok": True, "error": "", "contact_sheet": result["contact_sheet"]}
        except UserError as exc:  # one bad pair never sinks the batch
            return {"name": row["name"], "ok": False, "error": str(exc), "contact_sheet": ""}
        except Exception as exc:
            # Anything else one pair raises is that pair's failure too: raised, it would fail the Ray task and
            # the whole batch, and batch_results.json would never be written. Its type and message are the
            # record; the traceback goes to the actor's log.
            import traceback
            traceback.print_exc()
            return {"name": row["name"], "ok": False, "error": f"{type(exc).__name__}: {exc}", "contact_sheet": ""}


BATCH_RESULTS = "batch_results.json"


def check_batch_names(names: list[Any], manifest: str) -> None:
    """Each pair writes to ``<out>/<name>``: a name must be one folder name, unique in the manifest, or pairs
    silently overwrite each other (or write outside --out, or over the batch's own files)."""
    reserved = {BATCH_RESULTS, "config.yaml"}  # what run_batch and generate_4d write beside the pairs' folders

    def plain(n: Any) -> bool:
        return n is not None and bool(str(n).strip()) and str(n) != "." and ".." not in str(n) \
            and not any(c in str(n) for c in "/\\\0") and str(n) not in reserved
    bad = sorted({repr(n) for n in names if not plain(n)})
    seen: dict[str, int] = {}
    for n in names:
        seen[str(n)] = seen.get(str(n), 0) + 1
    dups = sorted(n for n, count in seen.items() if count > 1)
    problems = []
    if dups:
        problems.append("duplicated " + ", ".join(f"'{n}' ({seen[n]} rows)" for n in dups))
    if bad:
        problems.append(f"not a plain folder name (empty, with '/', '\\' or '..', or one of {sorted(reserved)}): "
                        + ", ".join(bad))
    if problems:
        raise UserError(f"manifest {manifest}: each row's name is its output folder under --out and must be unique "
                        f"and plain; {'; '.join(problems)}. Rename those rows")


def run_batch(cfg: GenerateConfig) -> int:
    import pyarrow.parquet as pq
    import ray

    from pipelines.common.config import to_dict
    from pipelines.common.job import check_shared_output, init_ray
    table = pq.read_table(cfg.manifest)
    missing = {"fixed_view", "freeze_time", "name"} - set(table.column_names)
    if missing:
        raise UserError(f"manifest {cfg.manifest} lacks columns {sorted(missing)}; it needs fixed_view, "
                        "freeze_time and name")
    check_batch_names(table.column("name").to_pylist(), cfg.manifest)  # before Ray starts or a model loads
    # absolute, and seen by every node: each actor writes its pairs' folders under it, the driver the results
    cfg = dataclasses.replace(cfg, out=str(Path(cfg.out).resolve()))
    init_ray()
    check_shared_output(Path(cfg.out), "output")
    ds = ray.data.from_arrow(table).map(_BatchActor, fn_constructor_kwargs={"cfg_dict": to_dict(cfg)},
                                        concurrency=cfg.concurrency, num_gpus=cfg.gpus_per_actor or None)
    results = list(ds.iter_rows())
    ok = sum(r["ok"] for r in results)
    for r in results:
        if not r["ok"]:
            print(f"[generate] FAILED {r['name']}: {r['error']}", file=sys.stderr)
    where = Path(cfg.out) / BATCH_RESULTS
    where.parent.mkdir(parents=True, exist_ok=True)  # every pair may have failed before writing anything
    where.write_text(json.dumps(results, indent=2))
    print(f"[generate] {ok}/{len(results)} grids written under {cfg.out}"
          + (f"; failures in {where}" if ok < len(results) else ""))
    # the data jobs' rule (pipelines.common.job.exit_code): a bad pair is recorded, not fatal; nothing written is
    return 0 if ok else 1
