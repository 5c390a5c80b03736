"""Pseudo-4D grids and base-model clips from ordinary videos, as a Ray Data job (issue 4).

    ray job submit --working-dir . -- python pipelines/make_pseudo4d.py --input /data/videos --output /data/p4d
    python pipelines/make_pseudo4d.py --preset demo --output outputs/p4d      # no cluster needed

For each input video the job samples a T-frame clip (random start, stride set
by the target fps), crops it to the training resolution with a margin, and
synthesises a V x T grid: view v applies one 2D affine A_v (a smooth camera
path, pipelines/affine.py) to every frame (paper section 3.3). Grids go to
<output>/shards/ (``"kind": "pseudo4d"``, docs/data_format.md); chosen rows
("dynamic") and columns ("freeze-time") go to <output>/clips/ for the base
model. Writing, the index, failure records and resume are the shared ones
(pipelines/common/shards.py, job.py). Bad videos (undecodable, too short,
static) are skipped and recorded with the reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from a checkout without install

from pipelines.affine import TransformConfig, draw_path, sampling_grid, source_extent, warp_views
from pipelines.common.config import (ConfigError, check_same_content, doc, parse_config, preset_table, run_cli,
                                     write_resolved)
from pipelines.common.errors import UserError
from pipelines.common.errors import ItemError
from pipelines.common.job import JobSpec, exit_code, run_job
from pipelines.common.shards import Sample, clip_utf8, json_bytes, safe_key, scan_output
from pipelines.frame_codec import PNG_MODES, encode_jpeg, encode_png_fast, encode_png_pillow
from pipelines.procedural_video import ProceduralConfig, make_video
from pipelines.video_inputs import check_input_change, list_videos, record_input, recorded_inputs
from pipelines.common.video import encode_video_bytes
from pipelines.video_io import VideoSource, open_input


@dataclass
class Pseudo4DConfig:
    """Options of the pseudo-4D job (see docs/data_format.md for what it writes)."""

    input: str = doc("procedural", "'procedural' (synthetic videos), a folder of videos (searched recursively), "
                                   "a glob, a Parquet manifest (*.parquet with a 'path' column of files or URLs, "
                                   "optional 'item_id'), or WebDataset tars of videos (*.tar, a glob or {000..009} "
                                   "range). Use absolute paths with 'ray job submit'")
    output: str = doc("outputs/pseudo4d", "output folder; re-running into it resumes")
    views: int = doc(8, "views V per grid (rows); view 0 is the source clip")
    frames: int = doc(8, "frames T per clip (columns)")
    height: int = doc(256, "output frame height")
    width: int = doc(256, "output frame width")
    fps: float = doc(8.0, "target frame rate of a clip: the stride is round(source fps / fps); 0 keeps every frame")
    grids_per_video: int = doc(1, "grids sampled from each video (each with its own start and camera path)")
    transform: TransformConfig = field(default_factory=TransformConfig)
    border: str = doc("crop", "crop: every view is cut from a larger source crop, so no view has empty borders; "
                              "pad: plain crop, views padded with black and a validity mask stored per view")
    crop: str = doc("center", "where the output window sits in the video: center or random")
    clip_rows: int = doc(1, "rows of each grid also written as 'dynamic' clips (-1: all)")
    clip_cols: int = doc(1, "columns of each grid also written as 'freeze-time' clips (-1: all)")
    image_format: str = doc("png", "frame encoding: png (lossless) or jpg")
    png_mode: str = doc("fast", "PNG writer: fast (numpy Up filter + run-length deflate, ~3x faster than Pillow, "
                                "~7% larger) or pillow (adaptive filters, png_compress_level)")
    png_compress_level: int = doc(1, "zlib level for png_mode pillow (0-9)")
    jpeg_quality: int = doc(95, "JPEG quality when image_format is jpg")
    static_threshold: float = doc(1.0, "a clip whose mean absolute frame-to-frame difference (0-255 scale) is "
                                       "below this is skipped as static")
    seed: int = doc(0, "job seed; each item's clip start and camera path derive from it and the item id")
    limit: int = doc(0, "process at most this many input videos (0: all)")
    procedural: ProceduralConfig = field(default_factory=ProceduralConfig)
    decode_threads: int = doc(1, "decoder threads per worker (1: one worker per core is the efficient layout)")
    items_per_part: int = doc(8, "videos per part (one shard per stream per part)")
    concurrency: int = doc(2, "parallel workers (Ray actors)")
    num_cpus: float = doc(1.0, "CPUs reserved per worker")
    retry_failed: bool = doc(False, "retry videos that failed in an earlier run into the same output")
    ray_address: str = doc("", "Ray cluster address; empty: RAY_ADDRESS or a private local Ray")

    def validate(self) -> None:
        self.transform.validate()
        if self.views < 1 or self.frames < 2:
            raise ConfigError(f"need views >= 1 and frames >= 2; got views={self.views}, frames={self.frames}")
        if self.views > 100 or self.frames > 100:
            raise ConfigError("views and frames are stored as two digits; keep each at most 100")
        if self.height < 8 or self.width < 8:
            raise ConfigError(f"output size {self.width}x{self.height} is too small; use at least 8x8")
        if self.border not in ("crop", "pad"):
            raise ConfigError(f"border must be crop or pad; got {self.border!r}")
        if self.crop not in ("center", "random"):
            raise ConfigError(f"crop must be center or random; got {self.crop!r}")
        if self.image_format not in ("png", "jpg"):
            raise ConfigError(f"image_format must be png or jpg; got {self.image_format!r}")
        if self.png_mode not in PNG_MODES:
            raise ConfigError(f"png_mode must be one of {', '.join(PNG_MODES)}; got {self.png_mode!r}")
        if not 0 <= self.png_compress_level <= 9:
            raise ConfigError(f"png_compress_level must be in 0..9; got {self.png_compress_level}")
        if self.fps < 0 or self.grids_per_video < 1 or self.items_per_part < 1 or self.concurrency < 1:
            raise ConfigError("fps must be >= 0 and grids_per_video, items_per_part, concurrency >= 1")
        if self.procedural.count < 0 or self.procedural.frames < 2:
            raise ConfigError("procedural.count must be >= 0 and procedural.frames >= 2")


PRESET_TABLE: dict[str, dict[str, Any]] = {
    # tests: 32x32, 3 views, 4 frames.
    "tiny": dict(output="outputs/tiny/pseudo4d", views=3, frames=4, height=32, width=32, fps=12.0, items_per_part=4,
                 procedural=dict(count=3, width=64, height=48, frames=12, fps=24.0)),
    # make demo: 4 synthetic videos -> 4 x 8 grids at 64x64 in a few seconds of work.
    "demo": dict(output="outputs/demo/pseudo4d", views=4, frames=8, height=64, width=64, fps=12.0, items_per_part=2,
                 procedural=dict(count=4, width=128, height=96, frames=24, fps=24.0)),
    # The GPU proof run (docs/results.md): 8 x 8 grids at 64x64 from synthetic videos, made on the GPU node
    # itself (no codec, so no PyAV there); 48-frame sources give each grid its own clip start.
    "proof": dict(output="outputs/proof/pseudo4d", views=8, frames=8, height=64, width=64, fps=8.0,
                  items_per_part=64, concurrency=8,
                  procedural=dict(count=3000, width=128, height=96, frames=48, fps=24.0, codec="none")),
    # One machine: the paper's grid (below) with a worker per core of a 16-core node (one decode thread each,
    # the efficient layout; docs/performance.md).
    "small": dict(output="outputs/small/pseudo4d", views=8, frames=8, height=256, width=256, fps=8.0,
                  items_per_part=32, concurrency=16, procedural=dict(count=64, width=480, height=270, frames=48)),
    # the paper's grid: 8 x 8 at 256x256 from real videos (--input; set --concurrency to the cluster's cores).
    "paper": dict(output="outputs/pseudo4d", views=8, frames=8, height=256, width=256, fps=8.0, items_per_part=32,
                  procedural=dict(count=64, width=480, height=270, frames=48)),
}
"""The pseudo-4D presets (pipelines.common.config.PRESET_NAMES), as field overrides of Pseudo4DConfig (nested
sections as nested dicts). A run without --preset gets ``demo``."""

PRESETS: dict[str, Callable[[], Pseudo4DConfig]] = preset_table(Pseudo4DConfig, PRESET_TABLE)


# ---------------------------------------------------------------- inputs

def list_items(cfg: Pseudo4DConfig) -> list[dict[str, Any]]:
    """The job's input items (each with a stable ``item_id``), in a fixed order, at most ``limit``."""
    if cfg.input.strip() == "procedural":
        # The id names the video's own seed, so one id is one video whatever --procedural.seed: held-out sets
        # made with other seeds never share an id (or content) with training sets.
        items = [{"item_id": f"procedural-{cfg.procedural.seed + i:06d}", "procedural_seed": cfg.procedural.seed + i}
                 for i in range(cfg.procedural.count)]
        if not items:
            raise UserError("procedural input with procedural.count=0 makes no videos; set --procedural.count")
    else:
        items = list_videos(cfg.input)
    return items[:cfg.limit] if cfg.limit > 0 else items


