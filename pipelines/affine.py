"""The pseudo-4D camera: a smooth family of 2D affine transforms over the view index.

A pseudo-4D grid (paper section 3.3) is an ordinary clip seen through V
"cameras": view ``v`` warps every frame by the same affine ``A_v``, so a row is
the original motion from a fixed, shifted viewpoint and a column is a camera
moving across a frozen moment. ``A_v`` is a continuous function of
``s = v / (V - 1)`` that starts at the identity, so neighbouring views differ by
a small, consistent camera step.

Coordinates are continuous pixel coordinates of the output image: origin at the
top-left corner, pixel centres at integer + 0.5 (the convention of the render
job's cameras). ``A_v`` maps a point of the source clip (view 0) to view ``v``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.common.config import doc

FAMILIES = ("pan", "zoom", "rotate", "pan_zoom", "pan_rotate", "zoom_rotate", "all")
"""Which motions a grid combines; ``mixed`` in the config draws one of these per grid."""


@dataclass
class TransformConfig:
    """How the virtual camera moves from view 0 to the last view."""

    family: str = doc("mixed", "pan | zoom | rotate | pan_zoom | pan_rotate | zoom_rotate | all, "
                               "or mixed (one of these drawn per grid)")
    pan: float = doc(0.15, "largest translation at the last view, as a fraction of the output width")
    zoom: float = doc(0.2, "largest scale change at the last view: scale 1+zoom (zoom in) or 1/(1+zoom) (out)")
    rotate: float = doc(8.0, "largest rotation at the last view, degrees")
    min_strength: float = doc(0.5, "each grid's magnitudes are drawn uniformly from [min_strength, 1] x the maxima")

    def validate(self) -> None:
        from pipelines.common.config import ConfigError
        choices = FAMILIES + ("mixed",)
        if self.family not in choices:
            raise ConfigError(f"transform.family must be one of {', '.join(choices)}; got {self.family!r}")
        if not (0 <= self.pan <= 1 and 0 <= self.zoom <= 1 and 0 <= self.rotate <= 45):
            raise ConfigError("transform magnitudes out of range: pan in [0, 1], zoom in [0, 1], "
                              "rotate in [0, 45] degrees")
        if not 0 <= self.min_strength <= 1:
            raise ConfigError(f"transform.min_strength must be in [0, 1]; got {self.min_strength}")


@dataclass(frozen=True)
class CameraPath:
    """One grid's camera motion: where the last view ends up; intermediate views interpolate."""

    family: str
    pan_x: float      # translation of the last view, output pixels
    pan_y: float
    log_scale: float  # log of the last view's scale (> 0: zoom in)
    angle: float      # rotation of the last view, radians (counter-clockwise on screen)
    width: int
    height: int

    def matrix(self, s: float) -> np.ndarray:
        """``A(s)`` as a 3x3 matrix, ``s`` in [0, 1]; ``A(0)`` is exactly the identity.

        Rotation and scale act about the image centre, then the pan shifts. Every
        parameter is linear in ``s``, so ``A`` is smooth and ``det A = exp(2 s log_scale) > 0``.
        """
        cx, cy = self.width / 2.0, self.height / 2.0
        z = math.exp(s * self.log_scale)
        # Screen y points down, so a counter-clockwise turn on screen is a negative angle in these axes.
        th = -s * self.angle
        c, si = z * math.cos(th), z * math.sin(th)
        tx = cx + s * self.pan_x - (c * cx - si * cy)
        ty = cy + s * self.pan_y - (si * cx + c * cy)
        return np.array([[c, -si, tx], [si, c, ty], [0.0, 0.0, 1.0]])

    def matrices(self, views: int) -> np.ndarray:
        """The V x 3 x 3 view matrices; view 0 is the identity."""
        steps = [v / (views - 1) if views > 1 else 0.0 for v in range(views)]
        return np.stack([self.matrix(s) for s in steps])

    def describe(self) -> dict[str, float | str]:
        return dict(family=self.family, pan_x=self.pan_x, pan_y=self.pan_y,
                    scale=math.exp(self.log_scale), rotate_degrees=math.degrees(self.angle))


