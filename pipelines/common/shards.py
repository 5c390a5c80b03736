"""WebDataset shards: writing, the per-part commit records, resume state, and reading them back.

Layout of a data job's output directory (docs/data_format.md has the whole format)::

    <output>/config.yaml                      resolved job config
    <output>/shards/shard-NNNNNN.tar          grids ("render" or "pseudo4d" samples)
    <output>/clips/shard-NNNNNN.tar           base-model clips (pseudo-4D job only)
    <output>/index.parquet                    one row per sample
    <output>/failures.parquet                 one row per failed item
    <output>/_parts/part-NNNNNN.*.parquet     per-part commit records (the source of truth)

A *part* is the unit of work a Ray task handles: a few input items whose samples
go into one shard per stream. A part is committed by writing its index record
last, after its shards were renamed into place and its failure record written;
a part without an index record never happened, so a crash at any point leaves
nothing half-counted, and a re-run redoes exactly the uncommitted items.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import random
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.common.errors import UserError

if TYPE_CHECKING:  # torch is imported where frames become tensors: the data jobs do not need it
    import torch

PARTS_DIR = "_parts"
STREAM_DIRS = {"grids": "shards", "clips": "clips"}

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("item_id", pa.string()), ("stream", pa.string()), ("shard", pa.string()),
    ("part", pa.int64()), ("kind", pa.string()), ("views", pa.int32()), ("frames", pa.int32()),
    ("height", pa.int32()), ("width", pa.int32()), ("context", pa.string()), ("bytes", pa.int64()),
    ("filtered", pa.string()),
])
"""One row per sample. ``filtered`` names the filter a render failed (pipelines/render_filters.py; empty = kept);
index parts written before it existed read as kept."""
FAILURE_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("stage", pa.string()), ("error", pa.string()),
    ("seconds", pa.float64()), ("part", pa.int64()),
])


@dataclass
class Sample:
    """One WebDataset sample: ``files`` maps member suffix (e.g. ``v00t03.png``) to bytes."""

    key: str
    item_id: str
    files: dict[str, bytes]
    kind: str
    views: int
    frames: int
    height: int
    width: int
    stream: str = "grids"
    context: str = ""
    filtered: str = ""
    """The filter this sample failed (its meta's ``filter`` record says more); empty = kept."""

    def __post_init__(self) -> None:
        # WebDataset splits member names at the first dot: a dot in the key would
        # silently split one sample into several.
        if "." in self.key or "/" in self.key:
            raise ValueError(f"sample key {self.key!r} may not contain '.' or '/'")
        # Checked here, inside the item's own processing, so that a name the tar cannot hold fails that item
        # (recorded in failures.parquet) instead of the part's commit, which would fail every re-run too.
        longest = max((len(suffix.encode()) for suffix in self.files), default=0)
        size = len(self.key.encode())  # the tar's limit is in bytes: a non-ASCII name takes more than one each
        if size + 1 + longest > USTAR_NAME_MAX:
            raise ValueError(f"sample key {self.key!r} ({size} bytes) with a member suffix of {longest} is longer "
                             f"than a tar member name may be ({USTAR_NAME_MAX} bytes); build keys with bounded_key()")


@dataclass
class Failure:
    item_id: str
    stage: str
    error: str
    seconds: float


@dataclass
class PartResult:
    """What a part hands back to the driver: small enough to keep thousands of them."""

    part: int
    items_ok: int = 0
    items_failed: int = 0
    samples: int = 0
    frames: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)


def safe_key(text: str) -> str:
    """Map an arbitrary id to a WebDataset-safe key (no dots or slashes)."""
    return "".join(c if (c.isalnum() or c in "-_") else "_" for c in text)


USTAR_NAME_MAX = 100
"""A member name of the shards' tar format (USTAR) without a '/' holds at most 100 bytes (UTF-8)."""
KEY_MAX = 64
"""Longest sample key in bytes: leaves 35 for a member's suffix (``v00t00.normal.png`` is 17)."""


def clip_utf8(text: str, size: int) -> str:
    """The longest start of ``text`` whose UTF-8 takes at most ``size`` bytes (never half a character)."""
    return text.encode()[:size].decode("utf-8", "ignore")