# ---------------------------------------------------------------- per-item work

def item_seed(job_seed: int, item_id: str, grid: int) -> list[int]:
    """Seed words for one grid: reproducible from (job seed, item id), independent of order and worker."""
    h = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "little")
    return [job_seed, h, grid]


def sample_key(item_id: str) -> str:
    """WebDataset-safe key: a readable stem plus a hash, so 'a/b.mp4' and 'a_b.mp4' never collide."""
    digest = hashlib.sha1(item_id.encode()).hexdigest()[:10]
    return f"{clip_utf8(safe_key(Path(item_id).stem), 48)}-{digest}"  # bytes: tar names are bounded in bytes


@dataclass
class CropPlan:
    """Where view 0's window lies in the resized video and what part of it the warp reads."""

    resized: tuple[int, int]           # (w, h) the video is resized to, aspect preserved
    offset: tuple[int, int]            # top-left of view 0's window in the resized video
    box: tuple[int, int, int, int]     # crop (x0, y0, x1, y1) of the resized video that is decoded

    def source_to_view0(self, src_w: int, src_h: int) -> list[list[float]]:
        """2x3 map from source-video pixel coordinates to view-0 pixel coordinates."""
        sx, sy = self.resized[0] / src_w, self.resized[1] / src_h
        return [[sx, 0.0, -float(self.offset[0])], [0.0, sy, -float(self.offset[1])]]


