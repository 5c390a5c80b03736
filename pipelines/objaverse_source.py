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
import re
import struct
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable

from pipelines.common.errors import ItemError

DEFAULT_BASE_URL = "https://huggingface.co/datasets/allenai/objaverse/resolve/main"
GLB_MAGIC = b"glTF"

LISTS_DIR = Path(__file__).resolve().parent / "data" / "objaverse"
ANIMATED_LIST = LISTS_DIR / "animated_15k.txt"
"""The shipped training list: Diffusion4D's curated OR Puppet-Master's HQ animated uids (15,081; README there)."""
TEST_LIST = LISTS_DIR / "sv4d_test.txt"
"""SV4D's 20 published test uids: left out of training renders, rendered alone for evaluation."""
SPLITS = ("train", "test", "all")
TRAINABLE_LICENSES = ("cc0", "by", "by-sa")
"""Creative Commons licences (as normalised by ``normalize_license``) that permit training on an object and
redistributing renders of it with attribution; NC and ND licences are left out by default."""


class AssetError(ItemError):
    """Fetching one asset failed; ``stage`` is ``download`` or ``verify``. An ``ItemError``: the job records it
    as that item's failure."""


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


def normalize_license(text: Any) -> str:
    """An annotation's licence as a short CC slug: 'CC-BY-SA 4.0', 'by-sa' and 'Attribution-ShareAlike' all
    read 'by-sa'; 'CC0 1.0' and 'Public Domain' read 'cc0'; an empty one reads '', an unknown one itself,
    lower-cased."""
    t = str(text or "").strip().lower().replace("_", "-").replace(" ", "-")
    for phrase, word in (("non-commercial", "nc"), ("noncommercial", "nc"), ("share-alike", "sa"),
                         ("sharealike", "sa"), ("no-derivatives", "nd"), ("noderivatives", "nd"),
                         ("noderivs", "nd"), ("attribution", "by"), ("creative-commons", "cc"),
                         ("public-domain", "cc0"), ("publicdomain", "cc0")):
        t = t.replace(phrase, word)
    noise = {"", "cc", "international", "license", "licence", "unported", "generic", "deed"}
    # versions, and two-letter jurisdiction ports (3.0-US) other than the licence elements themselves
    parts = [w for w in t.split("-") if w not in noise and not re.fullmatch(r"v?\d+(\.\d+)*", w)
             and not (len(w) == 2 and w not in ("by", "nc", "sa", "nd"))]
    if not parts:
        return ""
    if parts[0] in ("cc0", "zero"):
        return "cc0"
    return "-".join(parts)


def split_uids(split: str, uids: list[str] | None) -> tuple[list[str] | None, int]:
    """The uids a split renders, and how many it left out. ``uids`` None means "no list given": every animated
    object in the annotations for train (the test uids are then left out by the caller, after listing), and
    all 20 test uids for test."""
    if split not in SPLITS:
        raise SourceError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    test = read_uid_list(TEST_LIST)
    if split == "test":  # the 20 test uids; of an explicit list, those it holds
        return (test, 0) if uids is None else ([u for u in test if u in set(uids)], 0)
    if split == "all" or uids is None:
        return uids, 0
    held = set(test)
    kept = [u for u in uids if u not in held]
    return kept, len(uids) - len(kept)