def bounded_key(key: str, limit: int = KEY_MAX) -> str:
    """``key`` (already WebDataset-safe) as it is when it fits, else its start and a hash of all of it, at most
    ``limit`` bytes in all: long (or non-ASCII) uids and action names still give distinct keys a tar can hold."""
    if len(key.encode()) <= limit:
        return key
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return f"{clip_utf8(key, limit - 11)}-{digest}"


TMP_DIR = ".tmp"
"""Where tars are written before they are moved into place: beside the shard folders, never inside them, so a
driver killed mid-write leaves nothing that ``ray.data.read_webdataset(<output>/shards/)`` would trip on."""


def write_tar(path: Path, samples: Iterable[Sample]) -> int:
    """Write samples to ``path`` atomically; members of a sample are contiguous and sorted.

    ``ray.data.read_webdataset`` groups consecutive members by key, so members
    must never interleave between samples. The file is written in ``<path's grandparent>/.tmp/`` (same file
    system) and renamed into place. Returns bytes written.
    """
    path = Path(path)
    tmp = path.parent.parent / TMP_DIR / f"{path.parent.name}--{path.name}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in sorted(samples, key=lambda s: s.key):
            for suffix in sorted(sample.files):
                data = sample.files[suffix]
                info = tarfile.TarInfo(f"{sample.key}.{suffix}")
                info.size = len(data)
                info.mode = 0o644
                info.mtime = 0  # byte-identical shards for identical inputs
                tar.addfile(info, io.BytesIO(data))
    size = tmp.stat().st_size
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return size


def _write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def shard_name(stream: str, part: int) -> str:
    return f"{STREAM_DIRS[stream]}/shard-{part:06d}.tar"


def commit_part(output: Path, part: int, samples: list[Sample], failures: list[Failure]) -> PartResult:
    """Write a part's shards, then its failure record, then its index record (the commit)."""
    output = Path(output)
    parts = output / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    result = PartResult(part=part)
    rows: list[dict[str, Any]] = []
    by_stream: dict[str, list[Sample]] = {}
    for s in samples:
        by_stream.setdefault(s.stream, []).append(s)
    for stream, group in sorted(by_stream.items()):
        rel = shard_name(stream, part)
        nbytes = write_tar(output / rel, group)
        result.bytes += nbytes
        for s in group:
            rows.append(dict(key=s.key, item_id=s.item_id, stream=stream, shard=rel, part=part, kind=s.kind,
                             views=s.views, frames=s.frames, height=s.height, width=s.width, context=s.context,
                             bytes=sum(len(b) for b in s.files.values()), filtered=s.filtered))
    fail_rows = [dict(item_id=f.item_id, stage=f.stage, error=f.error, seconds=float(f.seconds), part=part)
                 for f in failures]
    _write_parquet(pa.Table.from_pylist(fail_rows, schema=FAILURE_SCHEMA), parts / f"part-{part:06d}.failures.parquet")
    _write_parquet(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), parts / f"part-{part:06d}.index.parquet")
    result.samples = len(rows)
    result.frames = sum(r["views"] * r["frames"] if r["stream"] == "grids" else r["frames"] for r in rows)
    result.failures = fail_rows
    return result


@dataclass
class ResumeState:
    """What earlier runs into the same output already finished."""

    done_items: set[str]
    failed_items: set[str]
    next_part: int
    committed_parts: int
    removed_orphans: list[str]


def _read_parts(output: Path, suffix: str, schema: pa.Schema) -> pa.Table:
    files = sorted((output / PARTS_DIR).glob(f"part-*.{suffix}.parquet"))
    if suffix == "failures":
        committed = {f.name.split(".")[0] for f in (output / PARTS_DIR).glob("part-*.index.parquet")}
        files = [f for f in files if f.name.split(".")[0] in committed]
    tables = [pq.read_table(f, schema=schema) for f in files]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    if "filtered" in schema.names:  # parts written before the column existed: their samples were all kept
        i = schema.get_field_index("filtered")
        table = table.set_column(i, "filtered", pc.fill_null(table.column(i), ""))
    return table


