"""Where the pseudo-4D job's videos come from: folders, globs, Parquet manifests, WebDataset tars.

Each video becomes an item ``{"item_id": ..., "path": ...}`` (a manifest's path may be
a URL FFmpeg can read, e.g. https://...) or, for a tar
member, ``{"item_id": "<tar name>/<member>", "tar": ..., "offset": ..., "size": ...}``:
the driver reads a tar's headers once, sequentially, and a worker then reads its
member's bytes straight from that offset, so tars need not be unpacked and any
worker can take any video. Item ids are stable across runs (relative paths,
manifest ids, tar/member names): resume matches on them.
"""

from __future__ import annotations

import glob
import tarfile
from pathlib import Path
from typing import Any

from pipelines.common.errors import UserError
from pipelines.common.inputs import list_files
from pipelines.video_io import VIDEO_EXTENSIONS


def _video_item(path: str, item_id: str) -> dict[str, Any]:
    return {"item_id": item_id, "path": str(path)}


def _tar_items(tar_path: Path) -> list[dict[str, Any]]:
    """Video members of a WebDataset tar, located by one sequential pass over its headers."""
    items = []
    try:
        with tarfile.open(tar_path, "r:") as tar:  # uncompressed: members must be seekable by offset
            for m in tar:
                if m.isfile() and m.name.lower().endswith(VIDEO_EXTENSIONS):
                    items.append({"item_id": f"{tar_path.name}/{m.name}", "tar": str(tar_path),
                                  "offset": m.offset_data, "size": m.size})
    except (tarfile.TarError, OSError) as exc:
        raise UserError(f"cannot read WebDataset tar {tar_path} ({exc}); pass uncompressed .tar shards of videos")
    return items


def list_videos(spec: str) -> list[dict[str, Any]]:
    """Items for the videos that ``spec`` names, sorted; a UserError when it names none."""
    spec = spec.strip()
    if ".tar" in spec and not spec.endswith(".parquet"):
        from braceexpand import braceexpand
        tars = sorted({t for pattern in braceexpand(spec) for t in (glob.glob(pattern) or [pattern])})
        missing = [t for t in tars if not Path(t).is_file()]
        if missing:
            raise UserError(f"WebDataset tar {missing[0]} does not exist; check --input")
        items = [it for t in tars for it in _tar_items(Path(t))]
    else:
        items = [_video_item(f.path, f.given_id or f.name)
                 for f in list_files(spec, VIDEO_EXTENSIONS, id_column="item_id", what="videos",
                                     accepted="'procedural', a folder, a glob, a .parquet manifest or a .tar")]
    if not items:
        raise UserError(f"no videos found at '{spec}' (looked for {', '.join(VIDEO_EXTENSIONS)}); check --input")
    return items