def write_uid_lists(table: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Derive the shipped lists from the merged table of public lists (a CSV with a uid column and 0/1 columns
    diffusion4d_curated, puppetmaster_hq and sv4d_test): training = curated OR HQ; test = sv4d_test."""
    import csv
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    need = {"uid", "diffusion4d_curated", "puppetmaster_hq", "sv4d_test"}
    if not rows or need - set(rows[0]):
        raise SourceError(f"{table} lacks the columns {sorted(need - set(rows[0] if rows else ()))}")
    train = sorted(r["uid"] for r in rows if r["diffusion4d_curated"] == "1" or r["puppetmaster_hq"] == "1")
    test = sorted(r["uid"] for r in rows if r["sv4d_test"] == "1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ANIMATED_LIST.name).write_text(
        "# Animated Objaverse 1.0 uids: Diffusion4D's curated list (VITA-Group/Diffusion4D, rendering/src/"
        "ObjV1_curated.txt)\n# OR Puppet-Master's high-quality list (RuiningLi/puppet-master, data/objaverse-"
        f"animation-HQ.json): {len(train):,} uids,\n# the paper's ~15k. {len(set(train) & set(test))} of them are "
        "SV4D test uids (sv4d_test.txt), which --split train leaves out.\n" + "\n".join(train) + "\n")
    (out / TEST_LIST.name).write_text(
        f"# The {len(test)} ObjaverseDy test uids SV4D's authors published (Stability-AI/generative-models issue "
        "432);\n# 4Real-Video-V2 evaluates on held-out assets following SV4D. --split test renders exactly these.\n"
        + "\n".join(test) + "\n")
    return {"train": len(train), "test": len(test)}


def list_assets(base_url: str, cache_dir: str | Path, uids: Iterable[str] | None = None, limit: int = 0,
                min_animations: int = 1, retries: int = 4, timeout: float = 60.0,
                licenses: Iterable[str] | None = None, exclude: Iterable[str] = (),
                stats: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Items for the render job: animated objects (or exactly ``uids``), in a stable order.

    ``licenses`` (normalised slugs, see ``normalize_license``) keeps only objects whose annotation carries one
    of them (an object without an annotation has no known licence and is left out); ``exclude`` drops uids
    (the test split). ``stats`` receives how many each filter dropped. Only the small per-item dict is kept
    per asset; annotation files are read one group at a time so memory stays bounded by the largest group.
    """
    allowed = None if licenses is None else {normalize_license(x) for x in licenses}
    excluded = set(exclude)
    stats = stats if stats is not None else {}
    stats.setdefault("dropped_license", 0)
    stats.setdefault("dropped_excluded", 0)
    annotated: set[str] = set()  # requested uids that had an annotation (kept or filtered)
    cache = Path(cache_dir)
    paths: dict[str, str] = _cached_json_gz(base_url, "object-paths.json.gz", cache, retries, timeout)
    wanted = set(uids) if uids is not None else None
    if wanted is not None:
        missing = sorted(wanted - paths.keys())
        if missing and len(missing) == len(wanted):
            raise SourceError(f"none of the {len(wanted)} requested uids are in object-paths.json.gz "
                              f"(first: {missing[0]}); check the uid list")
        if missing:  # counted, so the summary says how many of the list were never there
            stats["dropped_not_in_index"] = stats.get("dropped_not_in_index", 0) + len(missing)
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
                annotated.add(uid)
            elif int(ann.get("animationCount") or 0) < min_animations:
                continue
            if uid in excluded:
                stats["dropped_excluded"] += 1
                continue
            license_ = normalize_license(ann.get("license"))
            if allowed is not None and license_ not in allowed:
                stats["dropped_license"] += 1
                continue
            item = {"item_id": uid, "uid": uid, "rel_path": paths[uid], "name": str(ann.get("name", ""))[:200],
                    "animation_count": int(ann.get("animationCount") or 0), "license": license_}
            if ann.get("sha256"):
                item["sha256"] = ann["sha256"]
            items.append(item)
            if limit and len(items) >= limit:
                return items
    if wanted is not None:
        # A uid without an annotation still has a path: render it, the list was explicit.
        for uid in sorted(wanted & paths.keys() - annotated):
            if uid in excluded:
                continue
            if allowed is not None:  # no annotation, no known licence
                stats["dropped_license"] += 1
                continue
            items.append({"item_id": uid, "uid": uid, "rel_path": paths[uid], "name": "", "animation_count": -1,
                          "license": ""})
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