def scan_output(output: str | Path) -> ResumeState:
    """Read the commit records and remove leftovers of parts that never committed."""
    output = Path(output)
    parts_dir = output / PARTS_DIR
    committed = sorted(int(f.name[5:11]) for f in parts_dir.glob("part-*.index.parquet")) if parts_dir.exists() else []
    committed_set = set(committed)
    removed: list[str] = []
    for stream_dir in STREAM_DIRS.values():
        d = output / stream_dir
        if not d.exists():
            continue
        for f in d.iterdir():
            # *.tmp files and shards of uncommitted parts are debris of an interrupted run.
            orphan = f.name.endswith(".tmp") or (f.name.startswith("shard-") and f.name.endswith(".tar")
                                                 and int(f.name[6:12]) not in committed_set)
            if orphan:
                f.unlink()
                removed.append(str(f.relative_to(output)))
    for f in (output / TMP_DIR).glob("*"):  # tars of an interrupted write (no folder: nothing)
        f.unlink()
        removed.append(str(f.relative_to(output)))
    if parts_dir.exists():
        for f in parts_dir.glob("*.tmp"):
            f.unlink()
        for f in parts_dir.glob("part-*.failures.parquet"):
            if int(f.name[5:11]) not in committed_set:
                f.unlink()
    index = _read_parts(output, "index", INDEX_SCHEMA)
    failures = _read_parts(output, "failures", FAILURE_SCHEMA)
    done = set(index.column("item_id").to_pylist())
    failed = set(failures.column("item_id").to_pylist()) - done
    return ResumeState(done_items=done, failed_items=failed, next_part=(max(committed) + 1) if committed else 0,
                       committed_parts=len(committed), removed_orphans=removed)


def consolidate(output: str | Path) -> tuple[pa.Table, pa.Table]:
    """Rewrite ``index.parquet`` and ``failures.parquet`` from the commit records.

    A failure of an item that a later run finished is dropped: the failure table
    lists what is missing from the data now, not the history of attempts.
    """
    output = Path(output)
    index = _read_parts(output, "index", INDEX_SCHEMA).sort_by([("shard", "ascending"), ("key", "ascending")])
    failures = _read_parts(output, "failures", FAILURE_SCHEMA)
    done = set(index.column("item_id").to_pylist())
    if failures.num_rows:
        mask = pa.array([i not in done for i in failures.column("item_id").to_pylist()])
        failures = failures.filter(mask)
    if failures.num_rows:
        # An item retried (--retry-failed) and failing again has a record per attempt: keep the latest.
        latest: dict[str, dict[str, Any]] = {}
        for row in failures.to_pylist():
            if row["item_id"] not in latest or row["part"] >= latest[row["item_id"]]["part"]:
                latest[row["item_id"]] = row
        failures = pa.Table.from_pylist(sorted(latest.values(), key=lambda r: (r["part"], r["item_id"])),
                                        schema=FAILURE_SCHEMA)
    _write_parquet(index, output / "index.parquet")
    _write_parquet(failures, output / "failures.parquet")
    return index, failures


