"""Pictures people look at: contact sheets of V x T grids and MP4s of rows, columns and bullet time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def to_uint8(x) -> np.ndarray:
    """float [-1, 1] tensor/array [..., 3, H, W] -> uint8 [..., H, W, 3]."""
    arr = x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)
    arr = np.clip((arr + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.moveaxis(arr, -3, -1)


def contact_sheet(grid: np.ndarray, path: str | Path, given: np.ndarray | None = None, pad: int = 2,
                  min_cell: int = 64) -> Path:
    """Save a uint8 [V, T, H, W, 3] grid as one PNG: rows are views, columns are times.

    Cells marked in ``given`` ([V, T] bool) get a green frame, so conditioning
    frames and generated ones are told apart at a glance.
    """
    V, T, H, W, _ = grid.shape
    zoom = max(1, int(np.ceil(min_cell / max(H, W))))  # tiny test grids are unreadable at 1:1
    h, w = H * zoom, W * zoom
    sheet = np.full((V * (h + pad) + pad, T * (w + pad) + pad, 3), 40, np.uint8)
    for v in range(V):
        for t in range(T):
            y, x = pad + v * (h + pad), pad + t * (w + pad)
            if given is not None and given[v, t]:
                sheet[y - pad:y + h + pad, x - pad:x + w + pad] = (40, 200, 80)
            sheet[y:y + h, x:x + w] = grid[v, t].repeat(zoom, 0).repeat(zoom, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path)
    return path


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """uint8 [N, H, W, 3] -> H.264 MP4."""
    from pipelines.common.video import encode_video
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encode_video(path, frames, fps)
    return path


def bullet_time_path(views: int, frames: int) -> list[tuple[int, int]]:
    """(view, time) cells for a bullet-time shot: the camera sweeps views while time runs, back and forth."""
    sweep = list(range(views)) + list(range(views - 2, 0, -1)) if views > 1 else [0]
    return [(sweep[t % len(sweep)], t) for t in range(frames)]


def grid_videos(grid: np.ndarray, out_dir: str | Path, fps: int = 8, prefix: str = "") -> dict[str, list[Path]]:
    """MP4 per row (fixed view), per column (freeze time) and one bullet-time MP4 for a uint8 [V, T, H, W, 3] grid."""
    out = Path(out_dir)
    V, T = grid.shape[:2]
    rows = [write_mp4(grid[v], out / f"{prefix}row_v{v:02d}.mp4", fps) for v in range(V)]
    cols = [write_mp4(grid[:, t], out / f"{prefix}col_t{t:02d}.mp4", fps) for t in range(T)]
    bullet = write_mp4(np.stack([grid[v, t] for v, t in bullet_time_path(V, T)]), out / f"{prefix}bullet_time.mp4", fps)
    return {"rows": rows, "columns": cols, "bullet_time": [bullet]}
