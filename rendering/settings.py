"""What one render looks like: the settings the Blender worker receives with every asset."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ENGINES = ("cycles", "cycles-gpu", "eevee")
DENOISE_QUALITY = ("FAST", "BALANCED", "HIGH")
DENOISE_PREFILTER = ("NONE", "FAST", "ACCURATE")
LIGHTING = ("studio", "sun", "ambient")


@dataclass(frozen=True)
class RenderSettings:
    """Plain values only: this crosses a process boundary (pickled to the Blender worker)."""

    views: int = 8
    frames: int = 16
    resolution: int = 256
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
    random_azimuth: bool = False
    arc_deg: float = 360.0
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