def _tar_members(f) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of every regular file in an uncompressed tar, reading the 512-byte ustar headers
    directly: tarfile's generic header parsing cost more than decoding the PNGs of a 64x64 grid. Archives
    this fast path does not cover (pax or GNU long-name headers, sparse files) go through tarfile."""
    while True:
        header = f.read(512)
        if len(header) < 512 or header == b"\0" * 512:
            return
        typeflag = header[156:157]
        if typeflag not in (b"0", b"\0", b"5", b"1", b"2") or header[257:262] not in (b"ustar", b"\0\0\0\0\0"):
            raise _SlowPath
        name = header[0:100].split(b"\0", 1)[0].decode()
        prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
        size_field = header[124:136]
        if size_field[0] & 0x80:  # base-256 size: only for members over 8 GB
            raise _SlowPath
        size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
        data = f.read(size)
        f.read((-size) % 512)
        if typeflag in (b"0", b"\0"):
            yield (f"{prefix}/{name}" if prefix else name), data


class _SlowPath(Exception):
    pass


def iter_tar_samples(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Read a shard written by ``write_tar`` without webdataset (members are contiguous)."""
    def group(members: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
        key: str | None = None
        files: dict[str, bytes] = {}
        for name, data in members:
            k, _, suffix = name.partition(".")
            if key is not None and k != key:
                yield key, files
                files = {}
            key = k
            files[suffix] = data
        if key is not None:
            yield key, files

    def slow() -> Iterator[tuple[str, bytes]]:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if member.isfile():
                    yield member.name, tar.extractfile(member).read()  # type: ignore[union-attr]

    emitted = 0
    try:
        with open(path, "rb") as f:
            for item in group(_tar_members(f)):
                yield item
                emitted += 1
        return
    except _SlowPath:
        pass
    for i, item in enumerate(group(slow())):
        if i >= emitted:  # samples already yielded by the fast path are not repeated
            yield item


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


# ------------------------------------------------------------------------------------------------ reading
# The reader lives beside the writer: the training loader, generation, evaluation and the benchmarks all
# read shards through these.

BACKGROUNDS = {"white": 1.0, "black": 0.0, "gray": 0.5}
"""Fill of an RGBA frame's transparent pixels, by name ("random": a grey level drawn per sample)."""

FILTER_META = "filter"
"""The meta.json key of a render's filter record: ``{"filtered": <reason or "">, <measured values>}``
(pipelines/render_filters.py writes it)."""


def filtered_reason(meta: dict[str, Any]) -> str:
    """The filter a sample failed, from its meta (empty: kept, or never filtered)."""
    record = meta.get(FILTER_META)
    return str(record.get("filtered") or "") if isinstance(record, dict) else ""


def is_kept(reason: str, keep: Collection[str] | None) -> bool:
    """Whether a reader takes a sample with this recorded reason: unfiltered ones always, filtered ones when
    their reason is in ``keep`` (None keeps every sample)."""
    return not reason or keep is None or reason in keep


def resolve_shards(spec: str) -> list[str]:
    """A job output folder, a shards folder or a glob -> sorted list of tar files (or a clear error)."""
    p = Path(spec)
    if p.is_dir():
        for sub in ("shards", ""):
            found = sorted(str(f) for f in (p / sub).glob("shard-*.tar"))
            if found:
                return found
        found = sorted(str(f) for f in p.glob("*.tar"))
    else:
        found = sorted(glob.glob(spec))
    if not found:
        raise UserError(f"no shards found at '{spec}'; point data.grids/data.clips at a render or pseudo-4D output "
                        "folder (or its shards/ or clips/ folder), or run the data jobs first")
    return found


def _index_rows(shards: list[str]) -> list[dict[str, Any]] | None:
    """The index.parquet rows of these shards (written by the data jobs beside shards/ and clips/), if any."""
    rows: list[dict[str, Any]] = []
    by_root: dict[Path, set[str]] = {}
    for shard in shards:
        p = Path(shard).resolve()
        by_root.setdefault(p.parent.parent, set()).add(f"{p.parent.name}/{p.name}")
    for root, names in by_root.items():
        index = root / "index.parquet"
        if not index.is_file():
            return None
        table = pq.read_table(index).to_pylist()
        if names - {r.get("shard") for r in table}:
            # shards committed after the index was last rebuilt (a data job killed before its end): the samples'
            # own meta.json, or their items would be missing from the count and from the held-out checks
            return None
        rows += [r for r in table if r.get("shard") in names]
    return rows


def describe_source(spec: str, keep: Collection[str] | None = None) -> dict[str, Any]:
    """What one data source holds: sample count, grid shapes (views, frames) and clip contexts, item ids, all
    of the samples a reader takes (``is_kept``), and how many it leaves out per filter reason (``filtered``).

    From the jobs' index.parquet when present (no tar is opened), else from every sample's meta.json.
    """
    shards = resolve_shards(spec)
    rows = _index_rows(shards)
    if rows is None:
        rows = []
        for shard in shards:
            for key, files in iter_tar_samples(shard):
                g = LazyGrid(files)
                rows.append({"key": key, "item_id": g.meta.get("item_id", key.split("__")[0]),
                             "kind": "clip" if (g.meta.get("kind") == "clip" or g.shape[0] == 1) else "grid",
                             "views": g.shape[0], "frames": g.shape[1], "context": g.meta.get("context", ""),
                             "filtered": filtered_reason(g.meta)})
    shapes: dict[tuple[str, int, int, str], int] = {}
    left_out: dict[str, int] = {}
    taken = []
    for r in rows:
        reason = r.get("filtered") or ""  # None: an index written before the column
        if not is_kept(reason, keep):
            left_out[reason] = left_out.get(reason, 0) + 1
            continue
        taken.append(r)
        kind = "clip" if r.get("kind") == "clip" else "grid"
        k = (kind, int(r["views"]), int(r["frames"]), r.get("context") or "")
        shapes[k] = shapes.get(k, 0) + 1
    return {"spec": spec, "samples": len(taken), "shapes": shapes, "filtered": dict(sorted(left_out.items())),
            "items": sorted({str(r["item_id"]) for r in taken})}


def _decode_png(data: bytes) -> np.ndarray:
    from PIL import Image
    img = Image.open(io.BytesIO(data))
    img.load()
    return np.asarray(img.convert("RGBA") if img.mode in ("RGBA", "LA", "P") else img.convert("RGB"))


_FRAME_NAME = re.compile(r"(v\d\dt\d\d|f\d\d)\.(png|jpg)")
"""A grid's frame ``v{VV}t{TT}.png`` or a clip's ``f{TT}.png`` (docs/data_format.md)."""


class LazyGrid:
    """A sample's frames, decoded only when a cell is asked for (a base clip needs one row of a grid)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.meta = json.loads(files["meta.json"]) if "meta.json" in files else {}
        # Frames only: a sample may hold other images beside them (pad mode's per-view masks, v{VV}mask.png).
        names = sorted(k for k in files if _FRAME_NAME.fullmatch(k))
        if not names:
            raise ValueError("sample has no frames")
        self.ext = names[0].rsplit(".", 1)[1]
        if names[0][0] == "f":  # a clip: f{TT}.png, one view
            self.views, self.times = [0], sorted(int(n[1:3]) for n in names)
            self.name = lambda v, t: f"f{t:02d}.{self.ext}"
        else:
            self.views = sorted({int(n[1:3]) for n in names})
            self.times = sorted({int(n[4:6]) for n in names})
            self.name = lambda v, t: f"v{v:02d}t{t:02d}.{self.ext}"

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.views), len(self.times)

    def cells(self, vs: range | list[int], ts: range | list[int]) -> np.ndarray:
        """uint8 [len(vs), len(ts), H, W, C] for view/time positions (0-based indices into the grid)."""
        return np.stack([np.stack([_decode_png(self.files[self.name(self.views[v], self.times[t])]) for t in ts])
                         for v in vs])


def decode_grid(files: dict[str, bytes]) -> tuple[np.ndarray, dict[str, Any]]:
    """Sample members -> (uint8 [V, T, H, W, C], meta); clips come back as V = 1."""
    g = LazyGrid(files)
    return g.cells(range(g.shape[0]), range(g.shape[1])), g.meta


def to_tensor(frames: np.ndarray, height: int, width: int, background: str, rng: random.Random) -> torch.Tensor:
    """uint8 [..., H, W, C] -> float [..., 3, height, width] in [-1, 1]; RGBA composited, aspect kept."""
    import torch
    import torch.nn.functional as F
    lead = frames.shape[:-3]
    x = torch.from_numpy(np.ascontiguousarray(frames)).reshape(-1, *frames.shape[-3:]).permute(0, 3, 1, 2).float()
    x = x / 255.0
    if x.shape[1] == 4:
        bg = rng.random() if background == "random" else BACKGROUNDS[background]
        alpha = x[:, 3:4]
        x = x[:, :3] * alpha + bg * (1 - alpha)
    h, w = x.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - height) // 2, (nw - width) // 2
        x = x[..., top:top + height, left:left + width]
    return (x * 2 - 1).reshape(*lead, 3, height, width)