def plan_crop(extent: tuple[float, float, float, float], src_w: int, src_h: int, rng: np.random.Generator,
              random_position: bool) -> CropPlan:
    """Scale the video so ``extent`` (view-0 coordinates every view needs) fits, then place the window.

    One scale for both axes keeps the aspect ratio (up to rounding to whole pixels,
    which ``source_to_view0`` records).
    """
    x0, y0, x1, y1 = extent
    need_w, need_h = x1 - x0, y1 - y0
    scale = max(need_w / src_w, need_h / src_h)
    rw = max(math.ceil(src_w * scale - 1e-6), math.ceil(need_w))
    rh = max(math.ceil(src_h * scale - 1e-6), math.ceil(need_h))

    def place(lo: float, hi: float) -> int:
        # Window origin o must satisfy o + x0 >= 0 and o + x1 <= size, i.e. o in [lo, hi].
        o = lo + (rng.uniform() if random_position else 0.5) * max(0.0, hi - lo)
        return int(min(max(round(o), math.ceil(lo)), math.floor(hi)))

    ox, oy = place(-x0, rw - x1), place(-y0, rh - y1)
    box = (max(0, math.floor(ox + x0)), max(0, math.floor(oy + y0)),
           min(rw, math.ceil(ox + x1)), min(rh, math.ceil(oy + y1)))
    return CropPlan((rw, rh), (ox, oy), box)


