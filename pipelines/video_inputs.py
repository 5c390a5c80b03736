"""Where the pseudo-4D job's videos come from: folders, globs, Parquet manifests, WebDataset tars.

Each video becomes an item ``{"item_id": ..., "path": ...}`` (a manifest's path may be
a URL FFmpeg can read, e.g. https://...) or, for a tar
member, ``{"item_id": "<tar>/<member>", "tar": ..., "offset": ..., "size": ...}`` (``<tar>``: its path below the
listed tars' common folder, so its file name when they share one):
the driver reads a tar's headers once, sequentially, and a worker then reads its
member's bytes straight from that offset, so tars need not be unpacked and any
worker can take any video. Item ids are stable across runs (relative paths,
manifest ids, tar/member names): resume matches on them.
"""

from __future__ import annotations

import glob
import os
import tarfile
from pathlib import Path
from typing import Any

from pipelines.common.errors import UserError
from pipelines.common.inputs import list_files
from pipelines.video_io import VIDEO_EXTENSIONS


def _video_item(path: str, item_id: str) -> dict[str, Any]:
    return {"item_id": item_id, "path": str(path)}


def _tar_items(tar_path: Path, name: str) -> list[dict[str, Any]]:
    """Video members of a WebDataset tar, located by one sequential pass over its headers; ``name`` is the tar's
    part of their item ids."""
    items = []
    try:
        with tarfile.open(tar_path, "r:") as tar:  # uncompressed: members must be seekable by offset
            for m in tar:
                if m.isfile() and m.name.lower().endswith(VIDEO_EXTENSIONS):
                    items.append({"item_id": f"{name}/{m.name}", "tar": str(tar_path),
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
        # A tar's name in the ids is its path below the tars' common folder: its file name when they share one
        # folder (ids as before), else enough of its path that two folders' shard-000000.tar never collide.
        root = os.path.commonpath([os.path.dirname(os.path.abspath(t)) for t in tars])
        items = [it for t in tars for it in _tar_items(Path(t), os.path.relpath(os.path.abspath(t), root))]
    else:
        items = [_video_item(f.path, f.given_id or f.name)
                 for f in list_files(spec, VIDEO_EXTENSIONS, id_column="item_id", what="videos",
                                     accepted="'procedural', a folder, a glob, a .parquet manifest or a .tar")]
    if not items:
        raise UserError(f"no videos found at '{spec}' (looked for {', '.join(VIDEO_EXTENSIONS)}); check --input")
    sources: dict[str, str] = {}
    for it in items:  # one id, two videos: the job would keep the first and drop the other without a word
        where = it.get("path") or f"{it['tar']}@{it['offset']}"
        if sources.setdefault(it["item_id"], where) != where:
            raise UserError(f"input '{spec}' lists two videos under one id '{it['item_id']}' ({sources[it['item_id']]} "
                            f"and {where}); give them distinct ids (a manifest's item_id column) or list them apart")
    return items


def check_input_change(recorded_input: str | None, spec: str, items: list[dict[str, Any]], done: set[str]) -> None:
    """Refuse a run into an output made from another --input whose listed videos have ids already done there.

    Ids are paths relative to the listed folder (or tar and member names): a second collection listed into the
    same output, with a clip.mp4 of its own, would have that video skipped as done. Listing the same input again
    (a resume), or another input whose ids are all new, goes on."""
    if recorded_input is None or recorded_input.strip() == spec.strip() or (
            os.path.exists(recorded_input) and os.path.exists(spec)
            and os.path.realpath(recorded_input) == os.path.realpath(spec)):  # the same input, spelled otherwise
        return
    clash = sorted(it["item_id"] for it in items if it["item_id"] in done)
    if clash:
        raise UserError(f"{len(clash)} of the videos listed from '{spec}' have the ids of videos this output already "
                        f"holds from '{recorded_input}' (e.g. '{clash[0]}'); they would be skipped as done. Use a new "
                        "--output for another collection, a manifest whose item_id column tells them apart, or "
                        f"--input {recorded_input} to resume")
