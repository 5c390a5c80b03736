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
from pipelines.video_io import VIDEO_EXTENSIONS


def _video_item(path: Path, item_id: str) -> dict[str, Any]:
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
    if spec.endswith(".parquet"):
        import pyarrow.parquet as pq
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"manifest {path} does not exist; pass a Parquet file with a 'path' column")
        table = pq.read_table(path)
        if "path" not in table.column_names:
            raise UserError(f"manifest {path} has no 'path' column (columns: {', '.join(table.column_names)}); "
                            "add one with the video file paths")
        paths = table.column("path").to_pylist()
        ids = table.column("item_id").to_pylist() if "item_id" in table.column_names else paths
        if any(p is None for p in paths) or any(i is None for i in ids):
            raise UserError(f"manifest {path} has empty 'path' or 'item_id' entries; fill or drop those rows")
        if len(set(ids)) != len(ids):
            raise UserError(f"manifest {path} lists an item_id twice; item ids must be unique")
        items = []
        for p, iid in zip(paths, ids):
            if "://" in p:   # http(s) and other FFmpeg protocols: the worker streams it
                items.append({"item_id": str(iid), "path": p})
                continue
            vp = Path(p) if Path(p).is_absolute() else path.parent / p
            items.append(_video_item(vp, str(iid)))
    elif ".tar" in spec:
        from braceexpand import braceexpand
        tars = sorted({t for pattern in braceexpand(spec) for t in (glob.glob(pattern) or [pattern])})
        missing = [t for t in tars if not Path(t).is_file()]
        if missing:
            raise UserError(f"WebDataset tar {missing[0]} does not exist; check --input")
        items = [it for t in tars for it in _tar_items(Path(t))]
    elif Path(spec).is_dir():
        root = Path(spec)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
        items = [_video_item(p.resolve(), p.relative_to(root).as_posix()) for p in files]
    else:
        matches = sorted(glob.glob(spec, recursive=True))
        if not matches and not any(c in spec for c in "*?["):
            raise UserError(f"input '{spec}' is not 'procedural', a folder, a glob, a .parquet manifest or a .tar "
                            "that exists; check --input")
        items = [_video_item(Path(m).resolve(), m) for m in matches
                 if Path(m).is_file() and Path(m).suffix.lower() in VIDEO_EXTENSIONS]
    if not items:
        raise UserError(f"no videos found at '{spec}' (looked for {', '.join(VIDEO_EXTENSIONS)}); check --input")
    return items