def encode_frame(arr: np.ndarray, cfg: Pseudo4DConfig) -> bytes:
    if cfg.image_format == "jpg":
        return encode_jpeg(arr, cfg.jpeg_quality)
    if cfg.png_mode == "fast":
        return encode_png_fast(arr)
    return encode_png_pillow(arr, cfg.png_compress_level)


@dataclass
class _Source:
    """One opened input video: a decoder, or (uncoded synthetic video) the frames themselves."""

    label: str
    width: int
    height: int
    frames: int          # what the container claims; 0 = unknown
    fps: float
    decoder: VideoSource | None = None
    raw: np.ndarray | None = None

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.close()


class Pseudo4DProcessor:
    """Turns one input video into grid and clip samples; built once per Ray actor."""

    def __init__(self, cfg: Pseudo4DConfig, pin_threads: bool = False) -> None:
        self.cfg = cfg
        if pin_threads:
            # A worker owns num_cpus cores: more intra-op threads would only contend with the other workers.
            # Only workers and benchmarks ask for this; a test process keeps its own thread setting.
            import torch
            torch.set_num_threads(max(1, int(cfg.num_cpus)))
        self.timings = {"generate": 0.0, "decode": 0.0, "warp": 0.0, "encode": 0.0}

    def _open(self, item: dict[str, Any]) -> _Source:
        if "procedural_seed" in item:
            p = self.cfg.procedural
            t0 = time.perf_counter()
            frames = make_video(int(item["procedural_seed"]), p.width, p.height, p.frames, p.objects)
            data = encode_video_bytes(frames, p.fps, codec=p.codec) if p.codec != "none" else None
            self.timings["generate"] += time.perf_counter() - t0
            label = f"procedural:{item['procedural_seed']}"
            if data is None:
                return _Source(label, frames.shape[2], frames.shape[1], frames.shape[0], p.fps, raw=frames)
            return self._decoder(label, open_input(data=data))
        if "tar" in item:
            return self._decoder(f"{item['tar']}:{item['item_id']}",
                                 open_input(tar=(item["tar"], int(item["offset"]), int(item["size"]))))
        if "://" not in item["path"] and not Path(item["path"]).is_file():
            raise ItemError("decode", f"video file {item['path']} does not exist")
        return self._decoder(item["path"], open_input(path=item["path"]))

    def _decoder(self, label: str, src: Any) -> _Source:
        dec = VideoSource(src, self.cfg.decode_threads)
        return _Source(label, dec.info.width, dec.info.height, dec.info.frames, dec.info.fps, decoder=dec)

    def __call__(self, item: dict[str, Any]) -> list[Sample]:
        cfg = self.cfg
        t0, generated = time.perf_counter(), self.timings["generate"]
        source = self._open(item)
        try:
            stride = max(1, round(source.fps / cfg.fps)) if cfg.fps > 0 else 1
            needed = (cfg.frames - 1) * stride + 1
            if 0 < source.frames < needed:
                raise ItemError("short", f"video has {source.frames} frames at {source.fps:g} fps; {cfg.frames} "
                                         f"frames at {cfg.fps:g} fps (stride {stride}) need {needed}; "
                                         "lower --frames or raise --fps")
            self.timings["decode"] += time.perf_counter() - t0 - (self.timings["generate"] - generated)
            samples: list[Sample] = []
            for g in range(cfg.grids_per_video):
                samples += self._grid(item, g, source, stride, needed)
            return samples
        finally:
            source.close()

    def _read_clip(self, source: _Source, start: int, stride: int, needed: int, plan: CropPlan
                   ) -> tuple[np.ndarray, list[int]]:
        T = self.cfg.frames
        if source.raw is not None:
            idx = [start + k * stride for k in range(T)]
            return _resize_crop_raw(source.raw[idx], plan), idx
        try:
            return source.decoder.read(start, T, stride, plan.resized, plan.box)
        except ItemError as exc:
            # The container overstated its length: take the last clip that fits in what was there.
            real = source.decoder.frames_to_end
            if exc.stage != "short" or real is None or real < needed or start == 0:
                raise
            return source.decoder.read(real - needed, T, stride, plan.resized, plan.box)

    def _grid(self, item: dict[str, Any], g: int, source: _Source, stride: int, needed: int) -> list[Sample]:
        cfg = self.cfg
        W, H, V, T = cfg.width, cfg.height, cfg.views, cfg.frames
        rng = np.random.default_rng(item_seed(cfg.seed, item["item_id"], g))
        path = draw_path(cfg.transform, rng, W, H)
        mats = path.matrices(V)
        extent = source_extent(mats, W, H, slack=2.0) if cfg.border == "crop" else (0.0, 0.0, float(W), float(H))
        plan = plan_crop(extent, source.width, source.height, rng, cfg.crop == "random")
        start = int(rng.integers(0, max(0, source.frames - needed) + 1)) if source.frames > 0 else 0

        t0 = time.perf_counter()
        clip, idx = self._read_clip(source, start, stride, needed, plan)
        motion = float(np.abs(np.diff(clip.astype(np.int16), axis=0)).mean())
        self.timings["decode"] += time.perf_counter() - t0
        if motion < cfg.static_threshold:
            raise ItemError("static", f"clip at frames {idx[0]}..{idx[-1]} is static (mean frame difference "
                                      f"{motion:.2f} < static_threshold {cfg.static_threshold:g})")

        t0 = time.perf_counter()
        box = plan.box
        origin = (plan.offset[0] - box[0], plan.offset[1] - box[1])
        grid = sampling_grid(mats, W, H, origin, (box[2] - box[0], box[3] - box[1]))
        frames, masks = warp_views(clip, grid, V, pad=cfg.border == "pad")
        self.timings["warp"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        ext = cfg.image_format
        encoded = [[encode_frame(frames[v, t], cfg) for t in range(T)] for v in range(V)]
        mask_bytes = [encode_png_fast(m) for m in masks] if masks is not None else []
        self.timings["encode"] += time.perf_counter() - t0

        fps = source.fps
        key = f"{sample_key(item['item_id'])}__g{g}"
        affine = [m[:2].tolist() for m in mats]
        meta = {"kind": "pseudo4d", "item_id": item["item_id"], "source": source.label, "views": V, "frames": T,
                "height": H, "width": W, "fps": fps / stride, "source_fps": fps, "frame_indices": idx,
                "transform": {**path.describe(), "pan": cfg.transform.pan, "zoom": cfg.transform.zoom,
                              "rotate": cfg.transform.rotate, "config_family": cfg.transform.family,
                              "seed": cfg.seed, "grid": g},
                "border": cfg.border, "source_size": [source.width, source.height],
                "source_to_view0": plan.source_to_view0(source.width, source.height), "motion": motion}
        files = {f"v{v:02d}t{t:02d}.{ext}": encoded[v][t] for v in range(V) for t in range(T)}
        files.update({f"v{v:02d}mask.png": mb for v, mb in enumerate(mask_bytes)})
        files["cameras.json"] = json_bytes({"type": "affine2d", "width": W, "height": H, "affine": affine})
        files["meta.json"] = json_bytes(meta)
        samples = [Sample(key=key, item_id=item["item_id"], files=files, kind="pseudo4d", views=V, frames=T,
                          height=H, width=W)]

        # Clips reuse the grid's encoded frames: a row or column costs a tar write, not an encode.
        def pick(n: int, k: int) -> list[int]:
            return list(range(n)) if k < 0 or k >= n else sorted(rng.choice(n, size=k, replace=False).tolist())

        clip_meta = {k: meta[k] for k in ("item_id", "source", "height", "width", "source_fps", "transform")}
        for v in pick(V, cfg.clip_rows):
            m = {**clip_meta, "kind": "clip", "context": "dynamic", "grid_key": key, "view": v, "frames": T,
                 "fps": fps / stride, "frame_indices": idx, "affine": [affine[v]]}
            cf = {f"f{t:02d}.{ext}": encoded[v][t] for t in range(T)}
            cf["meta.json"] = json_bytes(m)
            samples.append(Sample(key=f"{key}r{v}", item_id=item["item_id"], files=cf, kind="clip", views=1,
                                  frames=T, height=H, width=W, stream="clips", context="dynamic"))
        if V > 1:
            for t in pick(T, cfg.clip_cols):
                m = {**clip_meta, "kind": "clip", "context": "freeze-time", "grid_key": key, "time": t, "frames": V,
                     "fps": fps / stride, "frame_indices": [idx[t]] * V, "affine": affine}
                cf = {f"f{v:02d}.{ext}": encoded[v][t] for v in range(V)}
                cf["meta.json"] = json_bytes(m)
                samples.append(Sample(key=f"{key}c{t}", item_id=item["item_id"], files=cf, kind="clip", views=1,
                                      frames=V, height=H, width=W, stream="clips", context="freeze-time"))
        return samples


def _resize_crop_raw(frames: np.ndarray, plan: CropPlan) -> np.ndarray:
    """The uncoded path's counterpart of VideoSource.read's resize and crop (area filter via torch)."""
    import torch
    import torch.nn.functional as F
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    rw, rh = plan.resized
    x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    x0, y0, x1, y1 = plan.box
    return x[:, :, y0:y1, x0:x1].round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


# ---------------------------------------------------------------- entry point

CONTENT_OPTIONS = ("views", "frames", "height", "width", "fps", "grids_per_video", "transform", "border", "crop",
                   "clip_rows", "clip_cols", "image_format", "static_threshold", "seed", "procedural")
"""Options that change what a sample holds; a resumed run must not change them (input, limit, workers may)."""


def check_resume_settings(cfg: Pseudo4DConfig, output: Path) -> None:
    """Refuse to add samples made with other settings to an existing output (a silently mixed data set)."""
    check_same_content(cfg, output, CONTENT_OPTIONS, ignore={"procedural": ["count"]})  # more videos is fine


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(Pseudo4DConfig, PRESETS, argv, description=__doc__.split("\n\n")[0],
                          default_preset="demo")
    items = list_items(cfg)
    output = Path(cfg.output)
    check_resume_settings(cfg, output)
    videos = cfg.input.strip() != "procedural"
    inputs = recorded_inputs(output) if videos else []  # before write_resolved replaces config.yaml's input
    if inputs:
        check_input_change(inputs, cfg.input, items, scan_output(output).done_items)
    write_resolved(cfg, output)
    if videos:
        record_input(output, cfg.input, inputs)
    spec = JobSpec(name="pseudo4d", output=output, items=items,
                   make_processor=partial(Pseudo4DProcessor, cfg, pin_threads=True),
                   items_per_part=cfg.items_per_part, concurrency=cfg.concurrency, num_cpus=cfg.num_cpus,
                   retry_failed=cfg.retry_failed, ray_address=cfg.ray_address,
                   extra_summary={"views": cfg.views, "frames": cfg.frames, "height": cfg.height, "width": cfg.width})
    summary = run_job(spec)
    print(json.dumps({k: summary[k] for k in ("samples_total", "failures_total", "frames_per_second")}), flush=True)
    return exit_code(summary)


if __name__ == "__main__":
    run_cli(main)
