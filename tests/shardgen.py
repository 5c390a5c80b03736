"""Tiny synthetic grid shards written through the real shard writer, for loader and training tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.common.shards import FILTER_META, Sample, commit_part, consolidate, json_bytes


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def grid_sample(i: int, views: int, frames: int, size: int, rgba: bool = False, filtered: str = "") -> Sample:
    """A square that moves with time (rows) and shifts with the view (columns), so both axes carry signal.
    ``filtered``: marked as the render job's filters mark a bad sample (meta.json's filter record, the index)."""
    files: dict[str, bytes] = {}
    for v in range(views):
        for t in range(frames):
            img = np.zeros((size, size, 4 if rgba else 3), np.uint8)
            img[..., :3] = (30 * (i % 5), 60, 90)
            y, x = (2 + t + i) % (size - 4), (2 + 2 * v + i) % (size - 4)
            img[y:y + 4, x:x + 4, :3] = (250, 200, 40)
            if rgba:
                img[..., 3] = 0
                img[y:y + 4, x:x + 4, 3] = 255
            files[f"v{v:02d}t{t:02d}.png"] = png(img)
    meta = {"kind": "pseudo4d", "item_id": f"item{i}", "views": views, "frames": frames}
    if filtered:
        meta[FILTER_META] = {"filtered": filtered}
    files["meta.json"] = json_bytes(meta)
    files["cameras.json"] = json_bytes({"type": "affine2d", "affine": [[[1, 0, 0], [0, 1, 0]]] * views})
    return Sample(key=f"item{i:04d}__0", item_id=f"item{i}", files=files, kind="pseudo4d", views=views,
                  frames=frames, height=size, width=size, filtered=filtered)


def make_grid_shards(out: Path, n: int = 8, views: int = 4, frames: int = 6, size: int = 16,
                     per_shard: int = 2, rgba: bool = False, filtered: dict[int, str] | None = None) -> Path:
    for part in range(0, n, per_shard):
        commit_part(out, part // per_shard, [grid_sample(i, views, frames, size, rgba, (filtered or {}).get(i, ""))
                                             for i in range(part, min(n, part + per_shard))], [])
    consolidate(out)
    return out
