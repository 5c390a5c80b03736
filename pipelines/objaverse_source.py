"""Objaverse 1.0 on the Hugging Face hub: list animated assets, download and verify their GLBs.

Layout read under ``base_url`` (the hub's ``allenai/objaverse`` dataset, or any mirror)::

    object-paths.json.gz             {uid: "glbs/<group>/<uid>.glb", ...}
    metadata/<group>.json.gz         {uid: {"animationCount": n, "name": ..., ...}, ...}
    glbs/<group>/<uid>.glb

Everything fetched is cached on disk under ``cache_dir`` with the same layout;
a GLB in the cache is reused only if it verifies (glTF magic, length header,
and sha256 when the annotation carries one), so a re-run downloads nothing
that it already holds. Downloads retry with exponential backoff.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable

DEFAULT_BASE_URL = "https://huggingface.co/datasets/allenai/objaverse/resolve/main"
GLB_MAGIC = b"glTF"


class AssetError(Exception):
    """Fetching one asset failed; ``stage`` is ``download`` or ``verify``."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


class SourceError(Exception):
    """The listing itself failed (index files unreachable or malformed): nothing can be scheduled."""


def _url(base_url: str, rel: str) -> str:
    return base_url.rstrip("/") + "/" + rel.lstrip("/")


def fetch(url: str, dest: Path, retries: int = 4, timeout: float = 60.0, backoff: float = 0.5) -> Path:
    """Download ``url`` to ``dest`` atomically; retry transient errors (5xx, resets, timeouts) with backoff."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    last = ""
    for attempt in range(retries + 1):
        fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
            os.replace(tmp, dest)
            return dest
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code} for {url}"
            if exc.code < 500 and exc.code != 429:
                break  # 404 and friends will not get better by asking again
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)} for {url}"
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if attempt < retries:
            time.sleep(backoff * (2 ** attempt))
    raise AssetError("download", f"{last} (after {attempt + 1} attempt{'s' if attempt else ''})")


def _cached_json_gz(base_url: str, rel: str, cache_dir: Path, retries: int, timeout: float) -> Any:
    path = cache_dir / rel
    if not path.exists():
        try:
            fetch(_url(base_url, rel), path, retries=retries, timeout=timeout)
        except AssetError as exc:
            raise SourceError(f"cannot fetch Objaverse index {rel}: {exc}; check --base-url and the network") from None
    try:
        with gzip.open(path, "rt") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        path.unlink(missing_ok=True)  # a broken cached index must not poison the next run
        raise SourceError(f"Objaverse index {rel} is not valid gzipped JSON ({exc}); re-run to fetch it again") from None


def list_assets(base_url: str, cache_dir: str | Path, uids: Iterable[str] | None = None, limit: int = 0,
                min_animations: int = 1, retries: int = 4, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Items for the render job: animated objects (or exactly ``uids``), in a stable order.

    Only the small per-item dict is kept per asset; annotation files are read one
    group at a time so memory stays bounded by the largest group.
    """
    cache = Path(cache_dir)
    paths: dict[str, str] = _cached_json_gz(base_url, "object-paths.json.gz", cache, retries, timeout)
    wanted = set(uids) if uids is not None else None
    if wanted is not None:
        missing = sorted(wanted - paths.keys())
        if missing and len(missing) == len(wanted):
            raise SourceError(f"none of the {len(wanted)} requested uids are in object-paths.json.gz "
                              f"(first: {missing[0]}); check the uid list")
    groups = sorted({rel.split("/")[1] for uid, rel in paths.items() if wanted is None or uid in wanted})
    items: list[dict[str, Any]] = []
    for group in groups:
        annotations = _cached_json_gz(base_url, f"metadata/{group}.json.gz", cache, retries, timeout)
        for uid in sorted(annotations):
            ann = annotations[uid]
            if uid not in paths:
                continue
            if wanted is not None:
                if uid not in wanted:
                    continue
            elif int(ann.get("animationCount") or 0) < min_animations:
                continue
            item = {"item_id": uid, "uid": uid, "rel_path": paths[uid], "name": str(ann.get("name", ""))[:200],
                    "animation_count": int(ann.get("animationCount") or 0)}
            if ann.get("sha256"):
                item["sha256"] = ann["sha256"]
            items.append(item)
            if limit and len(items) >= limit:
                return items
    if wanted is not None:
        # A uid without an annotation still has a path: render it, the list was explicit.
        have = {i["uid"] for i in items}
        for uid in sorted(wanted & paths.keys() - have):
            items.append({"item_id": uid, "uid": uid, "rel_path": paths[uid], "name": "", "animation_count": -1})
    return items[:limit] if limit else items


def verify_glb(path: Path, sha256: str | None = None) -> None:
    """Raise AssetError('verify') unless ``path`` is a complete binary glTF (and matches ``sha256``)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(12)
    if len(head) < 12 or head[:4] != GLB_MAGIC:
        raise AssetError("verify", f"{path.name} is not a GLB (bad magic {head[:4]!r})")
    version, length = struct.unpack("<II", head[4:12])
    if version != 2:
        raise AssetError("verify", f"{path.name} is glTF version {version}; only version 2 is supported")
    if length != size:
        raise AssetError("verify", f"{path.name} is truncated or padded: header says {length} bytes, file has {size}")
    if sha256:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != sha256.lower():
            raise AssetError("verify", f"{path.name} sha256 {h.hexdigest()[:12]}... does not match the annotation")


def ensure_asset(item: dict[str, Any], base_url: str, cache_dir: str | Path, retries: int = 4,
                 timeout: float = 60.0) -> Path:
    """The verified local path of an item's GLB, downloading it only if the cache lacks a good copy."""
    dest = Path(cache_dir) / item["rel_path"]
    if dest.exists():
        try:
            verify_glb(dest, item.get("sha256"))
            return dest
        except AssetError:
            dest.unlink()  # stale or broken cache entry: fetch again
    fetch(_url(base_url, item["rel_path"]), dest, retries=retries, timeout=timeout)
    try:
        verify_glb(dest, item.get("sha256"))
    except AssetError:
        # Keep the bad bytes out of the cache so the next run tries again.
        dest.unlink(missing_ok=True)
        raise
    return dest


def read_uid_list(path: str | Path) -> list[str]:
    """UIDs from a text file (one per line, # comments), a JSON list, or a Parquet file with a ``uid`` column."""
    p = Path(path)
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(p)
        if "uid" not in table.column_names:
            raise SourceError(f"{p} has no 'uid' column (columns: {', '.join(table.column_names)})")
        return [str(u) for u in table.column("uid").to_pylist()]
    text = p.read_text()
    if p.suffix == ".json":
        return [str(u) for u in json.loads(text)]
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