def draw_path(cfg: TransformConfig, rng: np.random.Generator, width: int, height: int) -> CameraPath:
    """Draw one grid's camera path: a family, random directions, magnitudes in [min_strength, 1] x max."""
    family = cfg.family if cfg.family != "mixed" else FAMILIES[int(rng.integers(len(FAMILIES)))]

    def strength() -> float:
        return float(rng.uniform(cfg.min_strength, 1.0))

    pan_x = pan_y = log_scale = angle = 0.0
    if "pan" in family or family == "all":
        direction = float(rng.uniform(0, 2 * math.pi))
        dist = cfg.pan * width * strength()
        pan_x, pan_y = dist * math.cos(direction), dist * math.sin(direction)
    if "zoom" in family or family == "all":
        log_scale = math.log1p(cfg.zoom * strength()) * (1 if rng.random() < 0.5 else -1)
    if "rotate" in family or family == "all":
        angle = math.radians(cfg.rotate * strength()) * (1 if rng.random() < 0.5 else -1)
    return CameraPath(family, pan_x, pan_y, log_scale, angle, width, height)


def source_extent(mats: np.ndarray, width: int, height: int, slack: float = 1.0) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) of source coordinates any view samples, plus ``slack`` pixels.

    Each view's window is a convex quadrilateral in source coordinates (the
    inverse image of the output rectangle), so its corners bound it. A source
    crop that covers this box lets every view fill its window with real pixels.
    """
    corners = np.array([[0, 0, 1], [width, 0, 1], [0, height, 1], [width, height, 1]], dtype=np.float64).T
    pts = [np.linalg.inv(m)[:2] @ corners for m in mats]
    allp = np.concatenate(pts, axis=1)
    x0 = min(0.0, float(allp[0].min())) - slack
    y0 = min(0.0, float(allp[1].min())) - slack
    x1 = max(float(width), float(allp[0].max())) + slack
    y1 = max(float(height), float(allp[1].max())) + slack
    return x0, y0, x1, y1


def sampling_grid(mats: np.ndarray, width: int, height: int, origin: tuple[float, float],
                  src_size: tuple[int, int]) -> torch.Tensor:
    """grid_sample coordinates for every view, stacked vertically: [1, V*H, W, 2].

    ``origin`` is where source (view 0) coordinate (0, 0) lies in the source
    crop's pixel coordinates; ``src_size`` is the crop's (width, height).
    """
    V = len(mats)
    ys = (np.arange(height) + 0.5)[None, :, None]
    xs = (np.arange(width) + 0.5)[None, None, :]
    inv = np.linalg.inv(mats)[:, :2, :, None, None]                                # V x 2 x 3 x 1 x 1
    # Broadcast products, not a matmul: a BLAS call here starts worker threads that spin and steal
    # CPU from the other data workers on the node.
    sx = inv[:, 0, 0] * xs + inv[:, 0, 1] * ys + inv[:, 0, 2]                       # V x H x W
    sy = inv[:, 1, 0] * xs + inv[:, 1, 1] * ys + inv[:, 1, 2]
    sw, sh = src_size
    gx = (sx + origin[0]) * (2.0 / sw) - 1.0   # align_corners=False: -1 is the crop's left edge
    gy = (sy + origin[1]) * (2.0 / sh) - 1.0
    grid = np.stack([gx, gy], axis=-1).reshape(1, V * height, width, 2)
    return torch.from_numpy(grid.astype(np.float32))


def warp_views(frames: np.ndarray, grid: torch.Tensor, views: int, pad: bool = False
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Warp T source frames into all V views in one ``grid_sample`` call.

    ``frames``: uint8 [T, Hs, Ws, 3] source crop. The T*3 colour planes are
    stacked as channels, so each output location's bilinear weights are
    computed once and applied to every frame. Returns uint8 [V, T, H, W, 3] and,
    when ``pad``, the per-view validity masks uint8 [V, H, W] (255 = real pixel).
    """
    T, Hs, Ws, _ = frames.shape
    _, VH, W, _ = grid.shape
    H = VH // views
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).reshape(1, T * 3, Hs, Ws).float()
    mask = None
    if pad:
        x = torch.cat([x, torch.full((1, 1, Hs, Ws), 255.0)], dim=1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros" if pad else "border", align_corners=False)
    out = out.round_().clamp_(0, 255).to(torch.uint8)[0]                           # C, V*H, W
    if pad:
        # A pixel is real when all four bilinear taps fell inside the source.
        mask = (out[-1] >= 255).reshape(views, H, W).numpy().astype(np.uint8) * 255
        out = out[:-1]
    grid_frames = out.reshape(T, 3, views, H, W).permute(2, 0, 3, 4, 1).contiguous().numpy()
    return grid_frames, mask
