"""What one render looks like: the settings the Blender worker receives with every asset."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

ENGINES = ("cycles", "cycles-gpu", "eevee")
DENOISE_QUALITY = ("FAST", "BALANCED", "HIGH")
DENOISE_PREFILTER = ("NONE", "FAST", "ACCURATE")
LIGHTING = ("studio", "sun", "ambient")
# One Cycles thread makes oneTBB keep a second thread spinning (sched_yield) at 100% of another core for as
# long as Blender's session lives (persistent data): measured here, a 1-thread worker used 1.97 cores while
# rendering and 1.0 while idle. Two threads use the same two cores for real work.
MIN_THREADS = 2
# Widest arc whose neighbouring-view step (8 views, 144x256) stays inside the band of steps the pseudo-4D
# data shows: 60 degrees moves a bbox-filling object 1.74% of the width per view, the pseudo-4D grids
# 0.43-2.11% (p5-p95); 90 degrees would be 2.62%, past even their largest step (2.40%).
# benchmarks/measure_render_arc.py prints the table; docs/rendering.md records it.
DEFAULT_ARC_DEG = 60.0


def _opt(default: Any, text: str) -> Any:
    """A setting with its help text (the render job's --help shows it; rendering imports nothing of the jobs,
    so this is the plain dataclass metadata the job's config parser reads)."""
    return field(default=default, metadata={"doc": text})


@dataclass
class RenderSettings:
    """What one render looks like. The render job's options include every field (RenderJobConfig inherits
    them), so each setting is defined once, here. Plain values only: this crosses a process boundary
    (pickled to the Blender worker)."""

    views: int = _opt(8, "cameras on the circle (V)")
    frames: int = _opt(16, "frames sampled from each action (T)")
    # The training frame's 9:16 aspect (the paper's 72x128, x2): the loader then resizes without cropping.
    height: int = _opt(144, "image height in pixels (default: the training frame's 9:16 aspect, 72x128 x2)")
    width: int = _opt(256, "image width in pixels")
    fps: float = _opt(8.0, "target fps of the sampled frames (squeezed to fit shorter actions)")
    samples: int = _opt(16, "render samples per pixel")
    engine: Literal[ENGINES] = _opt("cycles", "cycles (CPU) | cycles-gpu | eevee (needs a GPU; software GL is "
                                    "~50 s/frame)")
    denoise: bool = _opt(True, "OpenImageDenoise on the render")
    denoise_quality: Literal[DENOISE_QUALITY] = _opt("FAST", "denoiser quality")
    denoise_prefilter: Literal[DENOISE_PREFILTER] = _opt("NONE", "denoiser prefilter")
    threads: int = _opt(0, f"render threads per Blender (0 = the actor's CPUs; at least {MIN_THREADS}: one thread "
                           "keeps a second core spinning)")
    elevation: float = _opt(20.0, "camera elevation in degrees")
    distance: float = _opt(0.0, "camera distance in normalized units (0 = smallest that keeps the object in frame)")
    fov: float = _opt(40.0, "vertical camera field of view in degrees (the horizontal one follows the aspect)")
    # A partial arc sees one side of the object: a per-asset start azimuth spreads the sides over the data set.
    random_azimuth: bool = _opt(True, "random (per-uid, reproducible) start azimuth, so a partial arc does not "
                                      "always see the same side of every asset")
    arc: float = _opt(DEFAULT_ARC_DEG, "arc spanned by the cameras in degrees (< 360: both ends included); the "
                                       "default keeps the per-view image step inside the pseudo-4D data's "
                                       "(docs/rendering.md)")
    lighting: Literal[LIGHTING] = _opt("studio", "studio (3 suns + ambient) | sun | ambient")
    light_strength: float = _opt(1.0, "multiplier on the lights")
    ambient: float = _opt(0.3, "world (ambient) light strength")
    depth: bool = _opt(False, "also write 16-bit depth PNGs")
    normals: bool = _opt(False, "also write world-normal PNGs")
    max_actions: int = _opt(4, "samples per asset at most (one per action)")
    multiview: bool = _opt(True, "render all views of a frame in one Blender call (multiview)")
    persistent_data: bool = _opt(True, "keep Blender's scene data between frames (faster; off only to debug)")
    # On a transparent film everything outside the object renders to exact zeros, and path tracing and
    # denoising cost per pixel: rendering only the object's box (its evaluated vertices projected, per time
    # step) cut a 256x256 frame of the benchmark's skinned, textured characters from 0.244 to 0.171 s
    # (benchmarks/bench_render_real.py, bench_render_real_cpu.json's region row; docs/performance.md).
    render_region: bool = _opt(True, "render only the part of the frame the object can cover (full-size output, "
                                     "zeros outside; faster; the same pixels up to the denoiser's noise)")
    png_compression: int = _opt(15, "PNG compression of the frames, 0-100 (speed against shard size)")
    seed: int = _opt(0, "seed for procedural assets and random azimuths")

    SPEED_ONLY: ClassVar[tuple[str, ...]] = ("threads", "persistent_data", "png_compression", "render_region")
    """Fields that change how fast a render is made, not what it shows (a re-run into an output may change
    them)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
