"""What one render looks like: the settings the Blender worker receives with every asset."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ENGINES = ("cycles", "cycles-gpu", "eevee")
DENOISE_QUALITY = ("FAST", "BALANCED", "HIGH")
DENOISE_PREFILTER = ("NONE", "FAST", "ACCURATE")
LIGHTING = ("studio", "sun", "ambient")
# Widest arc whose neighbouring-view step (8 views, 144x256) stays inside the band of steps the pseudo-4D
# data shows: 60 degrees moves a bbox-filling object 1.74% of the width per view, the pseudo-4D grids
# 0.43-2.11% (p5-p95); 90 degrees would be 2.62%, past even their largest step (2.40%).
# benchmarks/measure_render_arc.py prints the table; docs/rendering.md records it.
DEFAULT_ARC_DEG = 60.0


@dataclass(frozen=True)
class RenderSettings:
    """Plain values only: this crosses a process boundary (pickled to the Blender worker)."""

    views: int = 8
    frames: int = 16
    # The training frame's 9:16 aspect (the paper's 72x128, x2): the loader then resizes without cropping.
    height: int = 144
    width: int = 256
    fps: float = 8.0
    samples: int = 16
    engine: str = "cycles"
    denoise: bool = True
    denoise_quality: str = "FAST"
    denoise_prefilter: str = "NONE"
    threads: int = 0
    elevation_deg: float = 20.0
    distance: float = 0.0
    fov_deg: float = 40.0
    # A partial arc sees one side of the object: a per-asset start azimuth spreads the sides over the data set.
    random_azimuth: bool = True
    arc_deg: float = DEFAULT_ARC_DEG
    lighting: str = "studio"
    light_strength: float = 1.0
    ambient: float = 0.3
    depth: bool = False
    normals: bool = False
    max_actions: int = 4
    multiview: bool = True
    persistent_data: bool = True
    png_compression: int = 15
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
