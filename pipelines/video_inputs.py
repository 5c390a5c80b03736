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
import os
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
        # A tar's file name in the ids, whatever else is listed beside it: ids must not change when a later run
        # lists more tars (a resume would redo every video). Two tars of one name are refused below.
        items = [it for t in tars for it in _tar_items(Path(t))]
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
                            f"and {where}); ids are tar names and member names, or paths below the listed folder: "
                            "give the videos distinct ids with a manifest's item_id column, or run the collections "
                            "into separate outputs")
    return items


INPUTS_FILE = "inputs.json"
"""Every --input an output has taken, in order (the pseudo-4D job's record; config.yaml holds only the last)."""


def recorded_inputs(output: Path) -> list[str]:
    """The inputs an output was made from: its inputs.json, else (an output made before that record) the one
    its config.yaml names; [] for a new output."""
    import json

    from pipelines.common.config import load_yaml
    if (output / INPUTS_FILE).is_file():
        return list(json.loads((output / INPUTS_FILE).read_text()))
    if (output / "config.yaml").is_file():
        spec = (load_yaml(output / "config.yaml") or {}).get("input")
        return [spec] if spec else []
    return []


def record_input(output: Path, spec: str, earlier: list[str]) -> None:
    """Add ``spec`` to the inputs the output has taken (``earlier``: recorded_inputs, read before this run's
    config.yaml replaced the last one)."""
    import json
    if spec not in earlier or not (output / INPUTS_FILE).is_file():
        (output / INPUTS_FILE).write_text(json.dumps(earlier + ([] if spec in earlier else [spec]), indent=1))


def _same_input(a: str, b: str) -> bool:
    return a.strip() == b.strip() or (os.path.exists(a) and os.path.exists(b)
                                      and os.path.realpath(a) == os.path.realpath(b))


def check_input_change(recorded: list[str], spec: str, items: list[dict[str, Any]], done: set[str]) -> None:
    """Refuse a run from a new --input into an output whose listed videos have ids already done there.

    Ids are paths relative to the listed folder (or tar and member names): a second collection listed into the
    same output, with a clip.mp4 of its own, would have that video skipped as done. An input the output has
    taken before (a resume, spelled the same or naming the same path), or a new one whose ids are all new, goes
    on."""
    if not recorded or any(_same_input(r, spec) for r in recorded):
        return
    clash = sorted(it["item_id"] for it in items if it["item_id"] in done)
    if clash:
        raise UserError(f"{len(clash)} of the videos listed from '{spec}' have the ids of videos this output already "
                        f"holds from {', '.join(repr(r) for r in recorded)} (e.g. '{clash[0]}'); they would be "
                        "skipped as done. Use a new --output for another collection, a manifest whose item_id "
                        "column tells them apart, or the earlier --input to resume it")
